"""Adaptive average pooling over 2-D token grids (torch `adaptive_avg_pool2d` semantics) and the
helpers that move between token sequences (B, N, C) and grids (B, h, w, C), row-major."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import einops
import jax
import jax.numpy as jnp
import numpy as np

Grid = tuple[int, int]


def _as_grid(name: str, grid: Sequence[int]) -> Grid:
    grid = tuple(int(g) for g in grid)
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"{name} must be two positive ints (height, width), got {grid}")
    return grid  # type: ignore[return-value]


def adaptive_bins(n_in: int, n_out: int) -> list[tuple[int, int]]:
    """Bin i covers [floor(i * n_in / n_out), ceil((i + 1) * n_in / n_out)) as in torch; bins may overlap."""
    return [((i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)) for i in range(n_out)]


@functools.lru_cache(maxsize=256)
def pooling_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 matrix whose row i averages bin i of `adaptive_bins`."""
    matrix = np.zeros((n_out, n_in), np.float32)
    for i, (start, stop) in enumerate(adaptive_bins(n_in, n_out)):
        matrix[i, start:stop] = 1.0 / (stop - start)
    matrix.setflags(write=False)
    return matrix


def adaptive_avg_pool(x: jax.Array, out_grid: Sequence[int]) -> jax.Array:
    """Average-pool the grid axes (-3, -2) of a channels-last array (..., H, W, C) to `out_grid`.

    Bin i along an axis of length L spans floor(i L / out) .. ceil((i + 1) L / out), exactly as
    `torch.nn.functional.adaptive_avg_pool2d` (uneven and overlapping bins, and upsampling when
    out > L, included). Accumulates in float32 and returns the input dtype.
    """
    if x.ndim < 3:
        raise ValueError(f"adaptive_avg_pool expects (..., H, W, C), got shape {tuple(x.shape)}")
    out_h, out_w = _as_grid("out_grid", out_grid)
    *lead, h, w, c = x.shape
    if h == out_h and w == out_w:
        return x
    xf = x.astype(jnp.float32)
    if h % out_h == 0 and w % out_w == 0:
        pooled = einops.reduce(xf, "... (oh bh) (ow bw) c -> ... oh ow c", "mean", oh=out_h, ow=out_w)
    else:
        rows = jnp.asarray(pooling_matrix(h, out_h))
        cols = jnp.asarray(pooling_matrix(w, out_w))
        pooled = jnp.einsum("...hwc,oh,pw->...opc", xf, rows, cols, precision=jax.lax.Precision.HIGHEST)
    return pooled.astype(x.dtype)


def tokens_to_grid(x: jax.Array, grid: Sequence[int]) -> jax.Array:
    """(B, N, C) row-major tokens -> (B, h, w, C); N must equal h * w."""
    h, w = _as_grid("grid", grid)
    if x.ndim != 3 or x.shape[1] != h * w:
        raise ValueError(f"tokens of shape {tuple(x.shape)} do not fill a {h}x{w} grid (need (B, {h * w}, C))")
    return einops.rearrange(x, "b (h w) c -> b h w c", h=h, w=w)


def grid_to_tokens(x: jax.Array) -> jax.Array:
    """(B, h, w, C) -> (B, h * w, C), row-major."""
    if x.ndim != 4:
        raise ValueError(f"grid_to_tokens expects (B, h, w, C), got shape {tuple(x.shape)}")
    return einops.rearrange(x, "b h w c -> b (h w) c")


def pool_tokens(x: jax.Array, grid: Sequence[int], out_grid: Sequence[int]) -> jax.Array:
    """(B, h*w, C) tokens on `grid` -> (B, oh*ow, C) tokens adaptively average-pooled to `out_grid`."""
    return grid_to_tokens(adaptive_avg_pool(tokens_to_grid(x, grid), out_grid))


def _round_half_up(numerator: int, denominator: int) -> int:
    return (2 * numerator + denominator) // (2 * denominator)


def grid_for_long_edge(h: int, w: int, long_edge: int) -> Grid:
    """The (height, width) grid whose longer side is `long_edge`, keeping the aspect ratio of h x w.

    The shorter side is rounded half up and kept >= 1: (64, 48, 32) -> (32, 24); (90, 160, 32) -> (18, 32).
    The diffusion stage pools generative tokens to this grid and the prior extractor resizes images
    so that their patch grid has this shape.
    """
    h, w = _as_grid("(h, w)", (h, w))
    if int(long_edge) < 1:
        raise ValueError(f"long_edge must be a positive int, got {long_edge}")
    long_edge = int(long_edge)
    longer = max(h, w)
    return max(1, _round_half_up(h * long_edge, longer)), max(1, _round_half_up(w * long_edge, longer))
