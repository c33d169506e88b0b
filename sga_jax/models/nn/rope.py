"""Rotary position embeddings: Flux's axial RoPE and the rotation of queries and keys."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def rope_angles(positions: jax.Array, dim: int, theta: float) -> jax.Array:
    """Rotary angles `positions[..., None] * theta^(-2j/dim)`, j < dim/2, in float32: (..., dim/2)."""
    if dim % 2:
        raise ValueError(f"rotary dimension must be even, got {dim}")
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    return positions.astype(jnp.float32)[..., None] * inv_freq


def axial_rope(ids: jax.Array, axes_dim: Sequence[int], theta: float) -> tuple[jax.Array, jax.Array]:
    """N-d rotary embedding as in Flux: each position axis rotates its own slice of the head dim.

    Args:
      ids: (B, L, n_axes) integer or float positions.
      axes_dim: rotary dims per axis (even, summing to the head dim).
    Returns:
      (cos, sin), each (B, L, head_dim / 2), for `apply_rope(..., interleaved=True)`.
    """
    if ids.shape[-1] != len(axes_dim):
        raise ValueError(f"ids have {ids.shape[-1]} position axes but axes_dim={tuple(axes_dim)}")
    angles = jnp.concatenate([rope_angles(ids[..., i], d, theta) for i, d in enumerate(axes_dim)], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, *, interleaved: bool) -> jax.Array:
    """Rotate (B, L, H, D) by angles whose cos/sin are (B, L, D/2) or (L, D/2), in float32.

    interleaved=True rotates adjacent pairs (x[2j], x[2j+1]) (Flux / BFL); False rotates the two
    halves (x[j], x[j + D/2]) as Hugging Face's `rotate_half` does (DINOv3).
    """
    cos = cos[..., None, :]
    sin = sin[..., None, :]
    x32 = x.astype(jnp.float32)
    if interleaved:
        pairs = x32.reshape(*x.shape[:-1], -1, 2)
        even, odd = pairs[..., 0], pairs[..., 1]
        out = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1).reshape(x.shape)
    else:
        first, second = jnp.split(x32, 2, axis=-1)
        out = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return out.astype(x.dtype)
