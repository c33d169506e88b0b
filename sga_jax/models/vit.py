"""Pieces shared by the plain ViT families (DINOv2, DINOv3): learned tokens, LayerScale and the
square sizes of their config.json files."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def square_size(hf: dict[str, Any], name: str, default: int) -> int:
    """A config.json size that may be an int or a square [h, w] pair, as one int."""
    value = hf.get(name, default)
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"config.json: non-square {name} {list(value)} is not supported")
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
