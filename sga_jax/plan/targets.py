"""Hardware the planner compiles for, by name, and the devices that stand for it on this machine.

    h100x8, h200x8, a100x8, h100x16 (2 hosts), 2xh100x8 (2 slices)   NVIDIA GPUs, 8 per host
    v4-8, v5p-16, v5e-8, v6e-8, 2xv5e-16 (2 slices), ...             TPU slices (Cloud TPU names)
    cpu                                                              this host's CPU devices: a weak proxy
    local                                                            this machine's own accelerators

GPU targets are `jax.experimental.topologies` descriptions built from a GPU target description
shipped in `gpu_specs/` (device properties in XLA's GpuTargetConfigProto text form) and need the
CUDA PJRT plugin; TPU slices come from libtpu's topology names. Neither needs the hardware; both
need `JAX_PLATFORMS=cpu` for the process (the plan command line sets it). See requirements-plan.txt.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
import math
import os
import re
from typing import Any

import jax

from sga_jax.errors import ConfigError

PLAN_REQUIREMENTS = "pip install -r requirements-plan.txt (or `make plan-deps`)"


class BackendMissing(ConfigError):
    """The packages a target's compiler lives in are not installed (the message names them)."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator family: per-device peak matrix FLOP/s by compute dtype and memory bandwidth
    (vendor figures, dense), and how its targets are built."""

    label: str
    peak_flops: dict[str, float]
    bandwidth: float  # bytes/s per device
    spec: str | None = None  # GPU: file in gpu_specs/
    topology_prefix: str | None = None  # TPU: libtpu topology name prefix ("v5", "v5e", ...)
    dims: int = 2  # TPU: torus dimensions of the topology name
    cores_per_chip: int = 1  # TPU: cores the Cloud TPU name counts per chip (v4, v5p: 2)
    chip_config: str | None = None  # TPU: libtpu chip config (v4 "megacore": one device per chip)


# GPU fp32 matmuls run as TF32 under JAX's default precision; TPU ones as one bf16 pass.
GPU_CHIPS: dict[str, Chip] = {
    "h100": Chip("NVIDIA H100 SXM 80 GB", {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 494.7e12},
                 3.35e12, spec="h100_sxm.txtpb"),
    "h200": Chip("NVIDIA H200 SXM 141 GB", {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 494.7e12},
                 4.8e12, spec="h200_sxm.txtpb"),
    "a100": Chip("NVIDIA A100 SXM 80 GB", {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
                 2.039e12, spec="a100_sxm_80.txtpb"),
}
TPU_CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", {"bfloat16": 275e12}, 1.2e12, topology_prefix="v4", dims=3, cores_per_chip=2,
               chip_config="megacore"),
    "v5p": Chip("TPU v5p", {"bfloat16": 459e12}, 2.765e12, topology_prefix="v5", dims=3, cores_per_chip=2),
    "v5e": Chip("TPU v5e", {"bfloat16": 197e12}, 0.819e12, topology_prefix="v5e"),
    "v6e": Chip("TPU v6e", {"bfloat16": 918e12}, 1.64e12, topology_prefix="v6e"),
}
GPUS_PER_HOST = 8
EXAMPLES = ("h100x8", "h200x8", "a100x8", "h100x16", "2xh100x8", "v4-8", "v5p-16", "v5e-8", "v6e-8", "2xv5e-8",
            "cpu", "local")


@dataclasses.dataclass(frozen=True)
class Target:
    """A named target: which compiler, which topology, and the figures its plan is judged by."""

    name: str
    platform: str  # "gpu", "tpu", "cpu" (simulated host devices) or "local" (this machine's devices)
    description: str
    chip: Chip | None = None
    topology: str = ""  # GPU "slices x hosts x gpus"; TPU libtpu topology name
    slices: int = 1

    @property
    def proxy(self) -> bool:
        """True for the CPU target, whose temporaries only roughly stand for an accelerator's."""
        return self.platform == "cpu"

    def peak_flops(self, compute_dtype: str) -> float | None:
        """Per-device peak matrix FLOP/s at `compute_dtype` (None when unknown)."""
        if self.chip is None:
            return None
        peaks = self.chip.peak_flops
        return peaks.get(compute_dtype, peaks["bfloat16"])

    def gpu_spec(self) -> str:
        """The GPU target description (GpuTargetConfigProto text) shipped for this target."""
        assert self.chip is not None and self.chip.spec is not None
        return importlib.resources.files("sga_jax.plan").joinpath("gpu_specs", self.chip.spec).read_text()

    def device_memory(self) -> int | None:
        """Per-device memory in bytes: a GPU's from its description, else None (TPU: the compiler's
        limit, see `compiler_memory_limit`; CPU: no limit)."""
        if self.platform != "gpu":
            return None
        return int(re.search(r"device_memory_size:\s*(\d+)", self.gpu_spec()).group(1))


