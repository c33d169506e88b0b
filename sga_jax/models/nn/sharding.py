"""Activation shardings by logical axis names under the active mesh and rules, no-ops without a mesh."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from flax.core import spmd
from jax.sharding import PartitionSpec

from sga_jax.models.nn.params import Axes


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
    """Constrain an activation's sharding by logical axis names under the active mesh and rules.

    A no-op when no mesh is set (single-device use, tests, eval_shape), so models need not know
    whether they run sharded. Rules come from `flax.core.spmd.logical_axis_rules(...)`, which
    `sga_jax.parallel` installs from the config.
    """
    spec = _logical_to_mesh(axes)
    return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


def divisible_spec(axes: Axes, shape: Sequence[int]) -> PartitionSpec | None:
    """The PartitionSpec the active mesh and rules give an array of `shape` with logical `axes`,
    keeping whole every dimension whose size the product of its mesh axes does not divide (and
    ignoring mesh axes of size 1); None without a mesh. For code that splits arrays into per-device
    blocks itself (`shard_map`), where every block must be whole."""
    return _logical_to_mesh(axes, shape)


def _logical_to_mesh(axes: Axes, shape: Sequence[int] | None = None) -> PartitionSpec | None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    rules = dict(spmd.get_logical_axis_rules() or ())
    spec = []
    used: set[str] = set()
    for dim, name in enumerate(axes):
        target = rules.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if n in mesh.axis_names and n not in used)
        if shape is not None:
            names = tuple(n for n in names if mesh.shape[n] > 1)
            if shape[dim] % math.prod(mesh.shape[n] for n in names):
                names = ()
        used.update(names)
        spec.append(names if len(names) > 1 else (names[0] if names else None))
    return PartitionSpec(*spec)
