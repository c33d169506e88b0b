"""The training loop: builds the run from its config, resumes from the latest checkpoint, steps,
logs, calls the task's sample/eval hooks, saves on schedule and on SIGTERM/SIGINT.

Work directory (see docs/training.md):

    WORKDIR/config.json           resolved config of the latest start
    WORKDIR/metrics.jsonl         one JSON object per logged step ("step", "loss", task metrics, ...)
    WORKDIR/tensorboard/          TensorBoard event files (tensorboardX)
    WORKDIR/checkpoints/<step>/   orbax checkpoints: state, data iterator state, config, metadata
    WORKDIR/samples/              whatever the task's sample hook writes
    WORKDIR/compilation_cache/    JAX's persistent compilation cache (sga_jax.train.compile_cache)
    WORKDIR/probe/                the feature-drift probe's batch and reference (sga_jax.stages.probe)
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
from sga_jax.train import compile_cache, optim, state as state_lib, step as step_lib
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
        if self.path.exists():  # a fresh start (resume_step 0) keeps nothing, not even a step-0 record
            lines = self.path.read_text().splitlines() if resume_step else []
            kept = [line for line in lines if _step_of(line) <= resume_step]
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
        """Flush and close the TensorBoard writer."""
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


def format_bytes(n: float) -> str:
    """A byte count in binary units with one decimal: 5.6 GiB."""
    unit = 0
    while n >= 1024 and unit < 4:
        n, unit = n / 1024, unit + 1
    return f"{n:.1f} {('B', 'KiB', 'MiB', 'GiB', 'TiB')[unit]}"


def describe_memory(estimate: dict[str, int]) -> str:
    """One line per part of the per-device memory estimate."""
    return "\n".join(f"  {name:<12}{format_bytes(size):>12}" for name, size in estimate.items())


@dataclasses.dataclass
class Run:
    """A run's pieces, built from its config without allocating parameters."""

    config: ml_collections.ConfigDict
    task: Task
    mesh: jax.sharding.Mesh
    rules: dict
    optimizer: Any
    schedules: dict[str, Any]
    setup: state_lib.Setup
    step_fn: step_lib.StepFn | None = dataclasses.field(default=None, repr=False)  # set by jitted_step


def build_run(config: ml_collections.ConfigDict, devices: list[jax.Device] | None = None) -> Run:
    """Validate the config, build the mesh (over `devices`, default all), the task, the optimizer
    and the abstract sharded state."""
    config_lib.validate_config(config)
    mesh = parallel.make_mesh(config.mesh, devices)
    rules = parallel.resolve_rules(config.sharding_rules)
    parallel.check_batch_layout(mesh, rules)
    processes = len({d.process_index for d in mesh.devices.flat})  # the target's hosts, also when planning
    config_lib.validate_for_mesh(config, parallel.batch_shards(mesh, rules), processes)
    task = get_task(config.task, config)
    param_groups = getattr(task, "param_groups", None)
    labels = param_groups(state_lib.abstract_params(task, config)) if param_groups is not None else None
    optimizer, schedules = optim.make_optimizer(config.optimizer, config.total_steps, labels)
    setup = state_lib.make_setup(task, config, optimizer, mesh, rules)  # abstract: runs on any device list
    return Run(config, task, mesh, rules, optimizer, schedules, setup)


def dry_run_report(run: Run, config_arg: str = "CONFIG") -> str:
    """Mesh, parameter count and per-device memory of a run (what `--dry_run` prints), with the
    planner command that adds gradients, activations and the peak on a real target."""
    params = run.setup.abstract_state.params
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    lines = [
        f"task {run.config.task}: {count:,} trainable parameters",
        f"mesh {dict(run.mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
        f"{jax.process_count()} process(es)",
        "memory per device (parameters, optimizer state, EMA, frozen incl. a LoRA's base; activations not included):",
        describe_memory(state_lib.memory_estimate(run.setup)),
        "gradients, activations and the peak: compile the step for the hardware with",
        f"  python -m sga_jax.plan --config {config_arg} --target h100x8|v5p-16|cpu|... [--all_buckets]",
    ]
    return "\n".join(lines)


def jitted_step(run: Run) -> step_lib.StepFn:
    """The run's train step, jitted with its shardings; call it (and trace it) inside
    `parallel.activation_sharding(run.mesh, run.rules)`. Built once per run, so later `train`
    calls given the same run reuse the compiled step."""
    if run.step_fn is None:
        config = run.config
        step = step_lib.make_train_step(
            run.task, run.setup.graphs, run.optimizer, run.schedules,
            compute_dtype=config.precision.compute_dtype,
            grad_accum_steps=config.optimizer.grad_accum_steps,
            ema_decay=float(config.optimizer.ema_decay),
            mesh=run.mesh, rules=run.rules,
        )
        run.step_fn = step_lib.jit_train_step(step, run.setup)
    return run.step_fn


