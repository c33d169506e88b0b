"""Activation sharding constraints by logical axis names, a no-op without a mesh."""

from __future__ import annotations

import jax
from flax.core import spmd

from sga_jax.models.nn.params import Axes


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
    """Constrain an activation's sharding by logical axis names under the active mesh and rules.

    A no-op when no mesh is set (single-device use, tests, eval_shape), so models need not know
    whether they run sharded. Rules come from `flax.core.spmd.logical_axis_rules(...)`, which
    `sga_jax.parallel` installs from the config.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    rules = dict(spmd.get_logical_axis_rules() or ())
    spec = []
    used: set[str] = set()
    for name in axes:
        target = rules.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if n in mesh.axis_names and n not in used)
        used.update(names)
        spec.append(names if len(names) > 1 else (names[0] if names else None))
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))
