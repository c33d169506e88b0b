"""Pieces shared by the plain ViT families (DINOv2, DINOv3): learned tokens, LayerScale, the
pre-norm LayerScale block and the square sizes of their config.json files."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sga_jax.errors import ConfigError
from sga_jax.models import nn


def square_size(hf: dict[str, Any], name: str, default: int) -> int:
    """A config.json size that may be an int or a square [h, w] pair, as one int."""
    value = hf.get(name, default)
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConfigError(f"config.json: non-square {name} {list(value)} is not supported")
        value = value[0]
    return int(value)


def learned_token(shape: tuple[int, ...], rngs: nnx.Rngs, param_dtype: Any, std: float = 0.02) -> nnx.Param:
    """A learned token / embedding table (truncated-normal init) with a trailing "embed" axis."""
    value = nnx.initializers.truncated_normal(std)(rngs.params(), shape, param_dtype)
    return nnx.Param(value, out_sharding=(None,) * (len(shape) - 1) + ("embed",), eager_sharding=False)


class LayerScale(nnx.Module):
    """Per-channel residual branch scale `lambda1`."""

    def __init__(self, dim: int, value: float, param_dtype: Any):
        self.lambda1 = nnx.Param(jnp.full((dim,), value, param_dtype), out_sharding=("embed",), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.lambda1[...].astype(x.dtype)


class LayerScaleBlock(nnx.Module):
    """Pre-norm transformer block with LayerScale on both residual branches (hub names `norm1`,
    `attention`, `layer_scale1`, `norm2`, `mlp`, `layer_scale2`); the family supplies its attention
    and MLP modules. Extra call arguments go to the attention (e.g. DINOv3's RoPE tables)."""

    def __init__(self, config: Any, attention: nnx.Module, mlp: nnx.Module, *, rngs: nnx.Rngs):
        pdt = nn.dtype_of(config.param_dtype)
        kw = dict(rngs=rngs, eps=config.layer_norm_eps, dtype=nn.dtype_of(config.dtype), param_dtype=pdt)
        self.norm1 = nn.layer_norm(config.hidden_size, **kw)
        self.attention = attention
        self.layer_scale1 = LayerScale(config.hidden_size, config.layerscale_value, pdt)
        self.norm2 = nn.layer_norm(config.hidden_size, **kw)
        self.mlp = mlp
        self.layer_scale2 = LayerScale(config.hidden_size, config.layerscale_value, pdt)

    def __call__(self, x: jax.Array, *attention_args: Any) -> jax.Array:
        x = x + self.layer_scale1(self.attention(self.norm1(x), *attention_args))
        x = x + self.layer_scale2(self.mlp(self.norm2(x)))
        return nn.constrain(x, ("batch", "length", "embed"))
