"""Image resizing that equals PyTorch's exactly (static sizes, float32 matmuls): the bicubic
interpolation of pretrained position embeddings (DINOv2, SAM2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter `a`."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def torch_bicubic_matrix(in_size: int, out_size: int, *, antialias: bool = False) -> np.ndarray:
    """The (out_size, in_size) float64 matrix of PyTorch's 1-D bicubic resize, align_corners=False.

    Without antialias (PyTorch's default): a = -0.75, source coordinate
    `(i + 0.5) * in/out - 0.5`, four taps with indices clamped at the borders. With antialias
    (PyTorch's PIL-compatible path): a = -0.5, the kernel stretched by in/out when downsampling,
    taps truncated at the borders and the weights renormalised.
    """
    scale = in_size / out_size
    out = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    if not antialias:
        src = scale * (rows + 0.5) - 0.5
        floor = np.floor(src)
        for tap in range(-1, 3):
            index = np.clip(floor + tap, 0, in_size - 1).astype(np.int64)
            np.add.at(out, (rows, index), _cubic(src - floor - tap, -0.75))
        return out
    support = 2.0 * max(scale, 1.0)
    inv_scale = 1.0 / max(scale, 1.0)
    for i in rows:
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = np.arange(lo, hi)
        weights = _cubic((taps - center + 0.5) * inv_scale, -0.5)
        out[i, lo:hi] = weights / weights.sum()
    return out


def resize_bicubic_torch(x: jax.Array, size: tuple[int, int], *, antialias: bool = False) -> jax.Array:
    """Resize (..., H, W, C) to (..., size[0], size[1], C) exactly as PyTorch's
    `F.interpolate(mode="bicubic", align_corners=False, antialias=...)` does (pretrained position
    embeddings of DINOv2 and SAM2). Computed in float32 at full matmul precision; sizes are static.
    """
    h_in, w_in = x.shape[-3], x.shape[-2]
    if (h_in, w_in) == tuple(size):
        return x
    rows = jnp.asarray(torch_bicubic_matrix(h_in, size[0], antialias=antialias), jnp.float32)
    cols = jnp.asarray(torch_bicubic_matrix(w_in, size[1], antialias=antialias), jnp.float32)
    out = jnp.einsum(
        "oh,...hwc,pw->...opc", rows, x.astype(jnp.float32), cols, precision=jax.lax.Precision.HIGHEST
    )
    return out.astype(x.dtype)
