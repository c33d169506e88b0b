"""Reconstruction metrics over batches of channels-last images (B, H, W, C), one value per image.

Images are compared on a known `data_range` (2.0 for sga-jax's [-1, 1] images, 255 for uint8
pixels). SSIM follows `skimage.metrics.structural_similarity(..., gaussian_weights=True,
sigma=1.5, use_sample_covariance=False, channel_axis=-1)`: an 11-tap Gaussian window with
symmetric ('reflect') borders, population (co)variances, the mean over the image minus a 5-pixel
border, averaged over channels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5


def _check_pair(a: jax.Array, b: jax.Array) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"expected two (B, H, W, C) batches of the same shape, got {a.shape} and {b.shape}")


@jax.jit
def _mse(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=(1, 2, 3))


def psnr(a: jax.Array, b: jax.Array, *, data_range: float = 2.0) -> jax.Array:
    """Peak signal-to-noise ratio in dB, `10 log10(data_range^2 / MSE)`: (B,). Identical images give inf."""
    _check_pair(a, b)
    return 10.0 * jnp.log10(data_range**2 / _mse(a, b))


def nmse(a: jax.Array, reference: jax.Array) -> jax.Array:
    """Normalised MSE `||a - reference||^2 / ||reference||^2` per image: (B,)."""
    _check_pair(a, reference)
    reference = reference.astype(jnp.float32)
    return _mse(a, reference) / jnp.mean(jnp.square(reference), axis=(1, 2, 3))


def _gaussian_taps() -> np.ndarray:
    radius = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def _blur(x: jax.Array, taps: jax.Array, axis: int) -> jax.Array:
    """1-D Gaussian filter along `axis` of (B, H, W, C) with symmetric borders, as scipy's 'reflect'."""
    radius = (taps.shape[0] - 1) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(x, pad, mode="symmetric")
    length = x.shape[axis]
    return sum(taps[i] * jax.lax.slice_in_dim(padded, i, i + length, axis=axis) for i in range(taps.shape[0]))


@functools.partial(jax.jit, static_argnames="data_range")
def _ssim(a: jax.Array, b: jax.Array, data_range: float) -> jax.Array:
    taps = jnp.asarray(_gaussian_taps())
    radius = (taps.shape[0] - 1) // 2

    def filtered(x: jax.Array) -> jax.Array:
        return _blur(_blur(x, taps, 1), taps, 2)

    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    mu_a, mu_b = filtered(a), filtered(b)
    var_a = filtered(a * a) - mu_a * mu_a
    var_b = filtered(b * b) - mu_b * mu_b
    cov = filtered(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return jnp.mean(s[:, radius:-radius, radius:-radius, :], axis=(1, 2, 3))


def ssim(a: jax.Array, b: jax.Array, *, data_range: float = 2.0) -> jax.Array:
    """Structural similarity per image: (B,). Sides must be at least 11 pixels (the window)."""
    _check_pair(a, b)
    window = _gaussian_taps().shape[0]
    if min(a.shape[1], a.shape[2]) < window:
        raise ValueError(f"SSIM needs images of at least {window} x {window} pixels, got {a.shape[1:3]}")
    return _ssim(a, b, float(data_range))
