"""Apply an image-to-image function over overlapping tiles and blend them without seams.

A tile grid is the product of one plan per spatial axis: tiles of `tile` pixels whose neighbours
share at least `overlap` pixels, the last one flush with the far edge. Within a shared band the
tiles cross-fade linearly over its middle half, and a tile's outer quarter next to a neighbour is
never used (its border effects are cropped); the weights are normalised per axis so that they
sum to one at every output pixel (the grid is a product, so the 2-D weights do too). Pixels
covered by one tile keep its value exactly, and an operation whose receptive field is at most a
quarter of the overlap comes out exactly as if applied to the whole image.

The tiles run in a `lax.scan`, so the function compiles once and the working memory is that of one
tile plus the float32 output.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def tile_starts(size: int, tile: int, overlap: int, align: int = 1) -> tuple[list[int], int]:
    """Tile origins along one axis and the tile length (the whole axis when it fits in one tile).

    Uses the fewest tiles whose neighbours share at least `overlap` pixels, spread evenly, the
    last flush with the far edge; origins are multiples of `align` (`size - tile` must be too).
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"need 0 <= overlap < tile, got overlap={overlap}, tile={tile}")
    if size <= tile:
        return [0], size
    if (size - tile) % align:
        raise ValueError(f"axis of size {size} minus tile {tile} is not a multiple of {align}")
    count = -(-(size - overlap) // (tile - overlap))
    slots = (size - tile) // align
    return [align * ((i * slots) // (count - 1)) for i in range(count)], tile


def blend_weights(size: int, starts: list[int], length: int, overlap: float) -> np.ndarray:
    """(tiles, length) float32 weights along one axis, summing to one at every position.

    On a side shared with a neighbour, a tile's weight is zero over the outer quarter of the
    overlap (where its border is nearest), then rises linearly over the middle half; sides at the
    image edge have no ramp. An operation whose receptive field reaches at most `overlap / 4`
    pixels is therefore reproduced exactly.
    """
    margin = overlap / 4
    centres = np.arange(length, dtype=np.float64) + 0.5
    rise = np.clip((centres - margin) / (overlap / 2), 0.0, 1.0)
    ramps = []
    for start in starts:
        ramp = np.ones(length, np.float64)
        if start > 0:
            ramp = np.minimum(ramp, rise)
        if start + length < size:
            ramp = np.minimum(ramp, rise[::-1])
        ramps.append(ramp)
    total = np.zeros(size, np.float64)
    for start, ramp in zip(starts, ramps):
        total[start : start + length] += ramp
    if np.any(total <= 0):
        raise ValueError(f"tiles {starts} of length {length} (overlap {overlap}) leave gaps on an axis of size {size}")
    return np.stack([ramp / total[start : start + length] for start, ramp in zip(starts, ramps)]).astype(np.float32)


def _scaled(value: int, ratio: Fraction, what: str) -> int:
    scaled = value * ratio
    if scaled.denominator != 1:
        raise ValueError(f"{what} {value} times the function's size ratio {ratio} is not an integer")
    return int(scaled)


def tiled_map(fn: Callable[[jax.Array], Any], x: jax.Array, *, tile: int, overlap: int) -> Any:
    """Blend `fn` applied to overlapping tiles of `x`.

    Args:
      fn: maps (B, th, tw, C) to a pytree of arrays (B, th * r, tw * r, C') for one size ratio r
        (r = 1/8 for an encoder, 8 for a decoder, ...).
      x: (B, H, W, C).
      tile: tile side in pixels of `x`; a side of `x` no longer than `tile` is one tile.
      overlap: pixels of `x` shared by neighbouring tiles (the width of the cross-fade).
    Returns:
      The pytree of blended float32 outputs, each (B, H * r, W * r, C').
    """
    batch, height, width, _ = x.shape
    probe = min(tile, height), min(tile, width)
    probe_shape = jax.eval_shape(fn, jax.ShapeDtypeStruct((batch, *probe, x.shape[3]), x.dtype))
    ratio = Fraction(jax.tree.leaves(probe_shape)[0].shape[1], probe[0])
    rows, tile_h = tile_starts(height, tile, overlap, ratio.denominator)
    cols, tile_w = tile_starts(width, tile, overlap, ratio.denominator)
    tile_in = jax.ShapeDtypeStruct((batch, tile_h, tile_w, x.shape[3]), x.dtype)
    out_shapes = jax.eval_shape(fn, tile_in)
    leaves, treedef = jax.tree.flatten(out_shapes)
    for leaf in leaves:
        if leaf.ndim != 4 or leaf.shape[0] != batch or Fraction(leaf.shape[1], tile_h) != ratio or Fraction(leaf.shape[2], tile_w) != ratio:
            raise ValueError(
                f"tiled_map: fn maps a {tile_in.shape} tile to {leaf.shape}; every output must be "
                f"(B, th * r, tw * r, C) with one ratio r (here {ratio})"
            )
    out_h, out_w = _scaled(height, ratio, "height"), _scaled(width, ratio, "width")
    rows_out = [_scaled(s, ratio, "tile origin") for s in rows]
    cols_out = [_scaled(s, ratio, "tile origin") for s in cols]
    len_h, len_w = leaves[0].shape[1], leaves[0].shape[2]
    w_rows = blend_weights(out_h, rows_out, len_h, float(overlap * ratio))
    w_cols = blend_weights(out_w, cols_out, len_w, float(overlap * ratio))

    grid = [(i, j) for i in range(len(rows)) for j in range(len(cols))]
    xs = (
        jnp.asarray([rows[i] for i, _ in grid], jnp.int32),
        jnp.asarray([cols[j] for _, j in grid], jnp.int32),
        jnp.asarray([rows_out[i] for i, _ in grid], jnp.int32),
        jnp.asarray([cols_out[j] for _, j in grid], jnp.int32),
        jnp.asarray(w_rows[[i for i, _ in grid]]),
        jnp.asarray(w_cols[[j for _, j in grid]]),
    )
    zero = jnp.zeros((), jnp.int32)

    def step(acc: list[jax.Array], inputs: tuple[jax.Array, ...]) -> tuple[list[jax.Array], None]:
        y, x0, y_out, x_out, w_row, w_col = inputs
        patch = jax.lax.dynamic_slice(x, (zero, y, x0, zero), tile_in.shape)
        weight = (w_row[:, None] * w_col[None, :])[None, :, :, None]
        new = []
        for total, out in zip(acc, jax.tree.leaves(fn(patch))):
            origin = (zero, y_out, x_out, zero)
            current = jax.lax.dynamic_slice(total, origin, out.shape)
            new.append(jax.lax.dynamic_update_slice(total, current + weight * out.astype(jnp.float32), origin))
        return new, None

    init = [jnp.zeros((batch, out_h, out_w, leaf.shape[3]), jnp.float32) for leaf in leaves]
    acc, _ = jax.lax.scan(step, init, xs)
    return jax.tree.unflatten(treedef, acc)
