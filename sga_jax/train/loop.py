"""The training loop: builds the run from its config, resumes from the latest checkpoint, steps,
logs, calls the task's sample/eval hooks, saves on schedule and on SIGTERM/SIGINT.

Work directory (see docs/training.md):

    WORKDIR/config.json           resolved config of the latest start
    WORKDIR/metrics.jsonl         one JSON object per logged step ("step", "loss", task metrics, ...)
    WORKDIR/tensorboard/          TensorBoard event files (tensorboardX)
    WORKDIR/checkpoints/<step>/   orbax checkpoints: state, data iterator state, config, metadata
    WORKDIR/samples/              whatever the task's sample hook writes
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from sga_jax import parallel
from sga_jax.train import config as config_lib
from sga_jax.train import optim, state as state_lib, step as step_lib
from sga_jax.train.checkpoint import Checkpointer
from sga_jax.train.task import Task, get_task

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Raised after `nan_guard.max_consecutive` updates in a row were skipped for NaN/Inf."""


@dataclasses.dataclass
class RunResult:
    """How a call to `train` ended."""

    step: int
    preempted: bool
    last_metrics: dict[str, float]


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a line cut short by a crash."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


class MetricWriter:
    """metrics.jsonl plus TensorBoard scalars, written by process 0 only.

    On resume at step S, lines of metrics.jsonl for steps after S (logged by a run that died before
    its next checkpoint) and a last line cut short by the crash are dropped, so the file reads as
    one consistent history.
    """

    def __init__(self, workdir: Path, *, resume_step: int, tensorboard: bool):
        self.enabled = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        if not self.enabled:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        """Append one record {"step": step, **scalars} (non-finite values as null) and the same
        scalars to TensorBoard."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            record = {k: (v if math.isfinite(v) else None) for k, v in scalars.items()}  # strict JSON
            f.write(json.dumps({"step": int(step), **record}) + "\n")
        if self.tb is not None:
            for name, value in scalars.items():
                self.tb.add_scalar(name, value, int(step))
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class PreemptionFlag:
    """Set by SIGTERM or SIGINT; the loop saves a checkpoint and returns at the next step boundary.
    A second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def is_set(self) -> bool:
        """True when any process received a signal (agreed across processes in multi-host runs)."""
        local = self.signal is not None
        if jax.process_count() == 1:
            return local
        return bool(np.any(multihost_utils.process_allgather(np.asarray(local))))

    @contextmanager
    def installed(self) -> Iterator[PreemptionFlag]:
        """Install the handler for SIGTERM and SIGINT, restoring the previous handlers on exit."""
        previous = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _fmt_bytes(n: float) -> str:
    unit = 0
    while n >= 1024 and unit < 4:
        n, unit = n / 1024, unit + 1
    return f"{n:.1f} {('B', 'KiB', 'MiB', 'GiB', 'TiB')[unit]}"


def describe_memory(estimate: dict[str, int]) -> str:
    """One line per part of the per-device memory estimate."""
    return "\n".join(f"  {name:<12}{_fmt_bytes(size):>12}" for name, size in estimate.items())


@dataclasses.dataclass
class Run:
    """A run's pieces, built from its config without allocating parameters."""

    config: ml_collections.ConfigDict
    task: Task
    mesh: jax.sharding.Mesh
    rules: dict
    optimizer: Any
    schedule: Any
    setup: state_lib.Setup


def build_run(config: ml_collections.ConfigDict, devices: list[jax.Device] | None = None) -> Run:
    """Validate the config, build the mesh (over `devices`, default all), the task, the optimizer
    and the abstract sharded state."""
    config_lib.validate_config(config)
    mesh = parallel.make_mesh(config.mesh, devices)
    rules = parallel.resolve_rules(config.sharding_rules)
    config_lib.validate_for_mesh(config, parallel.batch_shards(mesh, rules), jax.process_count())
    task = get_task(config.task, config)
    optimizer, schedule = optim.make_optimizer(config.optimizer, config.total_steps)
    with parallel.activation_sharding(mesh, rules):
        setup = state_lib.make_setup(task, config, optimizer, mesh, rules)
    return Run(config, task, mesh, rules, optimizer, schedule, setup)


def jitted_step(run: Run) -> step_lib.StepFn:
    """The run's train step, jitted with its shardings; call it (and trace it) inside
    `parallel.activation_sharding(run.mesh, run.rules)`."""
    config = run.config
    step = step_lib.make_train_step(
        run.task, run.setup.graphs, run.optimizer, run.schedule,
        compute_dtype=config.precision.compute_dtype,
        grad_accum_steps=config.optimizer.grad_accum_steps,
        ema_decay=float(config.optimizer.ema_decay),
        mesh=run.mesh, rules=run.rules,
    )
    return step_lib.jit_train_step(step, run.setup)


def _modules(run: Run, state: state_lib.TrainState, frozen: Any) -> tuple[nnx.Module, nnx.Module | None]:
    params = state.ema if state.ema is not None else state.params
    trainable = nnx.merge(run.setup.graphs.trainable, params, state.model_state)
    frozen_module = nnx.merge(run.setup.graphs.frozen, frozen) if run.setup.graphs.frozen is not None else None
    return trainable, frozen_module


