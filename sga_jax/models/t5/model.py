"""T5 encoder (T5 v1.1 / T5-XXL as Flux uses it), as transformers' `T5EncoderModel`.

Architecture facts (transformers `modeling_t5.py`): pre-norm blocks with an RMS "layer norm"
(no mean, no bias), attention logits NOT scaled by 1/sqrt(d), a learned relative position bias
computed once from block 0's `relative_attention_bias` table and shared by every block, and a
gated tanh-GELU feed-forward `wo(gelu(wi_0 x) * wi_1 x)` (v1.1; original T5 has `wo(relu(wi x))`).

Attribute names follow the checkpoint (`shared`, `encoder.block.layer.0.SelfAttention.q`, ...), so
the converter is a table of renames. Blocks are stacked on a leading "layers" axis and run with
`lax.scan`; the relative-bias table, which only block 0 has in the checkpoint, lives on the stack
(`encoder.relative_attention_bias`).

Precision: matmuls run in `config.dtype`, but the residual stream is kept in float32. That is
what transformers does in bf16 too: it keeps `wo` in float32 (`_keep_in_fp32_modules`), so the
first feed-forward output promotes the residual stream to float32 for the rest of the network.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sga_jax.errors import ConfigError
from sga_jax.models import nn
from sga_jax.models.config import ModelConfig

_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu", "silu")


@dataclasses.dataclass(frozen=True)
class T5Config(ModelConfig):
    """Hyper-parameters of a T5 encoder (names as transformers' `T5Config`).

    Attributes:
      vocab_size: rows of the shared token embedding.
      d_model: width of the residual stream.
      d_kv: width of one attention head.
      d_ff: width of the feed-forward layer.
      num_layers: encoder blocks.
      num_heads: attention heads.
      relative_attention_num_buckets / relative_attention_max_distance: relative position buckets.
      layer_norm_epsilon: RMS norm epsilon.
      dense_act_fn: feed-forward activation (Hugging Face name).
      is_gated_act: gated feed-forward (`wi_0`, `wi_1`; T5 v1.1) or plain (`wi`; original T5).
      dtype: compute dtype of matmuls and of the output; param_dtype: storage dtype of parameters.
      attention: implementation passed to `nn.attention` ("xla" or "cudnn").
      remat: rematerialisation policy of the block scan ("none", "full", "dots", "dots_no_batch").
    """

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "gelu_new"
    is_gated_act: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "xla"
    remat: str = "none"
    attention_implementations = nn.MASKING_IMPLEMENTATIONS  # relative-position bias and padding mask

    def __post_init__(self):
        self.check_positive_ints("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                                 "relative_attention_num_buckets", "relative_attention_max_distance")
        if self.relative_attention_num_buckets < 4:
            raise ConfigError(
                f"T5Config.relative_attention_num_buckets must be >= 4 (two directions, exact and log "
                f"buckets), got {self.relative_attention_num_buckets}"
            )
        if self.dense_act_fn not in _ACTIVATIONS:
            raise ConfigError(f"T5Config.dense_act_fn {self.dense_act_fn!r} is not one of {_ACTIVATIONS}")
        self.check_run_settings()

    @classmethod
    def xxl(cls, **overrides: Any) -> "T5Config":
        """T5 v1.1 XXL encoder (google/t5-v1_1-xxl), Flux's `text_encoder_2`: 4.76 B parameters."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> "T5Config":
        """A few-thousand-parameter encoder for tests and the demo."""
        defaults = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, relative_attention_max_distance=20)
        return cls(**{**defaults, **overrides})

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides: Any) -> "T5Config":
        """Build from a transformers `config.json` dict (model_type "t5")."""
        if hf.get("model_type", "t5") != "t5":
            raise ConfigError(f"not a T5 config: model_type={hf.get('model_type')!r}")
        # As transformers' T5Config: both come from feed_forward_proj ("relu", "gated-gelu", ...),
        # and "gated-gelu" means the tanh approximation.
        projection = hf.get("feed_forward_proj", "relu")
        gated = projection.split("-")[0] == "gated"
        act = "gelu_new" if projection == "gated-gelu" else projection.split("-")[-1]
        fields = dict(
            vocab_size=hf["vocab_size"],
            d_model=hf["d_model"],
            d_kv=hf["d_kv"],
            d_ff=hf["d_ff"],
            num_layers=hf["num_layers"],
            num_heads=hf["num_heads"],
            relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
            dense_act_fn=act,
            is_gated_act=gated,
        )
        return cls(**{**fields, **overrides})

    def _feed_forward_proj(self) -> str:
        if self.is_gated_act and self.dense_act_fn in ("gelu_new", "gelu_pytorch_tanh"):
            return "gated-gelu"
        if self.is_gated_act and self.dense_act_fn == "gelu":
            raise ConfigError("transformers' T5Config cannot express a gated exact-GELU feed-forward")
        return ("gated-" if self.is_gated_act else "") + self.dense_act_fn

    def to_hf_config(self) -> dict[str, Any]:
        """The transformers `config.json` of a `T5EncoderModel` with these shapes."""
        return {
            "architectures": ["T5EncoderModel"],
            "model_type": "t5",
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "d_kv": self.d_kv,
            "d_ff": self.d_ff,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": self.relative_attention_max_distance,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "dense_act_fn": self.dense_act_fn,
            "is_gated_act": self.is_gated_act,
            "feed_forward_proj": self._feed_forward_proj(),
            "is_encoder_decoder": False,
            "use_cache": False,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "tie_word_embeddings": False,
        }


