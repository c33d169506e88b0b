"""Rectified-flow objectives for the diffusion stage, as pure functions.

Paths and targets (paper Eq. 1-2, Flux convention): `x_t = (1 - t) x_0 + t eps`, the network
predicts the velocity `v = eps - x_0`, and `x_0 = x_t - t v`. Two objectives:

* `velocity_mse`: plain flow matching, E ||v_theta - v||^2, per example.
* `wavelet_loss` (WLF, Diffusion-4K): one-level orthonormal Haar DWT of the predicted and true
  clean latents, squared error per sub-band (LL, LH, HL, HH) with its own weight, normalised by
  the latent size. The transform is orthonormal, so with weights (1, 1, 1, 1) it equals the x_0 MSE
  exactly; only unequal weights make it a distinct loss.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

SUBBANDS = ("LL", "LH", "HL", "HH")


def sample_timesteps(rng: jax.Array, batch: int, *, kind: str, mean: float = 0.0, std: float = 1.0) -> jax.Array:
    """Training times t in (0, 1): "logit_normal" (sigmoid of N(mean, std^2)) or "uniform"."""
    if kind == "logit_normal":
        return jax.nn.sigmoid(mean + std * jax.random.normal(rng, (batch,), jnp.float32))
    if kind == "uniform":
        return jax.random.uniform(rng, (batch,), jnp.float32)
    raise ValueError(f"timestep sampling {kind!r} is not 'logit_normal' or 'uniform'")


def shift_timesteps(t: jax.Array, mu: float | jax.Array) -> jax.Array:
    """Flux's resolution-dependent exponential time shift, exp(mu) / (exp(mu) + (1/t - 1))."""
    return jnp.exp(mu) / (jnp.exp(mu) + (1.0 / t - 1.0))


def noisy_sample(x0: jax.Array, noise: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x_t, velocity target) for clean `x0`, `noise` and per-example times `t` of shape (B,)."""
    t = t.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return (1.0 - t) * x0 + t * noise, noise - x0


def predicted_x0(x_t: jax.Array, velocity: jax.Array, t: jax.Array) -> jax.Array:
    """The clean sample implied by a velocity prediction: x_0 = x_t - t v."""
    return x_t - t.reshape((-1,) + (1,) * (x_t.ndim - 1)).astype(x_t.dtype) * velocity


def velocity_mse(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """Per-example mean squared error in float32: (B,)."""
    diff = prediction.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(diff * diff, axis=tuple(range(1, diff.ndim)))


def haar_dwt(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One-level orthonormal 2-D Haar transform of (B, H, W, C) with even H, W.

    Returns (LL, LH, HL, HH), each (B, H/2, W/2, C): LL the local average, LH the vertical
    detail (difference between rows), HL the horizontal detail, HH the diagonal.
    """
    if x.ndim != 4 or x.shape[1] % 2 or x.shape[2] % 2:
        raise ValueError(f"haar_dwt expects (B, H, W, C) with even H and W, got {x.shape}")
    a = x[:, 0::2, 0::2]
    b = x[:, 0::2, 1::2]
    c = x[:, 1::2, 0::2]
    d = x[:, 1::2, 1::2]
    return (a + b + c + d) / 2, (a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2


def wavelet_loss(prediction: jax.Array, target: jax.Array, weights: Sequence[float]) -> jax.Array:
    """Per-example WLF, (B,): sum over Haar sub-bands of weight * squared error, divided by the
    size of one example's latent (so equal weights give `velocity_mse` of x_0)."""
    if len(weights) != 4:
        raise ValueError(f"wavelet weights must give the 4 sub-bands {SUBBANDS}, got {tuple(weights)}")
    diff = prediction.astype(jnp.float32) - target.astype(jnp.float32)
    bands = haar_dwt(diff)
    total = sum(w * jnp.sum(band * band, axis=(1, 2, 3)) for w, band in zip(weights, bands))
    return total / (diff.size // diff.shape[0])
