"""The train state, its shardings, and sharded initialisation that never builds the model on one device.

Modules are split once (`nnx.split`) into static graph definitions (`Graphs`) and pure dicts of
arrays; the state holds only arrays, so it jits, donates and checkpoints as a plain pytree. What
does not train (`FrozenState`: the frozen module and the trainable module's `nn.Frozen` weights,
such as the base weights under a LoRA) is neither checkpointed nor donated; it is loaded on every
start.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding

from sga_jax import parallel
from sga_jax.errors import CheckpointError
from sga_jax.models import nn
from sga_jax.train.task import Task


@struct.dataclass
class TrainState:
    """Everything that changes during training and is checkpointed.

    step: iterations run (int32, also counts skipped ones); params: trainable `nnx.Param`s (fp32
    master copy, pure dict); model_state: the trainable module's other variables, carried unchanged;
    opt_state: optimizer state over `params` only; ema: EMA of `params` or None; rng: raw uint32 key
    data (per-step keys are `fold_in(rng, step)`); nan_skips / nan_streak: updates skipped for a
    non-finite loss or gradient, in total and in a row.
    """

    step: jax.Array
    params: dict
    model_state: dict
    opt_state: optax.OptState
    ema: dict | None
    rng: jax.Array
    nan_skips: jax.Array
    nan_streak: jax.Array


@struct.dataclass
class FrozenState:
    """What the step uses but does not train or checkpoint: `trainable`, the pure dict of the
    trainable module's `nn.Frozen` variables ({} when it has none), and `module`, the frozen
    module's variables (None without a frozen module)."""

    trainable: dict
    module: dict | None


@dataclasses.dataclass(frozen=True)
class Graphs:
    """Static graph definitions to `nnx.merge` the state's dicts back into modules."""

    trainable: nnx.GraphDef
    frozen: nnx.GraphDef | None


@dataclasses.dataclass(frozen=True)
class Setup:
    """The abstract shapes and shardings of a run, computed without allocating any parameter."""

    graphs: Graphs
    abstract_state: TrainState
    state_shardings: TrainState
    abstract_frozen: FrozenState
    frozen_shardings: FrozenState


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Cast the floating-point leaves of `tree` to `dtype` (integers and keys untouched)."""

    def cast(x: Any) -> Any:
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, tree)


def split_module(module: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
    """(graphdef, Param state, `nn.Frozen` state, all other state) of a trainable module."""
    return nnx.split(module, nnx.Param, nn.Frozen, ...)


def merge_trainable(graphdef: nnx.GraphDef, params: Any, frozen: FrozenState, model_state: Any) -> nnx.Module:
    """The trainable module from its parameters, its frozen weights (no gradient flows into them) and
    its other variables."""
    return nnx.merge(graphdef, params, jax.lax.stop_gradient(frozen.trainable), model_state)


def merge_frozen(graphs: Graphs, frozen: FrozenState) -> nnx.Module | None:
    """The frozen module (None when the task has none); no gradient flows into it."""
    return None if graphs.frozen is None else nnx.merge(graphs.frozen, jax.lax.stop_gradient(frozen.module))


def _build(task: Task, config: Any, key: jax.Array) -> tuple[nnx.Module, nnx.Module | None]:
    """The task's modules from a concrete `key` (drawn eagerly, even inside a trace: `nn.construction_rngs`)."""
    return task.build(config, nn.construction_rngs(key))


def abstract_params(task: Task, config: Any) -> dict:
    """The pure dict of the trainable module's parameters as ShapeDtypeStructs (nothing allocated)."""
    trainable, _ = nnx.eval_shape(lambda: _build(task, config, jax.random.key(0)))
    return nnx.to_pure_dict(nnx.state(trainable, nnx.Param))


def make_setup(task: Task, config: Any, optimizer: optax.GradientTransformation, mesh: Mesh, rules: dict) -> Setup:
    """Abstract train state and frozen state, with the shardings their logical axes give on `mesh`.

    Optimizer moments take their parameter's sharding; scalar counters are replicated.
    """
    trainable, frozen = nnx.eval_shape(lambda: _build(task, config, jax.random.key(0)))
    t_graph, t_params, t_frozen, t_rest = split_module(trainable)
    param_sh = parallel.state_shardings(t_params, mesh, rules)
    rest_sh = parallel.state_shardings(t_rest, mesh, rules)
    params = nnx.to_pure_dict(t_params)
    opt_state = jax.eval_shape(optimizer.init, params)
    rep = parallel.replicated(mesh)
    masked = optax.transforms.MaskedNode
    opt_sh = optax.tree_map_params(  # a parameter group's state holds MaskedNode for other groups' leaves
        optimizer,
        lambda leaf, sharding: leaf if isinstance(leaf, masked) else sharding,
        opt_state,
        param_sh,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, (NamedSharding, masked)),
    )
    ema_on = float(config.optimizer.ema_decay) > 0
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    abstract = TrainState(
        step=scalar,
        params=params,
        model_state=nnx.to_pure_dict(t_rest),
        opt_state=opt_state,
        ema=params if ema_on else None,
        rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
        nan_skips=scalar,
        nan_streak=scalar,
    )
    shardings = TrainState(
        step=rep, params=param_sh, model_state=rest_sh, opt_state=opt_sh,
        ema=param_sh if ema_on else None, rng=rep, nan_skips=rep, nan_streak=rep,
    )
    f_graph, f_state = nnx.split(frozen) if frozen is not None else (None, None)
    abstract_frozen = FrozenState(trainable=nnx.to_pure_dict(t_frozen),
                                  module=nnx.to_pure_dict(f_state) if frozen is not None else None)
    frozen_shardings = FrozenState(
        trainable=parallel.state_shardings(t_frozen, mesh, rules),
        module=parallel.state_shardings(f_state, mesh, rules) if frozen is not None else None,
    )
    return Setup(Graphs(t_graph, f_graph), abstract, shardings, abstract_frozen, frozen_shardings)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying their target shardings (what orbax restores into)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def model_key(seed: jax.Array | int) -> jax.Array:
    """The key `task.build` gets for random initialisation, from `config.seed` (an int or the raw
    key data of `jax.random.key(seed)`); tasks that initialise frozen parts themselves use it too,
    so those parts equal what the engine's own initialisation would give."""
    key = jax.random.key(seed) if isinstance(seed, int) else jax.random.wrap_key_data(seed)
    return jax.random.split(key)[0]


