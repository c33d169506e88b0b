"""CLIP's text and vision transformers, as transformers' `CLIPTextModel`, `CLIPVisionModel` and
`CLIPModel` (both towers with their projections, for CLIP score). The text tower is Flux's
`text_encoder` (OpenAI CLIP ViT-L/14).

Architecture facts (transformers `modeling_clip.py`): token + learned absolute position
embeddings, pre-norm blocks (LayerNorm, causal multi-head attention with biases and 1/sqrt(d)
scaling, quick-GELU MLP), a final LayerNorm, and a pooled output taken at the end-of-text token:
the position of the largest id when the config's `eos_token_id` is 2 (the legacy configs that
Flux's CLIP-L ships), else the first position holding `eos_token_id`.

The vision tower: a patch convolution (no bias), a learned class token and absolute position
embeddings, `pre_layrnorm` (sic, the checkpoint's name), the same blocks without a causal mask, and
`post_layernorm` on the class token as the pooled output.

Attribute names follow the checkpoint (`embeddings.token_embedding`, `encoder.layers.self_attn.q_proj`,
`final_layer_norm`); the layers are stacked on a leading "layers" axis and run with `lax.scan`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sga_jax.errors import ConfigError
from sga_jax.models import nn
from sga_jax.models import vit
from sga_jax.models.config import ModelConfig

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ClipTextConfig(ModelConfig):
    """Hyper-parameters of a CLIP text encoder (names as transformers' `CLIPTextConfig`).

    `eos_token_id` selects the pooling rule (see the module docstring); `dtype` is the compute
    dtype, `param_dtype` the storage dtype; `attention` and `remat` as in every family.
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "xla"
    remat: str = "none"
    attention_implementations = nn.MASKING_IMPLEMENTATIONS  # causal and padding masks

    def __post_init__(self):
        self.check_positive_ints("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads", "max_position_embeddings")
        self.check_heads()
        nn.activation(self.hidden_act)
        self.check_run_settings()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def vit_l_14(cls, **overrides: Any) -> "ClipTextConfig":
        """openai/clip-vit-large-patch14's text tower, Flux's `text_encoder`: 123 M parameters."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> "ClipTextConfig":
        """A few-thousand-parameter encoder for tests and the demo."""
        defaults = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=16)
        return cls(**{**defaults, **overrides})

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides: Any) -> "ClipTextConfig":
        """Build from a transformers `config.json` dict: a `clip_text_model`, or a full `clip` config
        (its `text_config` is used)."""
        return _tower_from_hf(cls, "text", hf, overrides)

    def to_hf_config(self) -> dict[str, Any]:
        """The transformers `config.json` of a `CLIPTextModel` with these shapes."""
        return {
            "architectures": ["ClipTextModel"],
            "model_type": "clip_text_model",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
            "eos_token_id": self.eos_token_id,
        }


def _tower_from_hf(cls: type, tower: str, hf: dict[str, Any], overrides: dict[str, Any]) -> Any:
    """A tower's config from a `clip_{tower}_model` config.json dict or a full `clip` one's
    `{tower}_config`; fields missing there keep our defaults, run settings come from `overrides`."""
    model_type = f"clip_{tower}_model"
    if hf.get("model_type") == "clip":
        hf = hf.get(f"{tower}_config") or {}
    elif hf.get("model_type", model_type) != model_type:
        raise ConfigError(f"not a CLIP {tower} config: model_type={hf.get('model_type')!r}")
    defaults = cls()
    fields = {
        f.name: hf.get(f.name, getattr(defaults, f.name))
        for f in dataclasses.fields(cls)
        if f.name not in ("dtype", "param_dtype", "attention", "remat")
    }
    return cls(**{**fields, **overrides})


class ClipTextEmbeddings(nnx.Module):
    """Token embedding plus learned absolute position embedding."""

    def __init__(self, config: ClipTextConfig, *, rngs: nnx.Rngs):
        param_dtype = nn.dtype_of(config.param_dtype)
        self.token_embedding = nnx.Embed(
            config.vocab_size, config.hidden_size, param_dtype=param_dtype,
            embedding_init=nn.logical(nnx.initializers.normal(0.02), ("vocab", "embed")), rngs=rngs,
        )
        self.position_embedding = nnx.Embed(
            config.max_position_embeddings, config.hidden_size, param_dtype=param_dtype,
            embedding_init=nn.logical(nnx.initializers.normal(0.01), (None, "embed")), rngs=rngs,
        )

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        length = input_ids.shape[1]
        positions = self.position_embedding.embedding[...]
        if length > positions.shape[0]:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings {positions.shape[0]}")
        return self.token_embedding.embedding[...][input_ids] + positions[None, :length]


class ClipAttention(nnx.Module):
    """Multi-head attention with q/k/v/out projections (biases), scaled by 1/sqrt(head_dim); causal
    in the text tower."""

    def __init__(self, config: "ClipTextConfig | ClipVisionConfig", *, causal: bool, rngs: nnx.Rngs):
        dim = config.hidden_size
        kw = dict(rngs=rngs, dtype=nn.dtype_of(config.dtype), param_dtype=nn.dtype_of(config.param_dtype))
        self.q_proj = nn.linear(dim, dim, ("embed", "heads"), **kw)
        self.k_proj = nn.linear(dim, dim, ("embed", "heads"), **kw)
        self.v_proj = nn.linear(dim, dim, ("embed", "heads"), **kw)
        self.out_proj = nn.linear(dim, dim, ("heads", "embed"), **kw)
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.implementation = config.attention
        self.causal = causal

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        batch, length, dim = x.shape
        split = lambda t: t.reshape(batch, length, self.num_heads, self.head_dim)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = nn.attention(q, k, v, mask=mask, is_causal=self.causal, implementation=self.implementation)
        return self.out_proj(out.reshape(batch, length, dim))


class ClipMLP(nnx.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, config: "ClipTextConfig | ClipVisionConfig", *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=nn.dtype_of(config.dtype), param_dtype=nn.dtype_of(config.param_dtype))
        self.fc1 = nn.linear(config.hidden_size, config.intermediate_size, ("embed", "mlp"), **kw)
        self.fc2 = nn.linear(config.intermediate_size, config.hidden_size, ("mlp", "embed"), **kw)
        self.act = nn.activation(config.hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(nn.constrain(self.act(self.fc1(x)), ("batch", "length", "mlp")))


class ClipEncoderLayer(nnx.Module):
    """Pre-norm block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: "ClipTextConfig | ClipVisionConfig", *, causal: bool, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, eps=config.layer_norm_eps, dtype=nn.dtype_of(config.dtype),
                  param_dtype=nn.dtype_of(config.param_dtype))
        self.self_attn = ClipAttention(config, causal=causal, rngs=rngs)
        self.layer_norm1 = nn.layer_norm(config.hidden_size, **kw)
        self.mlp = ClipMLP(config, rngs=rngs)
        self.layer_norm2 = nn.layer_norm(config.hidden_size, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask).astype(x.dtype)
        x = x + self.mlp(self.layer_norm2(x)).astype(x.dtype)
        return nn.constrain(x, ("batch", "length", "embed"))