def _due(step: int, every: int, total: int) -> bool:
    return every > 0 and (step % every == 0 or step == total)


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, run: Run | None = None) -> RunResult:
    """Train `config` in `workdir`, resuming from its latest checkpoint when there is one
    (`run`: the result of `build_run(config)` when the caller already built it).

    Returns when `total_steps` is reached or after a SIGTERM/SIGINT (a checkpoint of the current
    step is saved first); raises TrainingDiverged after too many non-finite updates in a row.
    """
    workdir = Path(workdir).absolute()
    run = build_run(config) if run is None else run
    cfg = config.to_dict()
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    log.info("mesh %s; memory per device before activations:\n%s",
             dict(run.mesh.shape), describe_memory(state_lib.memory_estimate(run.setup)))

    ck = config.checkpoint
    checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=ck.max_to_keep,
                                keep_period=ck.keep_period, async_save=ck.async_save)
    batches = run.task.batches(config, run.mesh, seed=int(config.seed))
    start = checkpointer.latest_step()
    with parallel.activation_sharding(run.mesh, run.rules):
        if start is None:
            start = 0
            state = state_lib.init_state(run.task, config, run.optimizer, run.setup)
            state = state_lib.load_pretrained(run.task, state, run.setup)
        else:
            target = state_lib.with_shardings(run.setup.abstract_state, run.setup.state_shardings)
            state, data_state, _, _ = checkpointer.restore(start, target)
            batches.set_state(data_state)
            log.info("resumed from %s at step %d", checkpointer.directory, start)
        frozen = state_lib.init_frozen(run.task, config, run.setup)
        step_fn = jitted_step(run)
        writer = MetricWriter(workdir, resume_step=start, tensorboard=config.logging.tensorboard)
        try:
            return _loop(run, workdir, checkpointer, writer, batches, state, frozen, start, cfg, step_fn)
        finally:
            writer.close()
            checkpointer.close()


def _loop(run: Run, workdir: Path, checkpointer: Checkpointer, writer: MetricWriter, batches: Any,
          state: state_lib.TrainState, frozen: Any, start: int, cfg: dict, step_fn: Any) -> RunResult:
    config = run.config
    total = int(config.total_steps)
    images = int(config.batch_size) * int(getattr(run.task, "images_per_example", 1))
    max_streak = int(config.nan_guard.max_consecutive)
    bar = tqdm(total=total, initial=start, disable=not (config.logging.progress_bar and jax.process_index() == 0),
               dynamic_ncols=True, desc="train")
    last: dict[str, float] = {}
    pending: tuple[int, dict] | None = None
    clock = time.perf_counter()

    def finish(step: int, metrics: dict, extra: dict[str, float] | None = None) -> None:
        """Fetch one step's metrics (normally a step behind the dispatch), log them with any
        callback scalars, and apply the NaN guard."""
        nonlocal clock, last
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        host["step_time_s"] = now - clock
        host["images_per_s"] = images / max(host["step_time_s"], 1e-9)
        clock, last = now, host
        bar.update(1)
        bar.set_postfix(loss=f"{host['loss']:.4g}", lr=f"{host['lr']:.3g}",
                        step_s=f"{host['step_time_s']:.3f}", img_s=f"{host['images_per_s']:.1f}")
        if extra or _due(step, int(config.log_every), total):
            writer.write(step, {**host, **(extra or {})})
        if host["nan_streak"] >= max_streak:
            raise TrainingDiverged(
                f"step {step}: {int(host['nan_streak'])} updates in a row had a non-finite loss or gradient "
                f"(nan_guard.max_consecutive={max_streak}; {int(host['nan_skips'])} skipped in total). "
                f"Latest checkpoint: step {checkpointer.latest_step()} in {checkpointer.directory}; lower the "
                f"learning rate or check the data before resuming."
            )

    def callbacks(step: int) -> dict[str, float]:
        """Run the task's sample / eval hooks that are due at `step`; their scalars, prefixed."""
        scalars: dict[str, float] = {}
        rng = jax.random.fold_in(jax.random.key(int(config.seed)), step)
        for every, name, prefix in ((config.get("sample_every", 0), "sample", "sample_"),
                                    (config.get("eval_every", 0), "evaluate", "eval_")):
            hook = getattr(run.task, name, None)
            if hook is None or not _due(step, int(every), total):
                continue
            trainable, frozen_module = _modules(run, state, frozen)
            scalars.update({prefix + k: float(v) for k, v in (hook(trainable, frozen_module, step, workdir, rng) or {}).items()})
        return scalars

    flag = PreemptionFlag()
    preempted = False
    with flag.installed():
        for step in range(start + 1, total + 1):
            batch = next(batches)
            arrays = {k: v for k, v in batch.items() if isinstance(v, jax.Array)}
            state, metrics = step_fn(state, frozen, arrays)
            if pending is not None:
                finish(*pending)
            pending = (step, metrics)
            preempted = flag.is_set()
            save = preempted or _due(step, int(config.checkpoint_every), total)
            hooks = any(_due(step, int(config.get(k, 0)), total) for k in ("sample_every", "eval_every"))
            if save or hooks:
                finish(step, metrics, callbacks(step) if hooks else None)
                pending = None
            if save:
                checkpointer.save(step, state, batches.get_state(), cfg, {"preempted": preempted})
            if preempted:
                log.warning("signal %s at step %d: checkpoint saved, stopping", flag.signal, step)
                break
        if pending is not None:
            finish(*pending)
        checkpointer.wait()
    bar.close()
    return RunResult(step=int(jax.device_get(state.step)), preempted=preempted, last_metrics=last)
