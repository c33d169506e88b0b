"""The Task protocol: what one training stage supplies to the engine, and the task registry.

The engine (`sga_jax.train.loop`) owns the mesh, the train state, the optimizer, checkpoints,
logging and signals; a Task owns the models, the loss and the data. A stage is a class with:

``build(config, rngs) -> (trainable, frozen | None)``
    Construct the NNX modules. The engine calls it under `nnx.eval_shape` (to read shapes and the
    parameters' logical axes) and inside a `jax.jit` with `out_shardings` (to initialise every
    parameter directly into its shard), so it must be traceable and must not read files. Only the
    trainable module's `nnx.Param` variables get gradients and optimizer state; its other variables
    are carried unchanged. The frozen module, and the trainable module's `nn.Frozen` variables
    (weights inside a trained module that do not train, e.g. the base weights under a LoRA), get
    neither and are not checkpointed: the engine holds them in a `FrozenState` rebuilt from the
    seed, or loaded by `load_frozen`, on every start.

``loss(trainable, frozen, batch, rng, *, step) -> (loss, metrics)``
    A pure function of merged modules, a dict of arrays, a PRNG key and the iteration `step` (an
    int32 scalar array counted from 0, for terms that switch on at some step): a float32 scalar
    loss and a dict of float32 scalars (logged next to "loss", e.g. "loss_fm", "loss_sga"; the
    progress bar shows those named "loss_*" and "lambda_*"). The trainable module's parameters
    arrive cast to `config.precision.compute_dtype`; the frozen module's in the dtype `build` /
    `load_frozen` gave them. A loss with several players returns the sum of each player's
    objective, each computed with `jax.lax.stop_gradient` on the other players' parameters, so one
    gradient carries every player's own (see `param_groups`).

``batches(config, mesh, *, seed) -> iterator``
    Yields dicts of global `jax.Array`s sharded along the batch (see
    `sga_jax.parallel.host_to_global`), plus host-side values (strings) the step ignores. The
    iterator has `get_state() -> dict` and `set_state(dict)`, JSON-serialisable, saved with every
    checkpoint so a restart continues at the same example.

Optional hooks (looked up with getattr; absent means "not used"):

``configure(config)``
    Called once right after construction with the resolved config, before anything is traced:
    the place to read loss weights and other settings `loss` needs.

``param_groups(params) -> labels``
    Several players or parts with their own optimizer settings: a tree like `params` (the pure
    dict of trainable parameters, possibly abstract) whose leaves are group names, "default"
    (`config.optimizer`), a section of `config.optimizer.groups`, or "frozen" (never updated). The
    engine then builds one AdamW per group inside one optimizer state (`sga_jax.train.optim`), so
    checkpoints, EMA, sharding, resume, the NaN guard and accumulation cover every player.

``load_pretrained(params, shardings) -> dict``
    Fine-tuning: on a fresh start (never on resume), replace some or all of the randomly
    initialised trainable parameters (`params`, a pure dict of sharded arrays) by pre-trained
    weights loaded into `shardings`; the result must match `params` key for key and shape for
    shape. The EMA starts from it. The random values are alive while the hook runs, so loading
    briefly needs room for two copies of the replaced parameters.

``load_frozen(abstract, shardings) -> FrozenState``
    Load the frozen variables from files into the given shardings. `abstract` is a
    `sga_jax.train.state.FrozenState` of ShapeDtypeStructs: `.module`, the pure dict of
    `nnx.split(frozen)`'s state (None without a frozen module), and `.trainable`, the pure dict of
    the trainable module's `nn.Frozen` variables ({} when it has none); return the same structure.
    When absent both are initialised from the seed like the trainable module.

``start(trainable, frozen, step, workdir, rng) -> dict[str, float] | None``
    Called once each time training starts, after the state is initialised (with `load_pretrained`
    applied) or restored and before the first update of this start; `step` is 0 on a fresh start
    and the restored step on resume. The modules are the ones `evaluate` gets (EMA parameters when
    EMA is on; on a fresh start they equal the pre-trained parameters). The place to record what
    later evaluations compare against (the feature-drift probe, `sga_jax.stages.probe`); returned
    scalars are logged at `step` with the "eval_" prefix.

``sample(trainable, frozen, step, workdir, rng) -> dict[str, float] | None``
    Called every `config.sample_every` steps (and at the end) with the EMA parameters when EMA is on;
    writes images under `workdir/samples/` and may return scalars to log.

``evaluate(trainable, frozen, step, workdir, rng) -> dict[str, float]``
    Called every `config.eval_every` steps (and at the end), with the EMA parameters when EMA is
    on; the returned scalars are logged with an "eval_" prefix (sample's with "sample_").

``batch_shapes(config, bucket) -> dict[str, jax.ShapeDtypeStruct]``
    The global shapes and dtypes of the arrays of one batch that `batches` would yield for `bucket`
    (a (width, height) of `config.data`'s aspect buckets, or None for a task without buckets); host
    values such as captions are left out. `python -m sga_jax.plan` compiles the step on them.

``plan_levers`` (attribute, default {})
    Where the task's memory settings live, for the planner's suggestions: {"remat": "model.x.remat",
    "attention": "model.attention"} (dotted config keys; either may be absent).

``images_per_example`` (attribute, default 1)
    Used for the images/s figure of the progress bar.

A config names its task with `config.task`: a short name from `TASKS` ("toy") or a dotted path
"package.module:ClassName". The class is constructed with no arguments, then `configure(config)`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import jax
from flax import nnx
from jax.sharding import Mesh

from sga_jax.errors import ConfigError

TASKS: dict[str, str] = {
    "toy": "sga_jax.train.toy:ToyTask",
    "flux_sga": "sga_jax.stages.flux:FluxSGATask",
    "vae_sga": "sga_jax.stages.vae:VAESGATask",
}


@runtime_checkable
class BatchIterator(Protocol):
    """An iterator of batches whose position can be saved and restored."""

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def __next__(self) -> dict[str, Any]: ...

    def get_state(self) -> dict[str, Any]: ...

    def set_state(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Task(Protocol):
    """One training stage; see the module docstring for the contract of each method."""

    def build(self, config: Any, rngs: nnx.Rngs) -> tuple[nnx.Module, nnx.Module | None]: ...

    def loss(
        self, trainable: nnx.Module, frozen: nnx.Module | None, batch: dict[str, jax.Array], rng: jax.Array, *,
        step: jax.Array,
    ) -> tuple[jax.Array, dict[str, jax.Array]]: ...

    def batches(self, config: Any, mesh: Mesh, *, seed: int) -> BatchIterator: ...


def get_task(name: str, config: Any = None) -> Task:
    """Instantiate the task `name` (a key of `TASKS` or a "package.module:ClassName" path) and, when
    `config` is given and the task has the hook, call `task.configure(config)`."""
    path = TASKS.get(name, name)
    if ":" not in path:
        raise ConfigError(f"config.task={name!r}: expected one of {sorted(TASKS)} or 'package.module:ClassName'")
    module_name, class_name = path.split(":", 1)
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"config.task={name!r}: cannot import {path!r}: {e}") from e
    task = cls()
    missing = [m for m in ("build", "loss", "batches") if not callable(getattr(task, m, None))]
    if missing:
        raise ConfigError(f"config.task={name!r}: {path} lacks the Task methods {missing}")
    configure = getattr(task, "configure", None)
    if config is not None and configure is not None:
        configure(config)
    return task