class ClipEncoder(nnx.Module):
    """The stacked layers, run with `lax.scan`."""

    def __init__(self, config: "ClipTextConfig | ClipVisionConfig", *, causal: bool, rngs: nnx.Rngs):
        self.layers = nn.stack_layers(lambda r: ClipEncoderLayer(config, causal=causal, rngs=r),
                                     config.num_hidden_layers, rngs)
        self.remat = config.remat

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        return nn.scan_layers(self.layers, x, lambda layer, carry, _: layer(carry, mask), remat_policy=self.remat)


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Where CLIP pools each sequence: argmax id when `eos_token_id == 2` (legacy configs, where
    the end-of-text token has the largest id), else the first position holding `eos_token_id`."""
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class ClipTextModel(nnx.Module):
    """transformers' `CLIPTextModel`: `model(input_ids, attention_mask=None)` -> (last_hidden_state, pooled).

    Args (call):
      input_ids: (B, L) integer token ids, L <= max_position_embeddings.
      attention_mask: optional (B, L), 1/True for real tokens, combined with the causal mask.
        Flux passes none (see `sga_jax.text`).
    Returns:
      last_hidden_state (B, L, hidden) after the final LayerNorm, and the pooled (B, hidden) state
      at the end-of-text position, both in `config.dtype`.
    """

    def __init__(self, config: ClipTextConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = ClipTextEmbeddings(config, rngs=rngs)
        self.encoder = ClipEncoder(config, causal=True, rngs=rngs)
        self.final_layer_norm = nn.layer_norm(
            config.hidden_size, rngs=rngs, eps=config.layer_norm_eps,
            dtype=nn.dtype_of(config.dtype), param_dtype=nn.dtype_of(config.param_dtype),
        )

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
        dtype = nn.dtype_of(self.config.dtype)
        x = nn.constrain(self.embeddings(input_ids).astype(dtype), ("batch", "length", "embed"))
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        hidden = self.final_layer_norm(self.encoder(x, mask)).astype(dtype)
        pooled = jnp.take_along_axis(hidden, eos_positions(input_ids, self.config.eos_token_id)[:, None, None], axis=1)[:, 0]
        return hidden, pooled


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig(ModelConfig):
    """Hyper-parameters of a CLIP vision tower (names as transformers' `CLIPVisionConfig`)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "xla"
    remat: str = "none"

    def __post_init__(self):
        self.check_positive_ints("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                 "num_channels", "image_size", "patch_size")
        self.check_heads()
        if self.image_size % self.patch_size:
            raise ConfigError(f"ClipVisionConfig.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        nn.activation(self.hidden_act)
        self.check_run_settings()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def vit_b_16(cls, **overrides: Any) -> "ClipVisionConfig":
        """openai/clip-vit-base-patch16's vision tower (the paper's CLIP score)."""
        return cls(**{"patch_size": 16, **overrides})

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides: Any) -> "ClipVisionConfig":
        """Build from a transformers `config.json` dict: a `clip_vision_model`, or a full `clip`
        config (its `vision_config` is used)."""
        return _tower_from_hf(cls, "vision", hf, overrides)


class ClipVisionEmbeddings(nnx.Module):
    """Patch convolution (no bias) + learned class token + learned absolute positions."""

    def __init__(self, config: ClipVisionConfig, *, rngs: nnx.Rngs):
        param_dtype = nn.dtype_of(config.param_dtype)
        self.patch_embedding = nn.conv(
            config.num_channels, config.hidden_size, config.patch_size, strides=config.patch_size,
            padding="VALID", use_bias=False, rngs=rngs, dtype=nn.dtype_of(config.dtype),
            param_dtype=param_dtype, axes=(None, "embed"),
        )
        self.class_embedding = vit.learned_token((config.hidden_size,), rngs, param_dtype)
        self.position_embedding = nnx.Embed(
            config.num_patches + 1, config.hidden_size, param_dtype=param_dtype,
            embedding_init=nn.logical(nnx.initializers.normal(0.02), (None, "embed")), rngs=rngs,
        )

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        patches = self.patch_embedding(pixel_values)
        batch, _, _, dim = patches.shape
        patches = patches.reshape(batch, -1, dim)
        positions = self.position_embedding.embedding[...]
        if patches.shape[1] + 1 != positions.shape[0]:
            raise ValueError(
                f"CLIP vision: {patches.shape[1]} patches but {positions.shape[0] - 1} position embeddings; "
                "resize images to config.image_size"
            )
        token = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype), (batch, 1, dim))
        return jnp.concatenate([token, patches], axis=1) + positions[None].astype(patches.dtype)


