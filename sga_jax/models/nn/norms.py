"""Normalisation layers: LayerNorm and GroupNorm with logical axes, RMSNorm (BFL's QK norm, T5) and
BatchStatNorm (BatchNorm as PyTorch runs it in training mode)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sga_jax.models.nn.params import Dtype, logical


def _norm_settings(eps: float, dtype: Dtype, param_dtype: Dtype, axis_name: str | None, rngs: nnx.Rngs) -> dict:
    """Keyword arguments LayerNorm and GroupNorm share: exact (two-pass) float32 variance, dtypes,
    and a scale of ones / bias of zeros along the logical axis `axis_name`."""
    return dict(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=logical(nnx.initializers.ones_init(), (axis_name,)),
        bias_init=logical(nnx.initializers.zeros_init(), (axis_name,)),
        use_fast_variance=False,
        rngs=rngs,
    )


def layer_norm(
    dim: int,
    *,
    rngs: nnx.Rngs,
    eps: float = 1e-6,
    affine: bool = True,
    dtype: Dtype = None,
    param_dtype: Dtype = jnp.float32,
    axis_name: str | None = "embed",
) -> nnx.LayerNorm:
    """LayerNorm over the last axis (statistics in float32); `affine=False` has no parameters."""
    return nnx.LayerNorm(dim, use_bias=affine, use_scale=affine, **_norm_settings(eps, dtype, param_dtype, axis_name, rngs))


def group_norm(
    num_groups: int,
    dim: int,
    *,
    rngs: nnx.Rngs,
    eps: float = 1e-6,
    dtype: Dtype = None,
    param_dtype: Dtype = jnp.float32,
) -> nnx.GroupNorm:
    """GroupNorm over channels-last features with a learned per-channel scale and bias."""
    return nnx.GroupNorm(dim, num_groups=num_groups, **_norm_settings(eps, dtype, param_dtype, "conv_out", rngs))


class RMSNorm(nnx.Module):
    """Root-mean-square norm with a learned `scale` (BFL's QK norm and T5's layer norm).

    Statistics are computed in float32; the result is cast back to the input dtype before scaling.
    """

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-6,
        param_dtype: Dtype = jnp.float32,
        axis_name: str | None = "embed",
    ):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(axis_name,), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * self.scale[...].astype(x.dtype)


class BatchStatNorm(nnx.Module):
    """BatchNorm in training mode, as `torch.nn.BatchNorm2d.train()` computes its output: each
    channel normalised with the mean and biased variance of this batch (over batch, height and
    width of a channels-last (B, H, W, C) input), then a learned per-channel `scale` and `bias`.

    It keeps no running statistics: it serves networks that only ever run in training mode (a GAN
    discriminator), so an eval mode, and the state it would need, do not exist. Statistics are in
    float32; over a batch sharded across devices they are global (XLA reduces across the shards).
    """

    def __init__(
        self,
        dim: int,
        *,
        rngs: nnx.Rngs,
        eps: float = 1e-5,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        scale_init: nnx.Initializer = nnx.initializers.ones_init(),
    ):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(logical(scale_init, ("conv_out",))(rngs.params(), (dim,), param_dtype))
        self.bias = nnx.Param(logical(nnx.initializers.zeros_init(), ("conv_out",))(rngs.params(), (dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(x32, axis=axes)
        var = jnp.mean(jnp.square(x32 - mean), axis=axes)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype or x.dtype)
