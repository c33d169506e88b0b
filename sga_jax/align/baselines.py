"""The patch-wise alignment losses SGA is compared with: REPA and iREPA.

Both are negative mean cosine similarities between each projected generative token and the prior
token at the same position; iREPA first normalises the prior spatially, per channel over tokens.
Computation is in float32 whatever the input dtype; rows are normalised as in `sga.normalize_rows`
(an all-zero row has cosine 0 with everything, and a finite gradient).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sga_jax.align.sga import NORM_EPS, check_pair, normalize_rows

IREPA_STD_EPS = 1e-6


def repa_loss(gen: jax.Array, ref: jax.Array, *, eps: float = NORM_EPS) -> jax.Array:
    """REPA: -mean over batch and tokens of cos(gen_n, ref_n).

    Args:
      gen: (B, N, C) projected generative tokens.
      ref: (B, N, C) prior tokens (same width as gen).
    Returns:
      A float32 scalar in [-1, 1].
    """
    check_pair(gen, ref, same_width=True)
    cosine = jnp.sum(normalize_rows(gen, eps) * normalize_rows(ref, eps), axis=-1)
    return -jnp.mean(cosine)


def spatial_normalize(ref: jax.Array, alpha: float = 0.6) -> jax.Array:
    """iREPA's target: (f - alpha * mean_N f) / (std_N f + 1e-6), per sample and channel.

    The standard deviation is over tokens with Bessel's correction (PyTorch's `Tensor.std`), and
    it does not depend on alpha since it is invariant to the shift. A constant channel (zero std)
    gives (1 - alpha) * f / 1e-6, with a finite gradient (the std's gradient is taken as 0 there).
    """
    f = ref.astype(jnp.float32)
    mean = jnp.mean(f, axis=1, keepdims=True)
    var = jnp.sum(jnp.square(f - mean), axis=1, keepdims=True) / (f.shape[1] - 1)
    positive = var > 0
    std = jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)
    return (f - alpha * mean) / (std + IREPA_STD_EPS)


def irepa_loss(gen: jax.Array, ref: jax.Array, alpha: float = 0.6, *, eps: float = NORM_EPS) -> jax.Array:
    """iREPA: REPA's negative mean cosine against the spatially normalised prior.

    Args:
      gen: (B, N, C) projected generative tokens.
      ref: (B, N, C) prior tokens, N >= 2 (the spatial std needs two tokens).
      alpha: fraction of the spatial mean removed from the prior (0.6 in iREPA's LDM recipe).
    Returns:
      A float32 scalar in [-1, 1].
    """
    check_pair(gen, ref, same_width=True)
    if ref.shape[1] < 2:
        raise ValueError(
            f"irepa_loss needs at least 2 tokens per sample for the spatial std, got ref {tuple(ref.shape)}"
        )
    return repa_loss(gen, spatial_normalize(ref, alpha), eps=eps)
