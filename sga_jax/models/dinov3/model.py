"""DINOv3 ViT in Flax NNX, equal to transformers' `DINOv3ViTModel` in eval mode.

Tokens are [CLS, registers, patches]; no learned position table: 2-D rotary embeddings on the
patch tokens only, with patch-centre coordinates in [-1, 1] (so any grid works) and frequencies
`100^-(4j / head_dim)`, rotating the two halves of each head (y frequencies, then x). Pre-norm
blocks with LayerScale, a plain or gated MLP, optional biases per projection, final LayerNorm.
Training-time coordinate augmentation (shift / jitter / rescale) is not part of inference and is
not implemented. Names follow the Hugging Face hub checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sga_jax.errors import ConfigError
from sga_jax.models import nn
from sga_jax.models.config import ModelConfig
from sga_jax.models.vit import LayerScaleBlock, learned_token, square_size

IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Dinov3Config(ModelConfig):
    """DINOv3 ViT hyper-parameters (names as transformers' `DINOv3ViTConfig`) plus compute settings."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    rope_theta: float = 100.0
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    query_bias: bool = True
    key_bias: bool = False
    value_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True
    layerscale_value: float = 1.0
    use_gated_mlp: bool = False
    num_register_tokens: int = 4
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "xla"
    remat: str = "none"

    def __post_init__(self):
        self.check_heads()
        if self.head_dim % 4:
            raise ConfigError(f"Dinov3Config: head_dim {self.head_dim} must be a multiple of 4 for 2-D RoPE")
        nn.activation(self.hidden_act)
        self.check_run_settings()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus register tokens, ahead of the patch tokens in the sequence."""
        return 1 + self.num_register_tokens

    @classmethod
    def vitb16(cls, **overrides: Any) -> "Dinov3Config":
        """DINOv3 ViT-B/16 (facebook/dinov3-vitb16-pretrain-lvd1689m)."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> "Dinov3Config":
        """A small random-weight configuration for tests and the CPU demo."""
        base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
        return cls(**{**base, **overrides})

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides: Any) -> "Dinov3Config":
        """Read a transformers `config.json` dict of model_type "dinov3_vit"."""
        if hf.get("model_type", "dinov3_vit") != "dinov3_vit":
            raise ConfigError(f"config.json has model_type {hf.get('model_type')!r}; DINOv3 expects 'dinov3_vit'")
        hf_defaults = dict(hidden_size=384, intermediate_size=1536, num_attention_heads=6, num_register_tokens=0)
        fields = {}
        for f in dataclasses.fields(cls):
            if f.name in ("dtype", "param_dtype", "attention", "remat"):
                continue
            if f.name in ("image_size", "patch_size"):
                fields[f.name] = square_size(hf, f.name, getattr(cls, f.name))
            elif f.name in hf:
                fields[f.name] = hf[f.name]
            elif f.name in hf_defaults:
                fields[f.name] = hf_defaults[f.name]
        return cls(**{**fields, **overrides})


