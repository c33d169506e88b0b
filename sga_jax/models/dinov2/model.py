"""DINOv2 ViT (with and without register tokens) in Flax NNX, equal to transformers' `Dinov2Model`
and `Dinov2WithRegistersModel`.

Tokens are [CLS, registers, patches]; learned position embeddings are resized to the patch grid
with PyTorch's bicubic (a = -0.75 without antialias for "dinov2"; the antialiased path for
"dinov2_with_registers", as transformers does); pre-norm blocks with LayerScale and exact GELU;
a final LayerNorm. Module and parameter names follow the Hugging Face hub checkpoints, so the
converter is a table of layout changes. Inputs are channels-last normalised pixels (B, H, W, 3).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sga_jax.errors import ConfigError
from sga_jax.models import nn
from sga_jax.models.config import ModelConfig
from sga_jax.models.vit import LayerScaleBlock, learned_token, square_size

MODEL_TYPES = ("dinov2", "dinov2_with_registers")
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Dinov2Config(ModelConfig):
    """DINOv2 hyper-parameters (names as transformers' `Dinov2Config`) plus compute settings.

    `image_size` fixes the stored position-embedding grid (image_size // patch_size per side);
    any other input size is served by resizing that grid.
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4.0
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    image_size: int = 518
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = True
    layerscale_value: float = 1.0
    model_type: str = "dinov2"
    num_register_tokens: int = 0
    use_mask_token: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "xla"
    remat: str = "none"

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"Dinov2Config.model_type={self.model_type!r}; expected one of {MODEL_TYPES}")
        self.check_heads()
        if self.model_type == "dinov2_with_registers" and not self.use_mask_token:
            raise ConfigError("Dinov2Config: dinov2_with_registers checkpoints always carry a mask token")
        if self.model_type == "dinov2" and self.num_register_tokens:
            raise ConfigError("Dinov2Config: register tokens need model_type='dinov2_with_registers'")
        nn.activation(self.hidden_act)
        self.check_run_settings()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def grid_size(self) -> int:
        """Side of the stored position-embedding grid."""
        return self.image_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus register tokens, ahead of the patch tokens in the sequence."""
        return 1 + self.num_register_tokens

    @classmethod
    def vitb14(cls, *, registers: bool = False, **overrides: Any) -> "Dinov2Config":
        """DINOv2-B/14 (facebook/dinov2-base; with registers: facebook/dinov2-with-registers-base)."""
        if registers:
            overrides = {"model_type": "dinov2_with_registers", "num_register_tokens": 4, **overrides}
        return cls(**overrides)

    @classmethod
    def tiny(cls, *, registers: bool = False, **overrides: Any) -> "Dinov2Config":
        """A small random-weight configuration for tests and the CPU demo."""
        base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=7)
        if registers:
            base.update(model_type="dinov2_with_registers", num_register_tokens=4)
        return cls(**{**base, **overrides})

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides: Any) -> "Dinov2Config":
        """Read a transformers `config.json` dict ("dinov2" or "dinov2_with_registers")."""
        model_type = hf.get("model_type", "dinov2")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"config.json has model_type {model_type!r}; DINOv2 expects one of {MODEL_TYPES}")
        if hf.get("use_swiglu_ffn", False):
            raise ConfigError("config.json: use_swiglu_ffn=True (DINOv2-g) is not supported by this port")
        defaults = cls()
        fields = dict(
            hidden_size=hf.get("hidden_size", defaults.hidden_size),
            num_hidden_layers=hf.get("num_hidden_layers", defaults.num_hidden_layers),
            num_attention_heads=hf.get("num_attention_heads", defaults.num_attention_heads),
            mlp_ratio=float(hf.get("mlp_ratio", defaults.mlp_ratio)),
            hidden_act=hf.get("hidden_act", defaults.hidden_act),
            layer_norm_eps=hf.get("layer_norm_eps", defaults.layer_norm_eps),
            image_size=square_size(hf, "image_size", 224),
            patch_size=square_size(hf, "patch_size", defaults.patch_size),
            num_channels=hf.get("num_channels", defaults.num_channels),
            qkv_bias=hf.get("qkv_bias", defaults.qkv_bias),
            layerscale_value=hf.get("layerscale_value", defaults.layerscale_value),
            model_type=model_type,
            num_register_tokens=hf.get("num_register_tokens", 0) if model_type == "dinov2_with_registers" else 0,
            use_mask_token=hf.get("use_mask_token", True) or model_type == "dinov2_with_registers",
        )
        return cls(**{**fields, **overrides})


class PatchEmbeddings(nnx.Module):
    """Non-overlapping patch_size x patch_size convolution (hub name `projection`)."""

    def __init__(self, config: Dinov2Config, *, rngs: nnx.Rngs):
        p = config.patch_size
        self.projection = nn.conv(
            config.num_channels, config.hidden_size, p, strides=p, padding="VALID", rngs=rngs,
            dtype=nn.dtype_of(config.dtype), param_dtype=nn.dtype_of(config.param_dtype), axes=(None, "embed"),
        )

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        return self.projection(pixel_values)


class Embeddings(nnx.Module):
    """CLS, mask and register tokens, patch embedding and resized position embeddings."""

    def __init__(self, config: Dinov2Config, *, rngs: nnx.Rngs):
        self.config = config
        pdt = nn.dtype_of(config.param_dtype)
        c = config.hidden_size
        self.cls_token = learned_token((1, 1, c), rngs, pdt)
        if config.use_mask_token:
            self.mask_token = nnx.Param(jnp.zeros((1, c), pdt), out_sharding=(None, "embed"), eager_sharding=False)
        self.position_embeddings = learned_token((1, config.grid_size**2 + 1, c), rngs, pdt)
        if config.model_type == "dinov2_with_registers":
            self.register_tokens = learned_token((1, config.num_register_tokens, c), rngs, pdt)
        self.patch_embeddings = PatchEmbeddings(config, rngs=rngs)

    def position_grid(self, grid: tuple[int, int]) -> jax.Array:
        """Patch position embeddings resized to `grid`, (gh * gw, C), as transformers resizes them."""
        side = self.config.grid_size
        table = self.position_embeddings[...][0, 1:].reshape(side, side, -1)
        antialias = self.config.model_type == "dinov2_with_registers"
        resized = nn.resize_torch(table.astype(jnp.float32), grid, "bicubic", antialias=antialias)
        return resized.astype(table.dtype).reshape(grid[0] * grid[1], -1)

    def __call__(self, pixel_values: jax.Array, bool_masked_pos: jax.Array | None = None) -> jax.Array:
        dtype = nn.dtype_of(self.config.dtype) or pixel_values.dtype
        patches = self.patch_embeddings(pixel_values.astype(dtype))
        batch, gh, gw, c = patches.shape
        patches = patches.reshape(batch, gh * gw, c)
        if bool_masked_pos is not None:
            if not self.config.use_mask_token:
                raise ValueError("DINOv2: bool_masked_pos needs a model with use_mask_token=True")
            patches = jnp.where(bool_masked_pos[..., None], self.mask_token[...].astype(dtype), patches)
        cls = jnp.broadcast_to(self.cls_token[...].astype(dtype), (batch, 1, c))
        cls = cls + self.position_embeddings[...][:, :1].astype(dtype)
        patches = patches + self.position_grid((gh, gw)).astype(dtype)
        parts = [cls, patches]
        if self.config.model_type == "dinov2_with_registers":
            registers = self.register_tokens[...].astype(dtype)
            parts.insert(1, jnp.broadcast_to(registers, (batch,) + registers.shape[1:]))
        return jnp.concatenate(parts, axis=1)


class SelfAttention(nnx.Module):
    """query / key / value projections (hub: `attention.attention.{query,key,value}`)."""

    def __init__(self, config: Dinov2Config, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, use_bias=config.qkv_bias, dtype=nn.dtype_of(config.dtype), param_dtype=nn.dtype_of(config.param_dtype))
        c = config.hidden_size
        self.query = nn.linear(c, c, ("embed", "heads"), **kw)
        self.key = nn.linear(c, c, ("embed", "heads"), **kw)
        self.value = nn.linear(c, c, ("embed", "heads"), **kw)


class SelfOutput(nnx.Module):
    """The attention output projection (hub: `attention.output.dense`)."""

    def __init__(self, config: Dinov2Config, *, rngs: nnx.Rngs):
        c = config.hidden_size
        self.dense = nn.linear(
            c, c, ("heads", "embed"), rngs=rngs, dtype=nn.dtype_of(config.dtype), param_dtype=nn.dtype_of(config.param_dtype)
        )


class Attention(nnx.Module):
    """Multi-head self-attention over all tokens."""

    def __init__(self, config: Dinov2Config, *, rngs: nnx.Rngs):
        self.config = config
        self.attention = SelfAttention(config, rngs=rngs)
        self.output = SelfOutput(config, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, _ = x.shape
        heads = (batch, length, self.config.num_attention_heads, self.config.head_dim)
        q = self.attention.query(x).reshape(heads)
        k = self.attention.key(x).reshape(heads)
        v = self.attention.value(x).reshape(heads)
        out = nn.attention(q, k, v, implementation=self.config.attention)
        return self.output.dense(out.reshape(batch, length, -1))


class Mlp(nnx.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, config: Dinov2Config, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=nn.dtype_of(config.dtype), param_dtype=nn.dtype_of(config.param_dtype))
        self.act = nn.activation(config.hidden_act)
        self.fc1 = nn.linear(config.hidden_size, config.mlp_dim, ("embed", "mlp"), **kw)
        self.fc2 = nn.linear(config.mlp_dim, config.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class Encoder(nnx.Module):
    """The stacked blocks (hub: `encoder.layer.N`), run with one `lax.scan`."""

    def __init__(self, config: Dinov2Config, *, rngs: nnx.Rngs):
        self.remat = config.remat
        self.layer = nn.stack_layers(lambda r: LayerScaleBlock(config, Attention(config, rngs=r), Mlp(config, rngs=r), rngs=r), config.num_hidden_layers, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.scan_layers(self.layer, x, lambda layer, h, _: layer(h), remat_policy=self.remat)


class Dinov2(nnx.Module):
    """DINOv2 ViT: normalised pixels (B, H, W, 3), H and W multiples of the patch size ->
    transformers' `last_hidden_state` (B, 1 + registers + H/p * W/p, C), final LayerNorm applied."""

    def __init__(self, config: Dinov2Config, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = Embeddings(config, rngs=rngs)
        self.encoder = Encoder(config, rngs=rngs)
        self.layernorm = nn.layer_norm(
            config.hidden_size, rngs=rngs, eps=config.layer_norm_eps,
            dtype=nn.dtype_of(config.dtype), param_dtype=nn.dtype_of(config.param_dtype),
        )

    def __call__(self, pixel_values: jax.Array, bool_masked_pos: jax.Array | None = None) -> jax.Array:
        """`bool_masked_pos` (B, num_patches), optional: patches replaced by the mask token."""
        p = self.config.patch_size
        if pixel_values.shape[1] % p or pixel_values.shape[2] % p:
            raise ValueError(f"DINOv2: image size {pixel_values.shape[1:3]} is not a multiple of the patch size {p}")
        x = nn.constrain(self.embeddings(pixel_values, bool_masked_pos), ("batch", "length", "embed"))
        return self.layernorm(self.encoder(x))