def init_state(task: Task, config: Any, optimizer: optax.GradientTransformation, setup: Setup) -> TrainState:
    """Initialise the train state from `config.seed` directly into its shardings (one jit)."""

    seed = jax.random.key_data(jax.random.key(int(config.seed)))
    key, train_key = model_key(seed), jax.random.split(jax.random.wrap_key_data(seed))[1]

    def init() -> TrainState:
        trainable, _ = _build(task, config, key)
        _, params, _, rest = split_module(trainable)
        params = nnx.to_pure_dict(params)
        zero = jnp.zeros((), jnp.int32)
        return TrainState(
            step=zero,
            params=params,
            model_state=nnx.to_pure_dict(rest),
            opt_state=optimizer.init(params),
            ema=jax.tree.map(jnp.copy, params) if setup.abstract_state.ema is not None else None,
            rng=jax.random.key_data(train_key),
            nan_skips=zero,
            nan_streak=zero,
        )

    return jax.jit(init, out_shardings=setup.state_shardings)()


def load_pretrained(task: Task, state: TrainState, setup: Setup) -> TrainState:
    """Replace the freshly initialised trainable parameters by `task.load_pretrained(params,
    shardings)` when the task has that hook (fine-tuning); the EMA starts from the loaded values.

    Called on a fresh start only (a resumed run has its parameters in the checkpoint). The
    returned tree must match the model's parameters key for key, shape for shape.
    """
    load = getattr(task, "load_pretrained", None)
    if load is None:
        return state
    params = load(state.params, setup.state_shardings.params)
    check_tree(params, setup.abstract_state.params, "task.load_pretrained")
    # Fresh buffers in the target shardings: the state is donated to the train step, so params and
    # EMA must not share buffers with each other or with anything the task keeps.
    copy = jax.jit(lambda tree: jax.tree.map(lambda p, a: jnp.array(p, a.dtype, copy=True), tree, setup.abstract_state.params),
                   out_shardings=setup.state_shardings.params)
    params = copy(params)
    return state.replace(params=params, ema=copy(params) if state.ema is not None else None)


def check_tree(tree: Any, expected: Any, what: str) -> None:
    """Raise a ValueError naming the first key whose presence or shape differs from `expected`."""
    got = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}
    want = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise CheckpointError(f"{what}: missing keys {missing[:5]}, unexpected keys {extra[:5]}")
    for key, value in want.items():
        if tuple(got[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{what}: {key} has shape {tuple(got[key].shape)}, expected {tuple(value.shape)}")


def init_frozen(task: Task, config: Any, setup: Setup) -> FrozenState:
    """The frozen variables: from `task.load_frozen` when the task has it, else from the seed (the
    same key as the trainable module, so a restart rebuilds the same values)."""
    load = getattr(task, "load_frozen", None)
    if load is not None:
        loaded = load(setup.abstract_frozen, setup.frozen_shardings)
        check_tree(loaded, setup.abstract_frozen, "task.load_frozen")
        return loaded

    key = model_key(jax.random.key_data(jax.random.key(int(config.seed))))

    def init() -> FrozenState:
        trainable, frozen = _build(task, config, key)
        module = nnx.to_pure_dict(nnx.split(frozen)[1]) if frozen is not None else None
        return FrozenState(trainable=nnx.to_pure_dict(split_module(trainable)[2]), module=module)

    return jax.jit(init, out_shardings=setup.frozen_shardings)()


def memory_estimate(setup: Setup) -> dict[str, int]:
    """Bytes per device of each part of the state (params, optimizer, EMA, other, frozen: the frozen
    module and the trainable module's frozen weights) and total."""
    s, sh = setup.abstract_state, setup.state_shardings
    parts = {
        "params": parallel.per_device_bytes(s.params, sh.params),
        "optimizer": parallel.per_device_bytes(s.opt_state, sh.opt_state),
        "ema": parallel.per_device_bytes(s.ema, sh.ema) if s.ema is not None else 0,
        "model_state": parallel.per_device_bytes(s.model_state, sh.model_state),
        "frozen": parallel.per_device_bytes(setup.abstract_frozen, setup.frozen_shardings),
    }
    parts["total"] = sum(parts.values())
    return parts