def rope_tables(grid: tuple[int, int], head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """(cos, sin), each (gh * gw, head_dim / 2) in float32, for patch centres in [-1, 1].

    Half the rotary dimensions carry the row coordinate and half the column coordinate, each with
    `theta^-(4j / head_dim)` frequencies scaled by 2 pi, as DINOv3 does.
    """
    gh, gw = grid
    inv_freq = 1.0 / theta ** (jnp.arange(head_dim // 4, dtype=jnp.float32) * (4.0 / head_dim))
    ys = 2.0 * (jnp.arange(gh, dtype=jnp.float32) + 0.5) / gh - 1.0
    xs = 2.0 * (jnp.arange(gw, dtype=jnp.float32) + 0.5) / gw - 1.0
    coords = jnp.stack(jnp.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(gh * gw, 2)
    angles = (2.0 * math.pi * coords[:, :, None] * inv_freq).reshape(gh * gw, head_dim // 2)
    return jnp.cos(angles), jnp.sin(angles)


class Embeddings(nnx.Module):
    """CLS, mask and register tokens and the patch convolution (hub: `patch_embeddings`)."""

    def __init__(self, config: Dinov3Config, *, rngs: nnx.Rngs):
        self.config = config
        pdt = nn.dtype_of(config.param_dtype)
        c = config.hidden_size
        self.cls_token = learned_token((1, 1, c), rngs, pdt)
        self.mask_token = nnx.Param(jnp.zeros((1, 1, c), pdt), out_sharding=(None, None, "embed"), eager_sharding=False)
        self.register_tokens = learned_token((1, config.num_register_tokens, c), rngs, pdt)
        p = config.patch_size
        self.patch_embeddings = nn.conv(
            config.num_channels, c, p, strides=p, padding="VALID", rngs=rngs,
            dtype=nn.dtype_of(config.dtype), param_dtype=pdt, axes=(None, "embed"),
        )

    def __call__(self, pixel_values: jax.Array, bool_masked_pos: jax.Array | None = None) -> tuple[jax.Array, tuple[int, int]]:
        dtype = nn.dtype_of(self.config.dtype) or pixel_values.dtype
        patches = self.patch_embeddings(pixel_values.astype(dtype))
        batch, gh, gw, c = patches.shape
        patches = patches.reshape(batch, gh * gw, c)
        if bool_masked_pos is not None:
            patches = jnp.where(bool_masked_pos[..., None], self.mask_token[...].astype(dtype), patches)
        cls = jnp.broadcast_to(self.cls_token[...].astype(dtype), (batch, 1, c))
        registers = jnp.broadcast_to(self.register_tokens[...].astype(dtype), (batch, self.config.num_register_tokens, c))
        return jnp.concatenate([cls, registers, patches], axis=1), (gh, gw)


class Attention(nnx.Module):
    """Self-attention with RoPE on the patch tokens (hub: `q_proj`, `k_proj`, `v_proj`, `o_proj`)."""

    def __init__(self, config: Dinov3Config, *, rngs: nnx.Rngs):
        self.config = config
        c = config.hidden_size
        kw = dict(rngs=rngs, dtype=nn.dtype_of(config.dtype), param_dtype=nn.dtype_of(config.param_dtype))
        self.q_proj = nn.linear(c, c, ("embed", "heads"), use_bias=config.query_bias, **kw)
        self.k_proj = nn.linear(c, c, ("embed", "heads"), use_bias=config.key_bias, **kw)
        self.v_proj = nn.linear(c, c, ("embed", "heads"), use_bias=config.value_bias, **kw)
        self.o_proj = nn.linear(c, c, ("heads", "embed"), use_bias=config.proj_bias, **kw)

    def _rotate(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        prefix = self.config.num_prefix_tokens
        patches = nn.apply_rope(x[:, prefix:], cos, sin, interleaved=False)
        return jnp.concatenate([x[:, :prefix], patches], axis=1)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
        batch, length, _ = x.shape
        heads = (batch, length, self.config.num_attention_heads, self.config.head_dim)
        q = self._rotate(self.q_proj(x).reshape(heads), *rope)
        k = self._rotate(self.k_proj(x).reshape(heads), *rope)
        v = self.v_proj(x).reshape(heads)
        out = nn.attention(q, k, v, implementation=self.config.attention)
        return self.o_proj(out.reshape(batch, length, -1))


class Mlp(nnx.Module):
    """up_proj -> activation -> down_proj, or the gated form act(gate_proj(x)) * up_proj(x)."""

    def __init__(self, config: Dinov3Config, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, use_bias=config.mlp_bias, dtype=nn.dtype_of(config.dtype), param_dtype=nn.dtype_of(config.param_dtype))
        self.act = nn.activation(config.hidden_act)
        self.gated = config.use_gated_mlp
        if self.gated:
            self.gate_proj = nn.linear(config.hidden_size, config.intermediate_size, ("embed", "mlp"), **kw)
        self.up_proj = nn.linear(config.hidden_size, config.intermediate_size, ("embed", "mlp"), **kw)
        self.down_proj = nn.linear(config.intermediate_size, config.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = self.act(self.gate_proj(x)) * self.up_proj(x) if self.gated else self.act(self.up_proj(x))
        return self.down_proj(hidden)


class Dinov3(nnx.Module):
    """DINOv3 ViT: normalised pixels (B, H, W, 3), H and W multiples of the patch size ->
    transformers' `last_hidden_state` (B, 1 + registers + H/p * W/p, C), final LayerNorm applied."""

    def __init__(self, config: Dinov3Config, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = Embeddings(config, rngs=rngs)
        self.layer = nn.stack_layers(lambda r: LayerScaleBlock(config, Attention(config, rngs=r), Mlp(config, rngs=r), rngs=r), config.num_hidden_layers, rngs)
        self.norm = nn.layer_norm(
            config.hidden_size, rngs=rngs, eps=config.layer_norm_eps,
            dtype=nn.dtype_of(config.dtype), param_dtype=nn.dtype_of(config.param_dtype),
        )

    def __call__(self, pixel_values: jax.Array, bool_masked_pos: jax.Array | None = None) -> jax.Array:
        """`bool_masked_pos` (B, num_patches), optional: patches replaced by the mask token."""
        p = self.config.patch_size
        if pixel_values.shape[1] % p or pixel_values.shape[2] % p:
            raise ValueError(f"DINOv3: image size {pixel_values.shape[1:3]} is not a multiple of the patch size {p}")
        x, grid = self.embeddings(pixel_values, bool_masked_pos)
        rope = rope_tables(grid, self.config.head_dim, self.config.rope_theta)
        x = nn.constrain(x, ("batch", "length", "embed"))
        x = nn.scan_layers(self.layer, x, lambda layer, h, _: layer(h, rope), remat_policy=self.config.remat)
        return self.norm(x)