def _tpu_shape(chips: int, dims: int) -> str:
    """The torus of `chips` chips that Cloud TPU names use: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...
    in three dimensions, 1x1, 1x2, 2x2, 2x4, 4x4, 4x8, ... in two."""
    if chips < 1 or chips & (chips - 1):
        raise ConfigError(f"a TPU slice has a power-of-two chip count, got {chips}")
    if dims == 3 and chips < 4:
        raise ConfigError(f"3-D TPU slices start at 4 chips, got {chips}")
    shape, axes = ([2, 2, 1], [2] + [2, 1, 0] * 8) if dims == 3 else ([1, 1], [1, 0] * 8)
    for axis in axes:
        if math.prod(shape) >= chips:
            break
        shape[axis] *= 2
    return "x".join(str(s) for s in shape)


def get_target(name: str) -> Target:
    """The target `name` (see the module docstring); a ConfigError lists examples for others."""
    key = name.strip().lower()
    if key in ("cpu", "local"):
        what = "this host's CPU devices (a weak proxy for temporaries)" if key == "cpu" else "this machine's devices"
        return Target(key, key, what)
    match = re.fullmatch(r"(?:(\d+)x)?([a-z]\w*?)(x|-)(\d+)", key)
    if match:
        slices, family, sep, count = int(match.group(1) or 1), match.group(2), match.group(3), int(match.group(4))
        if sep == "x" and family in GPU_CHIPS:
            return _gpu_target(key, GPU_CHIPS[family], count, slices)
        if sep == "-" and family in TPU_CHIPS:
            return _tpu_target(key, TPU_CHIPS[family], count, slices)
    raise ConfigError(f"unknown target {name!r}: expected a GPU target like h100x8 / h100x16 "
                     f"({', '.join(GPU_CHIPS)}), a TPU slice like v5p-16 ({', '.join(TPU_CHIPS)}), an optional "
                     f"'Nx' slice-count prefix, 'cpu' or 'local'; e.g. {', '.join(EXAMPLES)}")