class StepExecutables:
    """The jitted train step compiled ahead of time for each batch signature it meets (the first
    step, then each new bucket shape), so that compiling is a phase of its own, timed apart from
    the steps. The state and frozen inputs keep their shardings from step to step; the batch's
    shapes, dtypes and shardings make the signature."""

    def __init__(self, step: Any):
        self.step = step
        self.compiled: dict[Any, Any] = {}

    @staticmethod
    def signature(batch: dict[str, jax.Array]) -> Any:
        leaves, tree = jax.tree.flatten(batch)
        return tree, tuple((x.shape, x.dtype, x.sharding) for x in leaves)

    def ready(self, batch: dict[str, jax.Array]) -> bool:
        """Whether the step for this batch's signature is compiled."""
        return self.signature(batch) in self.compiled

    def compile(self, state: state_lib.TrainState, frozen: Any, batch: dict[str, jax.Array]) -> float:
        """Trace and compile the step for this batch's signature; returns the seconds it took."""
        start = time.perf_counter()
        self.compiled[self.signature(batch)] = self.step.lower(state, frozen, batch).compile()
        return time.perf_counter() - start

    def __call__(self, state: state_lib.TrainState, frozen: Any, batch: dict[str, jax.Array]) -> Any:
        return self.compiled[self.signature(batch)](state, frozen, batch)


def _modules(run: Run, state: state_lib.TrainState,
             frozen: state_lib.FrozenState) -> tuple[nnx.Module, nnx.Module | None]:
    params = state.ema if state.ema is not None else state.params
    trainable = state_lib.merge_trainable(run.setup.graphs.trainable, params, frozen, state.model_state)
    return trainable, state_lib.merge_frozen(run.setup.graphs, frozen)


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
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
    log.info("mesh %s; memory per device before activations:\n%s",
             dict(run.mesh.shape), describe_memory(state_lib.memory_estimate(run.setup)))
    ck = config.checkpoint
    checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=ck.max_to_keep,
                                keep_period=ck.keep_period, async_save=ck.async_save)
    flag = PreemptionFlag()  # installed before restoring and compiling: a signal then stops after one step
    cache = compile_cache.cache_directory(config, workdir)
    try:
        with flag.installed(), compile_cache.persistent_cache(cache), parallel.activation_sharding(run.mesh, run.rules):
            return _Loop(run, workdir, checkpointer, flag).loop()
    finally:
        checkpointer.close()


