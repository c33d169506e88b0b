"""Meshes, logical-to-mesh axis rules, shardings of parameter trees, and multi-process start.

Parameters carry logical axis names (`nnx.with_partitioning(init, ("embed", "mlp"),
eager_sharding=False)`); a run's config maps those names onto the mesh axes `data`, `fsdp` and
`tensor`. Everything here is a pure function of (config, mesh, abstract tree), so the same code
shards one CPU, eight simulated CPU devices or a multi-host GPU/TPU pod.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from sga_jax.errors import ConfigError

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axes (a name, a tuple of names, or None for replicated). A mesh axis is
# used at most once per array: when two dimensions of one array ask for the same mesh axis, the
# later dimension is replicated (e.g. an activation ("batch", "length", "embed") shards batch over
# (data, fsdp) and leaves embed whole).
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv": None,
    "vocab": "tensor",
    "layers": None,
    "conv_in": None,
    "conv_out": "fsdp",
}

log = logging.getLogger(__name__)


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolve mesh axis sizes (one may be -1: it takes the remaining devices) to a tuple.

    `sizes` maps each of `MESH_AXES` to a size; missing axes have size 1.
    """
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ConfigError(f"config.mesh: unknown axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
    shape = [int(sizes.get(name, 1)) for name in MESH_AXES]
    free = [i for i, s in enumerate(shape) if s == -1]
    if len(free) > 1:
        raise ConfigError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, shape))}")
    if any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"config.mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, shape))}")
    fixed = math.prod(s for s in shape if s != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(
                f"config.mesh: {dict(zip(MESH_AXES, shape))} needs a multiple of {fixed} devices, "
                f"got {num_devices}"
            )
        shape[free[0]] = num_devices // fixed
    if math.prod(shape) != num_devices:
        raise ConfigError(
            f"config.mesh: {dict(zip(MESH_AXES, shape))} has {math.prod(shape)} devices, "
            f"but {num_devices} are available"
        )
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types over `devices` (default: all devices).

    Devices of several TPU slices (a multi-slice run) are laid out so that the slices split the
    first axis whose size they divide (data, else fsdp): only that axis crosses the data-center
    network.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices == 1:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    split = next((i for i, size in enumerate(shape[:2]) if size % slices == 0), None)
    if split is None:
        raise ValueError(f"config.mesh: {dict(zip(MESH_AXES, shape))} over {slices} slices needs mesh.data or "
                         f"mesh.fsdp to be a multiple of {slices} (the axis that crosses slices)")
    dcn = tuple(slices if i == split else 1 for i in range(len(shape)))
    ici = tuple(size // d for size, d in zip(shape, dcn))
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def resolve_rules(rules: Mapping[str, Any] | None) -> dict[str, tuple[str, ...]]:
    """Normalise logical rules from a config (values: str, sequence of str, or None) and check them.

    Logical names absent from `rules` fall back to `DEFAULT_RULES`.
    """
    merged: dict[str, Any] = dict(DEFAULT_RULES)
    merged.update(dict(rules or {}))
    out: dict[str, tuple[str, ...]] = {}
    for name, target in merged.items():
        if target is None:
            axes: tuple[str, ...] = ()
        elif isinstance(target, str):
            axes = (target,)
        else:
            axes = tuple(target)
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ConfigError(f"config.sharding_rules[{name!r}]: unknown mesh axes {bad}; expected {MESH_AXES}")
        out[name] = axes
    return out


def logical_to_spec(
    logical: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, tuple[str, ...]],
) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions carry the logical names `logical`.

    A dimension stays replicated when its name is None or unknown to the rules, when its mesh
    axes are already used by an earlier dimension, or when its size does not divide evenly by
    the product of those mesh axes' sizes (so tiny test models still shard where they can).
    """
    if not logical:
        return PartitionSpec()
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not match an array of shape {tuple(shape)}")
    used: set[str] = set()
    spec: list[Any] = []
    for name, size in zip(logical, shape):
        axes = tuple(a for a in rules.get(name, ()) if mesh.shape[a] > 1) if name else ()
        if not axes or used & set(axes) or size % math.prod(mesh.shape[a] for a in axes):
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def logical_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names a variable was created with (via `nnx.with_partitioning`), or None."""
    meta = variable.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        if meta.get(key) is not None:
            return tuple(meta[key])
    return None


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, tuple[str, ...]]) -> dict:
    """NamedShardings for an (abstract) nnx.State, as a pure dict matching `nnx.to_pure_dict(state)`."""

    def one(variable: Any) -> NamedSharding:
        if not isinstance(variable, nnx.Variable):
            return NamedSharding(mesh, PartitionSpec())
        value = variable.get_value() if hasattr(variable, "get_value") else variable.value
        return NamedSharding(mesh, logical_to_spec(logical_axes(variable), value.shape, mesh, rules))

    mapped = jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(mapped) if isinstance(mapped, nnx.State) else mapped


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Mapping[str, tuple[str, ...]]) -> NamedSharding:
    """Sharding of a batch array: leading dimension over the `batch` rule's mesh axes, the rest whole."""
    axes = tuple(a for a in rules.get("batch", ()) if mesh.shape[a] > 1)
    if not axes:
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, PartitionSpec(axes[0] if len(axes) == 1 else axes))