def _gpu_target(name: str, chip: Chip, count: int, slices: int) -> Target:
    if count < 1 or (count > GPUS_PER_HOST and count % GPUS_PER_HOST):
        raise ConfigError(f"target {name!r}: {count} GPUs is not 1-{GPUS_PER_HOST} or a multiple of {GPUS_PER_HOST}")
    hosts, per_host = max(1, count // GPUS_PER_HOST), min(count, GPUS_PER_HOST)
    where = f"{hosts} host{'s' if hosts > 1 else ''}" + (f" x {slices} slices" if slices > 1 else "")
    return Target(name, "gpu", f"{slices * count} x {chip.label} ({where})", chip, f"{slices}x{hosts}x{per_host}",
                  slices)


def _tpu_target(name: str, chip: Chip, count: int, slices: int) -> Target:
    if count % chip.cores_per_chip:
        raise ConfigError(f"target {name!r}: {chip.label} slices count {chip.cores_per_chip} cores per chip")
    chips = count // chip.cores_per_chip
    try:
        topology = f"{chip.topology_prefix}:{_tpu_shape(chips, chip.dims)}"
    except ValueError as error:
        raise ConfigError(f"target {name!r}: {error}") from None
    where = f" x {slices} slices" if slices > 1 else ""
    return Target(name, "tpu", f"{chips * slices} x {chip.label} chips ({topology}{where})", chip, topology, slices)


def installed(module: str) -> bool:
    """True when `module` (dotted names too) can be imported."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _require(module: str, what: str, target: Target) -> None:
    if not installed(module):
        raise BackendMissing(f"target {target.name} needs {what}, which is not installed: {PLAN_REQUIREMENTS}")


def devices(target: Target) -> list[Any]:
    """The devices to build the run on: a topology's (nothing is allocated on them) or this host's."""
    if target.platform == "cpu":
        return jax.devices("cpu")
    if target.platform == "local":
        return jax.devices()
    from jax.experimental import topologies

    if target.platform == "tpu":
        _require("libtpu", "libtpu", target)
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling claims no chip: share libtpu
        kwargs = {"chip_config_name": target.chip.chip_config} if target.chip.chip_config else {}
        topology = topologies.get_topology_desc(topology_name=target.topology, platform="tpu",
                                                num_slices=target.slices, **kwargs)
        return list(topology.devices)
    _require("jax_plugins.xla_cuda12", "the CUDA PJRT plugin (jax-cuda12-plugin, jax-cuda12-pjrt)", target)
    try:
        topology = topologies.get_topology_desc(platform="cuda", target_config=target.gpu_spec(),
                                                topology=target.topology)
    except (NotImplementedError, RuntimeError) as error:
        raise BackendMissing(f"target {target.name}: the CUDA plugin could not describe the topology ({error}); "
                             "GPU targets compile without a GPU only with JAX_PLATFORMS=cpu set before JAX "
                             "starts (python -m sga_jax.plan sets it)") from error
    return list(topology.devices)


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}  # XLA prints binary units as K, M, G, T
_SIZE = r"([\d.]+)([KMGT]?)B?"
_HBM_ERRORS = (re.compile(rf"required for [\w ]+\({_SIZE}\) exceeds available HBM \({_SIZE}\)"),
               re.compile(rf"Used {_SIZE} of {_SIZE} hbm"))


def parse_hbm_error(message: str) -> tuple[int, int] | None:
    """(required, available) bytes per device from a TPU compiler's RESOURCE_EXHAUSTED message."""
    for pattern in _HBM_ERRORS:
        match = pattern.search(message)
        if match:
            need, need_unit, have, have_unit = match.groups()
            return int(float(need) * _UNITS[need_unit]), int(float(have) * _UNITS[have_unit])
    return None


def compiler_memory_limit(target: Target, device_list: list[Any]) -> int | None:
    """A TPU compiler's own per-device memory limit (HBM less what it reserves), read from the error
    of a program too large for any chip; None for other platforms."""
    if target.platform != "tpu":
        return None
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(device_list[:1], ("x",))
    huge = jax.ShapeDtypeStruct((2**38,), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    try:
        jax.jit(lambda x: x + 1).lower(huge).compile()
    except Exception as error:  # noqa: BLE001 - the compiler's error is the answer
        parsed = parse_hbm_error(str(error))
        if parsed is not None:
            return parsed[1]
        raise
    return None


def usable_memory(target: Target, device_list: list[Any], *, mem_fraction: float) -> tuple[int | None, str]:
    """Bytes one device can give the step, and how that figure came about: a GPU's memory times
    the fraction JAX preallocates (XLA_PYTHON_CLIENT_MEM_FRACTION), a TPU compiler's limit, a local
    device's allocator limit; None for simulated CPU devices."""
    if target.platform == "gpu":
        total = target.device_memory()
        return int(total * mem_fraction), f"{total / 2**30:.1f} GiB x XLA_PYTHON_CLIENT_MEM_FRACTION={mem_fraction:g}"
    if target.platform == "tpu":
        return compiler_memory_limit(target, device_list), "the TPU compiler's HBM limit"
    if target.platform == "local":
        try:
            limit = device_list[0].memory_stats().get("bytes_limit")
        except Exception:  # noqa: BLE001 - backends without memory statistics (CPU) have no limit
            limit = None
        return limit, "the device allocator's limit"
    return None, "none (simulated CPU devices; give --memory_gib to judge against a capacity)"
