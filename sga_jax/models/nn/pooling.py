"""2-D pooling of channels-last maps with PyTorch's semantics: explicit symmetric padding, floor
mode (a window must start inside the padded map), max pooling pads with -inf, and average pooling
either counts the padded zeros (`count_include_pad=True`, PyTorch's default) or not."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _window(x: jax.Array, size: int, stride: int, padding: int) -> tuple[tuple, tuple, tuple]:
    if x.ndim != 4:
        raise ValueError(f"pooling expects (B, H, W, C), got shape {tuple(x.shape)}")
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return (1, size, size, 1), (1, stride, stride, 1), pad


def max_pool(x: jax.Array, size: int, stride: int, padding: int = 0) -> jax.Array:
    """PyTorch's `F.max_pool2d(x, size, stride, padding)` (floor mode) on (B, H, W, C)."""
    window, strides, pad = _window(x, size, stride, padding)
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, pad)


def _window_counts(length: int, size: int, stride: int, padding: int) -> np.ndarray:
    """How many real (unpadded) samples each output window covers along one axis."""
    starts = np.arange(0, length + 2 * padding - size + 1, stride) - padding
    return np.minimum(starts + size, length) - np.maximum(starts, 0)


def avg_pool(x: jax.Array, size: int, stride: int, padding: int = 0, *, count_include_pad: bool = True) -> jax.Array:
    """PyTorch's `F.avg_pool2d(x, size, stride, padding, count_include_pad=...)` on (B, H, W, C)."""
    window, strides, pad = _window(x, size, stride, padding)
    total = jax.lax.reduce_window(x, jnp.zeros((), x.dtype), jax.lax.add, window, strides, pad)
    if count_include_pad or not padding:
        return total / (size * size)
    rows = _window_counts(x.shape[1], size, stride, padding)
    cols = _window_counts(x.shape[2], size, stride, padding)
    return total / jnp.asarray(np.outer(rows, cols)[None, :, :, None], x.dtype)