class ClipVisionModel(nnx.Module):
    """transformers' `CLIPVisionModel`: `model(pixel_values)` -> (last_hidden_state, pooled).

    pixel_values: (B, image_size, image_size, 3), normalised with `IMAGE_MEAN` / `IMAGE_STD`.
    Returns the encoder output (B, 1 + patches, hidden), not normalised, and the pooled
    `post_layernorm` class token (B, hidden), in `config.dtype`.
    """

    def __init__(self, config: ClipVisionConfig, *, rngs: nnx.Rngs):
        self.config = config
        kw = dict(rngs=rngs, eps=config.layer_norm_eps, dtype=nn.dtype_of(config.dtype),
                  param_dtype=nn.dtype_of(config.param_dtype))
        self.embeddings = ClipVisionEmbeddings(config, rngs=rngs)
        self.pre_layrnorm = nn.layer_norm(config.hidden_size, **kw)
        self.encoder = ClipEncoder(config, causal=False, rngs=rngs)
        self.post_layernorm = nn.layer_norm(config.hidden_size, **kw)

    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != self.config.num_channels:
            raise ValueError(f"pixel_values must be (B, H, W, {self.config.num_channels}), got {pixel_values.shape}")
        dtype = nn.dtype_of(self.config.dtype)
        x = self.pre_layrnorm(self.embeddings(pixel_values.astype(dtype)))
        hidden = self.encoder(nn.constrain(x, ("batch", "length", "embed")), None).astype(dtype)
        return hidden, self.post_layernorm(hidden[:, 0]).astype(dtype)


class ClipModel(nnx.Module):
    """transformers' `CLIPModel` without its logit scale: both towers and their projections, giving
    the joint embeddings CLIP score compares (`image_features`, `text_features`)."""

    def __init__(self, text_config: ClipTextConfig, vision_config: ClipVisionConfig, projection_dim: int,
                 *, rngs: nnx.Rngs):
        self.projection_dim = projection_dim
        self.text_model = ClipTextModel(text_config, rngs=rngs)
        self.vision_model = ClipVisionModel(vision_config, rngs=rngs)
        kw = dict(rngs=rngs, use_bias=False, dtype=nn.dtype_of(text_config.dtype),
                  param_dtype=nn.dtype_of(text_config.param_dtype))
        self.text_projection = nn.linear(text_config.hidden_size, projection_dim, ("embed", None), **kw)
        self.visual_projection = nn.linear(vision_config.hidden_size, projection_dim, ("embed", None), **kw)

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """Normalised pixels (B, S, S, 3) -> projected image embeddings (B, projection_dim)."""
        return self.visual_projection(self.vision_model(pixel_values)[1])

    def text_features(self, input_ids: jax.Array) -> jax.Array:
        """Token ids (B, L) -> projected text embeddings (B, projection_dim)."""
        return self.text_projection(self.text_model(input_ids)[1])