def relative_position_buckets(
    query_length: int, key_length: int, *, num_buckets: int, max_distance: int, bidirectional: bool = True
) -> np.ndarray:
    """T5's bucket index of every (query, key) pair, (Lq, Lk) int32, computed on the host.

    Half the buckets (per direction when bidirectional) count exact offsets, the rest grow
    logarithmically up to `max_distance`. The arithmetic is float32 in the same order as
    transformers' `_relative_position_bucket`, so bucket boundaries agree exactly.
    """
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    buckets = np.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).astype(relative.dtype) * num_buckets
        relative = np.abs(relative)
    else:
        relative = -np.minimum(relative, 0)
    max_exact = num_buckets // 2
    scaled = np.log(np.maximum(relative, 1).astype(np.float32) / np.float32(max_exact))
    scaled = scaled / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
    large = np.minimum(max_exact + scaled.astype(relative.dtype), num_buckets - 1)
    return (buckets + np.where(relative < max_exact, relative, large)).astype(np.int32)


class T5Attention(nnx.Module):
    """Multi-head self-attention without logit scaling; the position bias comes from outside."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        inner = config.num_heads * config.d_kv
        dtype, param_dtype = nn.dtype_of(config.dtype), nn.dtype_of(config.param_dtype)
        kw = dict(rngs=rngs, use_bias=False, dtype=dtype, param_dtype=param_dtype)
        self.q = nn.linear(config.d_model, inner, ("embed", "heads"), **kw)
        self.k = nn.linear(config.d_model, inner, ("embed", "heads"), **kw)
        self.v = nn.linear(config.d_model, inner, ("embed", "heads"), **kw)
        self.o = nn.linear(inner, config.d_model, ("heads", "embed"), **kw)
        self.num_heads = config.num_heads
        self.d_kv = config.d_kv
        self.implementation = config.attention

    def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array | None) -> jax.Array:
        batch, length, _ = x.shape
        split = lambda t: t.reshape(batch, length, self.num_heads, self.d_kv)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        out = nn.attention(q, k, v, bias=bias.astype(q.dtype), mask=mask, scale=1.0, implementation=self.implementation)
        return self.o(out.reshape(batch, length, self.num_heads * self.d_kv))


class T5LayerSelfAttention(nnx.Module):
    """Pre-norm residual self-attention sub-layer (`layer.0`)."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.SelfAttention = T5Attention(config, rngs=rngs)
        self.layer_norm = nn.RMSNorm(config.d_model, eps=config.layer_norm_epsilon,
                                    param_dtype=nn.dtype_of(config.param_dtype))

    def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array | None) -> jax.Array:
        return x + self.SelfAttention(self.layer_norm(x), bias, mask).astype(x.dtype)


