"""CLIP text transformer (Flux's `text_encoder`, OpenAI CLIP ViT-L/14), as transformers' `CLIPTextModel`.

Architecture facts (transformers `modeling_clip.py`): token + learned absolute position
embeddings, pre-norm blocks (LayerNorm, causal multi-head attention with biases and 1/sqrt(d)
scaling, quick-GELU MLP), a final LayerNorm, and a pooled output taken at the end-of-text token:
the position of the largest id when the config's `eos_token_id` is 2 (the legacy configs that
Flux's CLIP-L ships), else the first position holding `eos_token_id`.

Attribute names follow the checkpoint (`embeddings.token_embedding`, `encoder.layers.self_attn.q_proj`,
`final_layer_norm`); the layers are stacked on a leading "layers" axis and run with `lax.scan`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sga_jax.models import layers as L
from sga_jax.models.config import ModelConfig


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
    attention_implementations = ("xla", "cudnn")  # "chunked" takes no causal and padding masks

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ClipTextConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"ClipTextConfig.hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        L.activation(self.hidden_act)
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
        if hf.get("model_type") == "clip":
            hf = hf.get("text_config") or {}
        elif hf.get("model_type", "clip_text_model") != "clip_text_model":
            raise ValueError(f"not a CLIP text config: model_type={hf.get('model_type')!r}")
        defaults = cls()
        fields = {
            f.name: hf.get(f.name, getattr(defaults, f.name))
            for f in dataclasses.fields(cls)
            if f.name not in ("dtype", "param_dtype", "attention", "remat")
        }
        return cls(**{**fields, **overrides})

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


class ClipTextEmbeddings(nnx.Module):
    """Token embedding plus learned absolute position embedding."""

    def __init__(self, config: ClipTextConfig, *, rngs: nnx.Rngs):
        param_dtype = L.dtype_of(config.param_dtype)
        self.token_embedding = nnx.Embed(
            config.vocab_size, config.hidden_size, param_dtype=param_dtype,
            embedding_init=L.logical(nnx.initializers.normal(0.02), ("vocab", "embed")), rngs=rngs,
        )
        self.position_embedding = nnx.Embed(
            config.max_position_embeddings, config.hidden_size, param_dtype=param_dtype,
            embedding_init=L.logical(nnx.initializers.normal(0.01), (None, "embed")), rngs=rngs,
        )

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        length = input_ids.shape[1]
        positions = self.position_embedding.embedding[...]
        if length > positions.shape[0]:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings {positions.shape[0]}")
        return self.token_embedding.embedding[...][input_ids] + positions[None, :length]


class ClipAttention(nnx.Module):
    """Multi-head attention with q/k/v/out projections (biases), scaled by 1/sqrt(head_dim)."""

    def __init__(self, config: ClipTextConfig, *, rngs: nnx.Rngs):
        dim = config.hidden_size
        kw = dict(rngs=rngs, dtype=L.dtype_of(config.dtype), param_dtype=L.dtype_of(config.param_dtype))
        self.q_proj = L.linear(dim, dim, ("embed", "heads"), **kw)
        self.k_proj = L.linear(dim, dim, ("embed", "heads"), **kw)
        self.v_proj = L.linear(dim, dim, ("embed", "heads"), **kw)
        self.out_proj = L.linear(dim, dim, ("heads", "embed"), **kw)
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.implementation = config.attention

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        batch, length, dim = x.shape
        split = lambda t: t.reshape(batch, length, self.num_heads, self.head_dim)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = L.attention(q, k, v, mask=mask, is_causal=True, implementation=self.implementation)
        return self.out_proj(out.reshape(batch, length, dim))


class ClipMLP(nnx.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, config: ClipTextConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=L.dtype_of(config.dtype), param_dtype=L.dtype_of(config.param_dtype))
        self.fc1 = L.linear(config.hidden_size, config.intermediate_size, ("embed", "mlp"), **kw)
        self.fc2 = L.linear(config.intermediate_size, config.hidden_size, ("mlp", "embed"), **kw)
        self.act = L.activation(config.hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(L.constrain(self.act(self.fc1(x)), ("batch", "length", "mlp")))


class ClipEncoderLayer(nnx.Module):
    """Pre-norm block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: ClipTextConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, eps=config.layer_norm_eps, dtype=L.dtype_of(config.dtype),
                  param_dtype=L.dtype_of(config.param_dtype))
        self.self_attn = ClipAttention(config, rngs=rngs)
        self.layer_norm1 = L.layer_norm(config.hidden_size, **kw)
        self.mlp = ClipMLP(config, rngs=rngs)
        self.layer_norm2 = L.layer_norm(config.hidden_size, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask).astype(x.dtype)
        x = x + self.mlp(self.layer_norm2(x)).astype(x.dtype)
        return L.constrain(x, ("batch", "length", "embed"))


class ClipEncoder(nnx.Module):
    """The stacked layers, run with `lax.scan`."""

    def __init__(self, config: ClipTextConfig, *, rngs: nnx.Rngs):
        self.layers = L.stack_layers(lambda r: ClipEncoderLayer(config, rngs=r), config.num_hidden_layers, rngs)
        self.remat = config.remat

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        return L.scan_layers(self.layers, x, lambda layer, carry, _: layer(carry, mask), remat_policy=self.remat)


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
        self.encoder = ClipEncoder(config, rngs=rngs)
        self.final_layer_norm = L.layer_norm(
            config.hidden_size, rngs=rngs, eps=config.layer_norm_eps,
            dtype=L.dtype_of(config.dtype), param_dtype=L.dtype_of(config.param_dtype),
        )

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
        dtype = L.dtype_of(self.config.dtype)
        x = L.constrain(self.embeddings(input_ids).astype(dtype), ("batch", "length", "embed"))
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        hidden = self.final_layer_norm(self.encoder(x, mask)).astype(dtype)
        pooled = jnp.take_along_axis(hidden, eos_positions(input_ids, self.config.eos_token_id)[:, None, None], axis=1)[:, 0]
        return hidden, pooled
