"""LPIPS (VGG16, v0.1) over image pairs: the perceptual column of the paper's Table 2.

The network is `sga_jax.models.lpips` (`lpips.load(trunk, lin)`); lower is closer.
"""

from __future__ import annotations

import functools
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sga_jax.models import lpips


@functools.partial(jax.jit, static_argnums=0)
def _distances(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array, references: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(images, references)


def lpips_distance(model: lpips.LPIPS, images: jax.Array, references: jax.Array) -> jax.Array:
    """LPIPS distance (B,) between two batches of [-1, 1] images (B, H, W, 3), jitted per shape."""
    graphdef, state = nnx.split(model)
    return _distances(graphdef, state, jnp.asarray(images), jnp.asarray(references))


def mean_lpips(model: lpips.LPIPS, pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean LPIPS over every image of `pairs`, batches (images, references) of [-1, 1] images; batches
    may differ in size and resolution. Accumulated in float64."""
    total, count = 0.0, 0
    for images, references in pairs:
        distances = np.asarray(lpips_distance(model, images, references), np.float64)
        total += float(distances.sum())
        count += distances.size
    if not count:
        raise ValueError("mean_lpips: no image pairs were given")
    return total / count