class T5DenseReluDense(nnx.Module):
    """Feed-forward: `wo(act(wi_0 x) * wi_1 x)` when gated, else `wo(act(wi x))`."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, use_bias=False, dtype=nn.dtype_of(config.dtype), param_dtype=nn.dtype_of(config.param_dtype))
        self.gated = config.is_gated_act
        if self.gated:
            self.wi_0 = nn.linear(config.d_model, config.d_ff, ("embed", "mlp"), **kw)
            self.wi_1 = nn.linear(config.d_model, config.d_ff, ("embed", "mlp"), **kw)
        else:
            self.wi = nn.linear(config.d_model, config.d_ff, ("embed", "mlp"), **kw)
        self.wo = nn.linear(config.d_ff, config.d_model, ("mlp", "embed"), **kw)
        self.act = nn.activation(config.dense_act_fn)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(nn.constrain(hidden, ("batch", "length", "mlp")))


class T5LayerFF(nnx.Module):
    """Pre-norm residual feed-forward sub-layer (`layer.1`)."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.DenseReluDense = T5DenseReluDense(config, rngs=rngs)
        self.layer_norm = nn.RMSNorm(config.d_model, eps=config.layer_norm_epsilon,
                                    param_dtype=nn.dtype_of(config.param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.DenseReluDense(self.layer_norm(x)).astype(x.dtype)


class T5Block(nnx.Module):
    """One encoder block: `layer = [self-attention, feed-forward]`, as in the checkpoint."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.layer = nnx.List([T5LayerSelfAttention(config, rngs=rngs), T5LayerFF(config, rngs=rngs)])

    def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array | None) -> jax.Array:
        x = self.layer[0](x, bias, mask)
        x = self.layer[1](x)
        return nn.constrain(x, ("batch", "length", "embed"))


class T5Stack(nnx.Module):
    """The encoder: stacked blocks, the shared relative-position table, and the final norm."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        param_dtype = nn.dtype_of(config.param_dtype)
        self.relative_attention_bias = nnx.Embed(
            config.relative_attention_num_buckets,
            config.num_heads,
            param_dtype=param_dtype,
            embedding_init=nn.logical(nnx.initializers.normal(config.d_model**-0.5), (None, "heads")),
            rngs=rngs,
        )
        self.block = nn.stack_layers(lambda r: T5Block(config, rngs=r), config.num_layers, rngs)
        self.final_layer_norm = nn.RMSNorm(config.d_model, eps=config.layer_norm_epsilon, param_dtype=param_dtype)

    def position_bias(self, length: int) -> jax.Array:
        """The (1, heads, L, L) float32 logits bias shared by every block."""
        buckets = relative_position_buckets(
            length, length,
            num_buckets=self.config.relative_attention_num_buckets,
            max_distance=self.config.relative_attention_max_distance,
        )
        table = self.relative_attention_bias.embedding[...].astype(jnp.float32)
        return jnp.transpose(table[buckets], (2, 0, 1))[None]

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        bias = self.position_bias(x.shape[1])
        x = scan_blocks(self.block, x, bias, mask, self.config.remat)
        return self.final_layer_norm(x)


def scan_blocks(block: T5Block, x: jax.Array, bias: jax.Array, mask: jax.Array | None, remat: str) -> jax.Array:
    """Run the stacked blocks over the float32 residual stream `x`."""
    return nn.scan_layers(block, x, lambda layer, carry, _: layer(carry, bias, mask), remat_policy=remat)


class T5EncoderModel(nnx.Module):
    """transformers' `T5EncoderModel`: `model(input_ids, attention_mask=None)` -> last_hidden_state.

    Args (call):
      input_ids: (B, L) integer token ids.
      attention_mask: optional (B, L), 1/True for real tokens. Padded keys are then excluded from
        attention; the output at padded positions is still computed (as transformers does). Flux
        passes no mask (see `sga_jax.text`).
    Returns:
      (B, L, d_model) in `config.dtype`.
    """

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        self.shared = nnx.Embed(
            config.vocab_size,
            config.d_model,
            param_dtype=nn.dtype_of(config.param_dtype),
            embedding_init=nn.logical(nnx.initializers.normal(1.0), ("vocab", "embed")),
            rngs=rngs,
        )
        self.encoder = T5Stack(config, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
        x = self.shared.embedding[...][input_ids].astype(jnp.float32)
        x = nn.constrain(x, ("batch", "length", "embed"))
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        out = self.encoder(x, mask)
        return out.astype(nn.dtype_of(self.config.dtype))