def check_batch_layout(mesh: Mesh, rules: Mapping[str, tuple[str, ...]]) -> None:
    """Refuse the one layout seen to miscompile: batch over ("data", "fsdp") with all three mesh
    axes above 1. On XLA:CPU (jax 0.10.2) it gave Flux forward outputs off by ~10% and wrong
    gradients (tests/test_flux_sharding.py); a six-line gated residual in plain JAX reproduces it
    (tests/test_parallel.py). The same mesh with the batch over ("fsdp", "data") matches one
    device, as do meshes that leave any axis at 1."""
    batch = tuple(a for a in rules.get("batch", ()) if mesh.shape[a] > 1)
    if batch == ("data", "fsdp") and mesh.shape["tensor"] > 1:
        raise ConfigError(
            f"mesh {dict(mesh.shape)} with sharding_rules.batch=('data', 'fsdp') is refused: XLA was seen "
            "to compute wrong results for it. Set config.sharding_rules.batch=('fsdp', 'data') or leave one "
            "of data / fsdp / tensor at 1"
        )


def batch_shards(mesh: Mesh, rules: Mapping[str, tuple[str, ...]]) -> int:
    """How many ways the batch dimension is split (product of the `batch` rule's mesh axes)."""
    return math.prod(mesh.shape[a] for a in rules.get("batch", ()))


def _is_numeric(dtype: np.dtype) -> bool:
    """Booleans and numbers, ml_dtypes' (bfloat16, a NumPy "void" kind) included; not strings or objects."""
    return dtype == np.bool_ or jax.dtypes.issubdtype(dtype, np.number)


def host_to_global(local: Mapping[str, np.ndarray], mesh: Mesh, rules: Mapping[str, tuple[str, ...]]) -> dict:
    """Assemble this process's slice of a batch into global jax.Arrays sharded along `batch`.

    Each process passes its own rows (global batch / process count); non-array values (captions,
    keys) are passed through unchanged for host-side use.
    """
    out: dict[str, Any] = {}
    for key, value in local.items():
        if isinstance(value, (np.ndarray, jax.Array)) and _is_numeric(np.asarray(value).dtype):
            value = np.asarray(value)
            sharding = batch_sharding(mesh, rules)
            global_shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
            out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
        else:
            out[key] = value
    return out


def per_device_bytes(abstract: Any, shardings: Any) -> int:
    """Bytes one device holds for a tree of ShapeDtypeStructs laid out with `shardings`."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        shard = sharding.shard_shape(leaf.shape) if leaf.shape else ()
        total += int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


@dataclasses.dataclass(frozen=True)
class Cluster:
    """How this process joins a multi-process run: `kind` names the environment that was detected."""

    kind: str  # "slurm", "tpu_pod", "explicit"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def detect_cluster(environ: Mapping[str, str] | None = None) -> Cluster | None:
    """Detect a multi-process launch from environment variables; None for a single process.

    - explicit: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (any launcher);
    - Slurm: SLURM_JOB_ID with SLURM_NTASKS > 1 (one task per host or per GPU, via srun);
    - TPU pod: TPU_WORKER_HOSTNAMES listing more than one host (Cloud TPU VMs, GKE).
    For Slurm and TPU pods, `jax.distributed.initialize()` reads the rest of the environment itself.
    """
    env = os.environ if environ is None else environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not env.get(k)]
        if missing:
            raise ConfigError(f"JAX_COORDINATOR_ADDRESS is set but {missing} are not")
        return Cluster("explicit", env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"]))
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
        return Cluster("slurm")
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) > 1:
        return Cluster("tpu_pod")
    return None


def initialize_distributed(environ: Mapping[str, str] | None = None) -> Cluster | None:
    """Call `jax.distributed.initialize` when the environment describes a multi-process run.

    Must run before any other JAX call that touches devices. Returns the detected cluster (None
    for a single process, where nothing is done).
    """
    cluster = detect_cluster(environ)
    if cluster is None:
        return None
    if cluster.kind == "explicit":
        jax.distributed.initialize(cluster.coordinator_address, cluster.num_processes, cluster.process_id)
    else:
        jax.distributed.initialize()
    log.info(
        "joined %s run: process %d of %d, %d local / %d global devices",
        cluster.kind, jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )
    return cluster


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Mapping[str, tuple[str, ...]]) -> Iterator[None]:
    """Make `mesh` and `rules` the context that `sga_jax.models.nn.constrain` reads while
    tracing, so models constrain activations by logical names without knowing the mesh."""
    pairs = tuple((name, axes[0] if len(axes) == 1 else (axes or None)) for name, axes in rules.items())
    with jax.set_mesh(mesh), spmd.logical_axis_rules(pairs):
        yield
