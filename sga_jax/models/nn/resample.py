"""Image resizing that equals a named reference implementation (static sizes, float32):

* `resize_torch`: PyTorch's `F.interpolate(mode="bilinear" | "bicubic", align_corners=False,
  antialias=...)` (pretrained position embeddings of DINOv2 and SAM2; pytorch-fid's input resize).
* `resize_tf1_bilinear`: TensorFlow 1's `resize_bilinear` as torch-fidelity reproduces it
  (torchmetrics' FID up to 1.7, the protocol of Diffusion-4K's evaluation).
* `resize_short_side` + `center_crop`: torchvision's `F.resize(img, size)` of a tensor (the short
  side to `size`, bilinear, antialiased) and `F.center_crop`.

A 1-D resize is a set of taps, `out[i] = sum_k weight[i, k] * in[index[i, k]]` (`Taps`, computed
once on the host in float64); an image resize applies one set per spatial axis as K gathers and
a weighted sum in float32, which costs O(output * K) whatever the input size (a 4K image
downsampled to 299 pixels reads 2 of its rows per output row).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

TORCH_MODES = ("bilinear", "bicubic")


@dataclasses.dataclass(frozen=True)
class Taps:
    """A 1-D linear resampling: `out[i] = sum_k weight[i, k] * in[index[i, k]]`.

    `index` (out, K) int32 and `weight` (out, K) float64; rows with fewer taps are padded with
    weight 0 at index 0.
    """

    index: np.ndarray
    weight: np.ndarray
    in_size: int

    @classmethod
    def from_rows(cls, rows: list[tuple[np.ndarray, np.ndarray]], in_size: int) -> "Taps":
        """Pack per-output-row (indices, weights) pairs of varying length."""
        width = max(len(index) for index, _ in rows)
        index = np.zeros((len(rows), width), np.int32)
        weight = np.zeros((len(rows), width), np.float64)
        for i, (taps, weights) in enumerate(rows):
            index[i, : len(taps)] = taps
            weight[i, : len(taps)] = weights
        return cls(index, weight, in_size)

    def matrix(self) -> np.ndarray:
        """The dense (out, in) float64 matrix of this resampling."""
        out = np.zeros((self.index.shape[0], self.in_size))
        np.add.at(out, (np.arange(self.index.shape[0])[:, None], self.index), self.weight)
        return out


def _triangle(x: np.ndarray) -> np.ndarray:
    """The linear interpolation kernel."""
    return np.clip(1.0 - np.abs(x), 0.0, None)


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter `a`."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _check_sizes(in_size: int, out_size: int) -> None:
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize sizes must be positive, got {in_size} -> {out_size}")


def torch_taps(in_size: int, out_size: int, mode: str = "bilinear", *, antialias: bool = False) -> Taps:
    """PyTorch's 1-D `interpolate(mode=mode, align_corners=False, antialias=antialias)` as taps.

    Without antialias: source coordinate `(i + 0.5) * in/out - 0.5`; bilinear clamps it at 0 and
    takes the two neighbours (the upper one clamped at the border), bicubic (a = -0.75) four taps
    with indices clamped at the borders. With antialias (PyTorch's PIL-compatible path): the
    kernel (triangle, or cubic with a = -0.5) is stretched by in/out when downsampling, taps
    falling outside the input are dropped and the weights renormalised.
    """
    if mode not in TORCH_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {TORCH_MODES}")
    _check_sizes(in_size, out_size)
    scale = in_size / out_size
    rows = np.arange(out_size)
    if antialias:
        kernel: Callable[[np.ndarray], np.ndarray] = _triangle if mode == "bilinear" else (lambda x: _cubic(x, -0.5))
        support = (1.0 if mode == "bilinear" else 2.0) * max(scale, 1.0)
        inv_scale = 1.0 / max(scale, 1.0)
        packed = []
        for i in rows:
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), in_size)
            index = np.arange(lo, hi)
            weight = kernel((index - center + 0.5) * inv_scale)
            packed.append((index, weight / weight.sum()))
        return Taps.from_rows(packed, in_size)
    src = scale * (rows + 0.5) - 0.5
    if mode == "bilinear":
        src = np.maximum(src, 0.0)
        lo = np.minimum(np.floor(src), in_size - 1).astype(np.int64)
        frac = src - lo
        index = np.stack([lo, np.minimum(lo + 1, in_size - 1)], axis=1)
        return Taps(index.astype(np.int32), np.stack([1.0 - frac, frac], axis=1), in_size)
    floor = np.floor(src)
    offsets = np.arange(-1, 3)
    index = np.clip(floor[:, None] + offsets, 0, in_size - 1).astype(np.int32)
    return Taps(index, _cubic(src[:, None] - floor[:, None] - offsets, -0.75), in_size)


def tf1_bilinear_taps(in_size: int, out_size: int) -> Taps:
    """TensorFlow 1's `resize_bilinear(align_corners=False)` as taps, as torch-fidelity's
    `interpolate_bilinear_2d_like_tensorflow1x` computes it: source coordinate `i * in/out` in
    float32 (no half-pixel offset), `lo = floor`, `hi = min(lo + 1, in - 1)`."""
    _check_sizes(in_size, out_size)
    src = np.arange(out_size, dtype=np.float32) * np.float32(in_size / out_size)
    lo = src.astype(np.int64)
    frac = (src - lo.astype(np.float32)).astype(np.float64)
    index = np.stack([lo, np.minimum(lo + 1, in_size - 1)], axis=1).astype(np.int32)
    return Taps(index, np.stack([1.0 - frac, frac], axis=1), in_size)


def _resample_axis(x: jax.Array, taps: Taps, axis: int) -> jax.Array:
    """Apply `taps` along `axis` of a float32 array: one gather per tap and a weighted sum."""
    if x.shape[axis] != taps.in_size:
        raise ValueError(f"resize taps expect {taps.in_size} samples along axis {axis}, got shape {x.shape}")
    shape = [1] * x.ndim
    shape[axis] = taps.index.shape[0]
    out = None
    for k in range(taps.index.shape[1]):
        weight = jnp.asarray(taps.weight[:, k].reshape(shape), jnp.float32)
        part = jnp.take(x, jnp.asarray(taps.index[:, k]), axis=axis, mode="clip") * weight
        out = part if out is None else out + part
    return out


def resample(x: jax.Array, rows: Taps, cols: Taps) -> jax.Array:
    """Resize (..., H, W, C) with one set of taps per spatial axis, in float32; returns x's dtype."""
    axis_h, axis_w = x.ndim - 3, x.ndim - 2
    out = _resample_axis(_resample_axis(x.astype(jnp.float32), rows, axis_h), cols, axis_w)
    return out.astype(x.dtype)


def resize_torch(x: jax.Array, size: tuple[int, int], mode: str = "bilinear", *, antialias: bool = False) -> jax.Array:
    """Resize (..., H, W, C) to (..., size[0], size[1], C) as PyTorch's `F.interpolate(mode=mode,
    align_corners=False, antialias=antialias)` does; computed in float32, sizes static."""
    h_in, w_in = x.shape[-3], x.shape[-2]
    if (h_in, w_in) == tuple(size):
        return x
    return resample(x, torch_taps(h_in, size[0], mode, antialias=antialias),
                    torch_taps(w_in, size[1], mode, antialias=antialias))


def resize_tf1_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resize (..., H, W, C) to (..., size[0], size[1], C) as TensorFlow 1's bilinear resize
    (torch-fidelity's reimplementation; see `tf1_bilinear_taps`). An identity at equal sizes."""
    h_in, w_in = x.shape[-3], x.shape[-2]
    return resample(x, tf1_bilinear_taps(h_in, size[0]), tf1_bilinear_taps(w_in, size[1]))


def short_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    """torchvision's output size for `F.resize(img, short)`: the short side becomes `short`, the
    long side `int(short * long / short_side)` (truncated)."""
    if height <= width:
        return short, int(short * width / height)
    return int(short * height / width), short


def resize_short_side(x: jax.Array, short: int) -> jax.Array:
    """torchvision's `F.resize(tensor, short)` (bilinear, antialias=True, its default since 0.17) of
    (..., H, W, C) in float32; unchanged when the size already fits (torchvision returns the input)."""
    return resize_torch(x, short_side_size(x.shape[-3], x.shape[-2], short), "bilinear", antialias=True)


def center_crop(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torchvision's `F.center_crop` of (..., H, W, C) to `size`, whose sides must fit in the image
    (offsets `int(round((H - h) / 2))`, Python's rounding, as torchvision computes them)."""
    height, width = x.shape[-3], x.shape[-2]
    if size[0] > height or size[1] > width:
        raise ValueError(f"center crop {tuple(size)} is larger than the image {(height, width)}")
    top = int(round((height - size[0]) / 2.0))
    left = int(round((width - size[1]) / 2.0))
    return x[..., top : top + size[0], left : left + size[1], :]