class _Loop:
    """One call of `train`: restore or initialise, then step, log, call hooks, save."""

    def __init__(self, run: Run, workdir: Path, checkpointer: Checkpointer, flag: PreemptionFlag):
        config = run.config
        self.run, self.config, self.workdir, self.checkpointer, self.flag = run, config, workdir, checkpointer, flag
        self.total = int(config.total_steps)
        self.batches = run.task.batches(config, run.mesh, seed=int(config.seed))
        self.start = checkpointer.latest_step() or 0
        if self.start == 0:
            state = state_lib.init_state(run.task, config, run.optimizer, run.setup)
            self.state = state_lib.load_pretrained(run.task, state, run.setup)
        else:
            target = state_lib.with_shardings(run.setup.abstract_state, run.setup.state_shardings)
            self.state, data_state, _, _ = checkpointer.restore(self.start, target)
            self.batches.set_state(data_state)
            log.info("resumed from %s at step %d", checkpointer.directory, self.start)
        self.frozen = state_lib.init_frozen(run.task, config, run.setup)
        self.steps = StepExecutables(jitted_step(run))
        self.images = int(config.batch_size) * int(getattr(run.task, "images_per_example", 1))
        self.last: dict[str, float] = {}
        self.compile_total = 0.0
        self.bar = tqdm(total=self.total, initial=self.start, dynamic_ncols=True, desc="train",
                        disable=not (config.logging.progress_bar and jax.process_index() == 0))
        self.clock = time.perf_counter()  # after the bar's own clock started: pauses never exceed its time
        self.writer = MetricWriter(workdir, resume_step=self.start, tensorboard=config.logging.tensorboard)
        self.on_start()

    def loop(self) -> RunResult:
        """Steps from the restored step to `total_steps`, or until a signal."""
        config, pending, preempted = self.config, None, False
        try:
            for step in range(self.start + 1, self.total + 1):
                batch = next(self.batches)
                if step == self.start + 1:  # the first batch warms the input pipeline up: not a step
                    self.pause(time.perf_counter() - self.clock)
                arrays = {k: v for k, v in batch.items() if isinstance(v, jax.Array)}
                compile_s = 0.0
                if not self.steps.ready(arrays):
                    if pending is not None:  # let the previous step finish first: it is timed alone
                        self.finish(*pending)
                        pending = None
                    compile_s = self.compile(arrays)
                self.state, metrics = self.steps(self.state, self.frozen, arrays)
                if pending is not None:
                    self.finish(*pending)  # the previous step's metrics, while this one runs
                pending = (step, metrics, None, compile_s)
                preempted = self.flag.is_set()
                save = preempted or _due(step, int(config.checkpoint_every), self.total)
                hooks = any(_due(step, int(config.get(k, 0)), self.total) for k in ("sample_every", "eval_every"))
                if save or hooks:
                    self.finish(step, metrics, self.callbacks(step) if hooks else None, compile_s)
                    pending = None
                if save:
                    self.checkpointer.save(step, self.state, self.batches.get_state(), config.to_dict(),
                                           {"preempted": preempted})
                if preempted:
                    log.warning("signal %s at step %d: checkpoint saved, stopping", self.flag.signal, step)
                    break
            if pending is not None:
                self.finish(*pending)
            self.checkpointer.wait()
        finally:
            self.bar.close()
            self.writer.close()
        return RunResult(step=int(jax.device_get(self.state.step)), preempted=preempted, last_metrics=self.last)

    def compile(self, batch: dict[str, jax.Array]) -> float:
        """Compile the step for a new batch signature as a phase of its own: the bar says so while
        it runs, and neither the step times nor the bar's rate and ETA count it. Returns its seconds."""
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in batch.items())
        self.bar.set_description_str("compiling", refresh=True)
        seconds = self.steps.compile(self.state, self.frozen, batch)
        self.compile_total += seconds
        self.pause(seconds)
        self.bar.set_description_str("train", refresh=False)
        log.info("compiled the train step for %s in %.1f s", shapes, seconds)
        return seconds

    def pause(self, seconds: float) -> None:
        """Leave the last `seconds` out of the step times and of the bar's elapsed time, rate and
        ETA (tqdm's `unpause`, but for exactly that span)."""
        self.clock += seconds
        if not self.bar.disable:
            self.bar.start_t += seconds
            self.bar.last_print_t += seconds

    def finish(self, step: int, metrics: dict, extra: dict[str, float] | None = None, compile_s: float = 0.0) -> None:
        """Fetch one step's metrics, log them with any callback scalars, and apply the NaN guard.

        step_time_s is the step's wall time without compilation; a step that needed a new
        executable also records `compile_s`, the seconds spent tracing and compiling it."""
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        host["step_time_s"] = now - self.clock
        host["images_per_s"] = self.images / max(host["step_time_s"], 1e-9)
        if compile_s:
            host["compile_s"] = compile_s
        self.clock, self.last = now, host
        self.bar.update(1)
        terms = {k: f"{v:.4g}" for k, v in host.items() if k.startswith(("loss_", "lambda_"))}  # the task's terms
        self.bar.set_postfix(loss=f"{host['loss']:.4g}", **terms, lr=f"{host['lr']:.3g}",
                             step_s=f"{host['step_time_s']:.3f}", img_s=f"{host['images_per_s']:.1f}",
                             compile_s=f"{self.compile_total:.1f}")
        if extra or _due(step, int(self.config.log_every), self.total):
            self.writer.write(step, {**host, **(extra or {})})
        max_streak = int(self.config.nan_guard.max_consecutive)
        if host["nan_streak"] >= max_streak:
            raise TrainingDiverged(
                f"step {step}: {int(host['nan_streak'])} updates in a row had a non-finite loss or gradient "
                f"(nan_guard.max_consecutive={max_streak}; {int(host['nan_skips'])} skipped in total). "
                f"Latest checkpoint: step {self.checkpointer.latest_step()} in {self.checkpointer.directory}; "
                f"lower the learning rate or check the data before resuming."
            )

    def hook_rng(self, step: int) -> jax.Array:
        """The key every hook gets at `step`: the run's seed folded with the step."""
        return jax.random.fold_in(jax.random.key(int(self.config.seed)), step)

    def on_start(self) -> None:
        """Run the task's start hook, if any, and log its scalars at the start step."""
        hook = getattr(self.run.task, "start", None)
        if hook is None:
            return
        trainable, frozen = _modules(self.run, self.state, self.frozen)
        values = hook(trainable, frozen, self.start, self.workdir, self.hook_rng(self.start)) or {}
        if values:
            self.writer.write(self.start, {"eval_" + k: float(v) for k, v in values.items()})

    def callbacks(self, step: int) -> dict[str, float]:
        """Run the task's sample / eval hooks that are due at `step`; their scalars, prefixed."""
        scalars: dict[str, float] = {}
        rng = self.hook_rng(step)
        for every, name, prefix in ((self.config.get("sample_every", 0), "sample", "sample_"),
                                    (self.config.get("eval_every", 0), "evaluate", "eval_")):
            hook = getattr(self.run.task, name, None)
            if hook is None or not _due(step, int(every), self.total):
                continue
            trainable, frozen = _modules(self.run, self.state, self.frozen)
            values = hook(trainable, frozen, step, self.workdir, rng) or {}
            scalars.update({prefix + k: float(v) for k, v in values.items()})
        return scalars
