"""What to change when a step does not fit: the usual levers, in the order they cost least.

1. remat: recompute more of each block in the backward pass (the task's `plan_levers["remat"]`
   key; policies from keeping dot outputs to recomputing everything);
2. gradient accumulation: fewer examples per device at a time (`optimizer.grad_accum_steps`);
3. FSDP width: shard parameters and optimizer state over more devices (`mesh.fsdp`);
4. attention: the memory-efficient implementation of the platform (the task's
   `plan_levers["attention"]` key: cuDNN's fused kernel on NVIDIA GPUs, the Pallas splash kernel
   on TPUs, chunked anywhere).

The planner tries each lever's values from the mildest; when none fits, the setting that lowered
the peak most stays and the next lever is added to it. The first set of overrides whose compiled
step fits is the answer, printed as `--config.key=value` flags `python -m sga_jax.train` accepts.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

import ml_collections

from sga_jax import parallel
from sga_jax.errors import ConfigError

Overrides = dict[str, Any]

# `sga_jax.models.nn.stack.REMAT_POLICIES` from keeping every activation to recomputing all of them.
REMAT_BY_STRENGTH = ("none", "dots", "dots_no_batch", "full")

# The planner's memory-efficient attention per platform, mildest change first ("xla" keeps the
# probabilities of every layer for the backward pass and is never suggested).
ATTENTION_BY_PLATFORM = {"gpu": ("cudnn", "chunked"), "tpu": ("splash", "chunked"), "cpu": ("chunked",)}


def get_key(config: ml_collections.ConfigDict, key: str) -> Any:
    """The value at a dotted key of `config`; a ConfigError names the key."""
    node: Any = config
    for part in key.split("."):
        if part not in node:
            raise ConfigError(f"config has no key {key!r}")
        node = node[part]
    return node


def with_overrides(config: ml_collections.ConfigDict, overrides: Overrides) -> ml_collections.ConfigDict:
    """A copy of `config` with each dotted key set to its value (as `--config.key=value` does)."""
    new = config.copy_and_resolve_references()
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = new
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"config has no key {key!r}")
        node[leaf] = value
    return new


def _flag_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, tuple):  # a Python literal config_flags parses: ("fsdp","data")
        return "(" + ",".join(json.dumps(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def as_flags(overrides: Overrides) -> str:
    """`--config.key=value` flags for the command line, quoted for a POSIX shell."""
    return " ".join(shlex.quote(f"--config.{key}={_flag_value(value)}") for key, value in overrides.items())


def _remat(config: ml_collections.ConfigDict, key: str | None) -> list[Overrides]:
    if key is None:
        return []
    current = get_key(config, key)
    stronger = REMAT_BY_STRENGTH[REMAT_BY_STRENGTH.index(current) + 1:] if current in REMAT_BY_STRENGTH else ()
    return [{key: policy} for policy in stronger]


def _grad_accum(config: ml_collections.ConfigDict, batch_shards: int) -> list[Overrides]:
    per_shard = int(config.batch_size) // batch_shards
    current = int(config.optimizer.grad_accum_steps)
    steps = [k for k in range(current + 1, per_shard + 1) if per_shard % k == 0 and (k & (k - 1)) == 0]
    return [{"optimizer.grad_accum_steps": k} for k in steps]


def _fsdp(config: ml_collections.ConfigDict, mesh_shape: dict[str, int], num_devices: int) -> list[Overrides]:
    current, tensor = mesh_shape["fsdp"], mesh_shape["tensor"]
    widths = [w for w in range(current + 1, num_devices // tensor + 1) if (num_devices // tensor) % w == 0]
    return [{"mesh.data": -1, "mesh.fsdp": w} for w in widths]


def _attention(config: ml_collections.ConfigDict, key: str | None, platform: str) -> list[Overrides]:
    if key is None:
        return []
    current = get_key(config, key)
    return [{key: name} for name in ATTENTION_BY_PLATFORM.get(platform, ("chunked",)) if name != current]


def levers(config: ml_collections.ConfigDict, task: Any, mesh_shape: dict[str, int], num_devices: int,
           platform: str) -> list[tuple[str, list[Overrides]]]:
    """The levers that apply to `config` on a mesh of `mesh_shape` over `num_devices` devices of
    `platform`, in the order they are tried, each with its values from mildest to strongest."""
    keys = dict(getattr(task, "plan_levers", {}) or {})
    rules = parallel.resolve_rules(config.sharding_rules)
    batch_shards = 1
    for axis in rules.get("batch", ()):
        batch_shards *= mesh_shape[axis]
    found = [("remat", _remat(config, keys.get("remat"))),
             ("gradient accumulation", _grad_accum(config, batch_shards)),
             ("FSDP width", _fsdp(config, mesh_shape, num_devices)),
             ("attention", _attention(config, keys.get("attention"), platform))]
    return [(name, values) for name, values in found if values]
