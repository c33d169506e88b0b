"""The Flux.1 MMDiT (Black Forest Labs) in Flax NNX.

Modules and attribute names follow BFL's checkpoint (`img_in`, `double_blocks.{i}.img_attn.qkv`,
`single_blocks.{i}.linear1`, `final_layer.adaLN_modulation.1`, ...), so the BFL key map is the
parameter path itself and the diffusers map is a short rename table (see `convert.py`).

The 19 double-stream and 38 single-stream blocks are stacked on a leading `layers` axis and run
by `nn.scan_layers`, so each block type compiles once. The forward can also return the
image-branch hidden state after one double block (the features SGA aligns), computed in the
same scanned pass.

With `FluxConfig.lora` set, the linear layers its targets name carry low-rank adapters (one per
projection of the fused qkv and `linear1`, see `nn.lora`) and every other weight is `nn.Frozen`.
Layer names for the targets are the parameter paths without `.kernel`: `img_in`,
`double_blocks.img_attn.qkv` (parts q, k, v), `double_blocks.txt_mlp.0`, `single_blocks.linear1`
(parts q, k, v, mlp), `single_blocks.modulation.lin`, `final_layer.adaLN_modulation.1`, ...
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from sga_jax.errors import ConfigError
from sga_jax.models import nn
from sga_jax.models.config import ModelConfig

ACTIVATION_AXES = ("batch", "length", "embed")
TIME_EMBED_DIM = 256


@dataclasses.dataclass(frozen=True)
class FluxConfig(ModelConfig):
    """Hyper-parameters of the Flux transformer: BFL's `FluxParams` plus run settings.

    `dtype` is the compute dtype and `param_dtype` the storage dtype (names such as "float32",
    "bfloat16"); `remat` is a policy of `nn.REMAT_POLICIES`; `attention` one of
    `nn.ATTENTION_IMPLEMENTATIONS` ("chunked" by default: its memory grows linearly with the
    token count, which a 4K image's 16K tokens need; "cudnn" on NVIDIA GPUs, "splash" on TPUs,
    whose tile sizes are `splash_block_sizes`).
    """

    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention: str = "chunked"
    splash_block_sizes: nn.SplashBlockSizes = nn.SplashBlockSizes()
    lora: nn.LoRAConfig | None = None

    def __post_init__(self):
        object.__setattr__(self, "axes_dim", tuple(int(a) for a in self.axes_dim))
        if isinstance(self.lora, dict):  # from to_dict / JSON
            object.__setattr__(self, "lora", nn.LoRAConfig(**self.lora))
        for name in ("in_channels", "out_channels", "vec_in_dim", "context_in_dim", "hidden_size", "num_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"FluxConfig.{name} must be positive, got {getattr(self, name)}")
        if self.depth < 1 or self.depth_single_blocks < 1:
            raise ConfigError(
                f"FluxConfig: block counts must be >= 1, got depth={self.depth}, "
                f"depth_single_blocks={self.depth_single_blocks}"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"FluxConfig: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if sum(self.axes_dim) != self.head_dim:
            raise ConfigError(
                f"FluxConfig: sum(axes_dim) = sum({self.axes_dim}) = {sum(self.axes_dim)} must equal the head "
                f"dimension hidden_size / num_heads = {self.head_dim}"
            )
        odd = [a for a in self.axes_dim if a <= 0 or a % 2]
        if odd:
            raise ConfigError(f"FluxConfig: every rotary axis dimension must be positive and even, got {self.axes_dim}")
        if self.mlp_ratio <= 0 or self.mlp_hidden_dim <= 0:
            raise ConfigError(f"FluxConfig.mlp_ratio must be positive, got {self.mlp_ratio}")
        self.check_run_settings()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def dev(cls, **overrides: Any) -> "FluxConfig":
        """FLUX.1-dev: guidance-distilled, 19 + 38 blocks, hidden 3072."""
        return cls(**{"guidance_embed": True, **overrides})

    @classmethod
    def schnell(cls, **overrides: Any) -> "FluxConfig":
        """FLUX.1-schnell: as dev without the guidance embedding."""
        return cls(**{"guidance_embed": False, **overrides})

    @classmethod
    def from_diffusers_config(cls, d: dict[str, Any], **overrides: Any) -> "FluxConfig":
        """Build from a diffusers `FluxTransformer2DModel` config.json dict."""
        if d.get("patch_size", 1) != 1:
            raise ConfigError(f"diffusers Flux config: patch_size {d['patch_size']} is not supported (only 1)")
        heads = d.get("num_attention_heads", 24)
        values = dict(
            in_channels=d.get("in_channels", 64),
            out_channels=d.get("out_channels") or d.get("in_channels", 64),
            vec_in_dim=d.get("pooled_projection_dim", 768),
            context_in_dim=d.get("joint_attention_dim", 4096),
            hidden_size=heads * d.get("attention_head_dim", 128),
            num_heads=heads,
            depth=d.get("num_layers", 19),
            depth_single_blocks=d.get("num_single_layers", 38),
            axes_dim=tuple(d.get("axes_dims_rope", (16, 56, 56))),
            guidance_embed=bool(d.get("guidance_embeds", False)),
        )
        values.update(overrides)
        return cls(**values)

    def to_diffusers_config(self) -> dict[str, Any]:
        """The diffusers `FluxTransformer2DModel` config for this model (raises if it has none)."""
        if self.mlp_ratio != 4.0 or self.theta != 10_000 or not self.qkv_bias:
            raise ConfigError(
                "diffusers' FluxTransformer2DModel fixes mlp_ratio=4, theta=10000 and qkv_bias=True; this "
                f"config has mlp_ratio={self.mlp_ratio}, theta={self.theta}, qkv_bias={self.qkv_bias}"
            )
        return {
            "_class_name": "FluxTransformer2DModel",
            "patch_size": 1,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "num_layers": self.depth,
            "num_single_layers": self.depth_single_blocks,
            "attention_head_dim": self.head_dim,
            "num_attention_heads": self.num_heads,
            "joint_attention_dim": self.context_in_dim,
            "pooled_projection_dim": self.vec_in_dim,
            "guidance_embeds": self.guidance_embed,
            "axes_dims_rope": list(self.axes_dim),
        }


def timestep_embedding(t: jax.Array, dim: int = TIME_EMBED_DIM, max_period: float = 10_000.0) -> jax.Array:
    """BFL's sinusoidal embedding of `1000 * t`: [cos, sin] halves, float32, (B,) -> (B, dim)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (1000.0 * t.astype(jnp.float32))[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return (1 + scale) * x + shift


class _Factory:
    """Creates the layers of one model with its dtypes and adapters (keeps module constructors short).

    `scope(name)` gives the factory of a submodule; a layer's name is its parameter path without
    `.kernel`, which is what `FluxConfig.lora.targets` match.
    """

    def __init__(self, config: FluxConfig, rngs: nnx.Rngs, prefix: str = ""):
        self.config = config
        self.rngs = rngs
        self.prefix = prefix
        self.dtype = nn.dtype_of(config.dtype)
        self.param_dtype = nn.dtype_of(config.param_dtype)

    def scope(self, name: str, rngs: nnx.Rngs | None = None) -> "_Factory":
        return _Factory(self.config, rngs or self.rngs, f"{self.prefix}{name}.")

    def linear(self, din: int, dout: int, name: str, axes=("embed", "mlp"), use_bias: bool = True,
               parts: tuple[nn.lora.Part, ...] | None = None) -> nnx.Linear:
        return nn.linear(
            din, dout, axes, rngs=self.rngs, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
            lora=self.config.lora, name=self.prefix + name, parts=parts,
        )

    def norm(self) -> nnx.LayerNorm:
        return nn.layer_norm(
            self.config.hidden_size, rngs=self.rngs, eps=1e-6, affine=False, dtype=self.dtype, param_dtype=self.param_dtype
        )


class MLPEmbedder(nnx.Module):
    """in_layer -> SiLU -> out_layer (time, guidance and pooled-text embeddings)."""

    def __init__(self, make: _Factory, in_dim: int):
        hidden = make.config.hidden_size
        self.in_layer = make.linear(in_dim, hidden, "in_layer")
        self.out_layer = make.linear(hidden, hidden, "out_layer", ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out_layer(jax.nn.silu(self.in_layer(x)))


class Modulation(nnx.Module):
    """`lin(silu(vec))` split into (shift, scale, gate) once or twice, each (B, 1, hidden)."""

    def __init__(self, make: _Factory, double: bool):
        self.multiplier = 6 if double else 3
        hidden = make.config.hidden_size
        self.lin = make.linear(hidden, self.multiplier * hidden, "lin")

    def __call__(self, vec: jax.Array) -> list[jax.Array]:
        out = self.lin(jax.nn.silu(vec))[:, None, :]
        return jnp.split(out, self.multiplier, axis=-1)


class QKNorm(nnx.Module):
    """RMS norms (learned `scale`) of queries and keys, over the head dimension."""

    def __init__(self, make: _Factory):
        dim = make.config.head_dim
        self.query_norm = nn.RMSNorm(dim, eps=1e-6, param_dtype=make.param_dtype, axis_name="kv")
        self.key_norm = nn.RMSNorm(dim, eps=1e-6, param_dtype=make.param_dtype, axis_name="kv")

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.query_norm(q).astype(v.dtype), self.key_norm(k).astype(v.dtype)


def _split_heads(qkv: jax.Array, num_heads: int, norm: QKNorm) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Fused (B, L, 3 * H * D) projections -> QK-normalised q, k and v, each (B, L, H, D)."""
    q, k, v = einops.rearrange(qkv, "b n (qkv h d) -> qkv b n h d", qkv=3, h=num_heads)
    q, k = norm(q, k, v)
    return q, k, v


class SelfAttention(nnx.Module):
    """The projections of one stream of a double block: fused `qkv`, QK `norm`, output `proj`."""

    def __init__(self, make: _Factory):
        hidden = make.config.hidden_size
        self.num_heads = make.config.num_heads
        self.qkv = make.linear(hidden, 3 * hidden, "qkv", ("embed", "heads"), use_bias=make.config.qkv_bias,
                               parts=(("q", hidden), ("k", hidden), ("v", hidden)))
        self.norm = QKNorm(make)
        self.proj = make.linear(hidden, hidden, "proj", ("heads", "embed"))

    def qkv_heads(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(B, L, hidden) -> normalised q, k and v, each (B, L, H, D)."""
        return _split_heads(self.qkv(x), self.num_heads, self.norm)


def _mlp(make: _Factory) -> nnx.List:
    """BFL's `Sequential(Linear, GELU(tanh), Linear)`: parameters at indices 0 and 2."""
    config = make.config
    return nnx.List(
        [
            make.linear(config.hidden_size, config.mlp_hidden_dim, "0"),
            None,
            make.linear(config.mlp_hidden_dim, config.hidden_size, "2", ("mlp", "embed")),
        ]
    )


def _run_mlp(mlp: nnx.List, x: jax.Array) -> jax.Array:
    return mlp[2](nn.gelu_tanh(mlp[0](x)))


def _joint_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, rope: tuple[jax.Array, jax.Array], config: FluxConfig
) -> jax.Array:
    """RoPE on q and k, attention, heads merged: (B, L, H, D) -> (B, L, H * D)."""
    cos, sin = rope
    q = nn.apply_rope(q, cos, sin, interleaved=True)
    k = nn.apply_rope(k, cos, sin, interleaved=True)
    out = nn.attention(q, k, v, implementation=config.attention, block_sizes=config.splash_block_sizes)
    return einops.rearrange(out, "b n h d -> b n (h d)")


class DoubleStreamBlock(nnx.Module):
    """Separate weights for the image and text streams, joint attention over [txt, img]."""

    def __init__(self, make: _Factory):
        self.config = make.config
        self.img_mod = Modulation(make.scope("img_mod"), double=True)
        self.img_norm1 = make.norm()
        self.img_attn = SelfAttention(make.scope("img_attn"))
        self.img_norm2 = make.norm()
        self.img_mlp = _mlp(make.scope("img_mlp"))
        self.txt_mod = Modulation(make.scope("txt_mod"), double=True)
        self.txt_norm1 = make.norm()
        self.txt_attn = SelfAttention(make.scope("txt_attn"))
        self.txt_norm2 = make.norm()
        self.txt_mlp = _mlp(make.scope("txt_mlp"))

    def __call__(
        self, img: jax.Array, txt: jax.Array, vec: jax.Array, rope: tuple[jax.Array, jax.Array]
    ) -> tuple[jax.Array, jax.Array]:
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(vec)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(vec)

        img_q, img_k, img_v = self.img_attn.qkv_heads(_modulate(self.img_norm1(img), img_shift1, img_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(_modulate(self.txt_norm1(txt), txt_shift1, txt_scale1))
        attn = _joint_attention(
            jnp.concatenate([txt_q, img_q], axis=1),
            jnp.concatenate([txt_k, img_k], axis=1),
            jnp.concatenate([txt_v, img_v], axis=1),
            rope,
            self.config,
        )
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = img + img_gate1 * self.img_attn.proj(img_attn)
        img = img + img_gate2 * _run_mlp(self.img_mlp, _modulate(self.img_norm2(img), img_shift2, img_scale2))
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + txt_gate2 * _run_mlp(self.txt_mlp, _modulate(self.txt_norm2(txt), txt_shift2, txt_scale2))
        return img, txt


class SingleStreamBlock(nnx.Module):
    """Parallel attention and MLP over the joint sequence: `linear1` -> [q, k, v, mlp], `linear2`."""

    def __init__(self, make: _Factory):
        config = make.config
        self.config = config
        self.num_heads = config.num_heads
        self.hidden_size = config.hidden_size
        hidden = config.hidden_size
        self.linear1 = make.linear(hidden, 3 * hidden + config.mlp_hidden_dim, "linear1",
                                   parts=(("q", hidden), ("k", hidden), ("v", hidden), ("mlp", config.mlp_hidden_dim)))
        self.linear2 = make.linear(hidden + config.mlp_hidden_dim, hidden, "linear2", ("mlp", "embed"))
        self.norm = QKNorm(make)
        self.pre_norm = make.norm()
        self.modulation = Modulation(make.scope("modulation"), double=False)

    def __call__(self, x: jax.Array, vec: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
        shift, scale, gate = self.modulation(vec)
        hidden = self.linear1(_modulate(self.pre_norm(x), shift, scale))
        qkv, mlp = hidden[..., : 3 * self.hidden_size], hidden[..., 3 * self.hidden_size :]
        attn = _joint_attention(*_split_heads(qkv, self.num_heads, self.norm), rope, self.config)
        return x + gate * self.linear2(jnp.concatenate([attn, nn.gelu_tanh(mlp)], axis=-1))


class LastLayer(nnx.Module):
    """Final adaptive LayerNorm (shift, scale from `adaLN_modulation.1`) and output `linear`."""

    def __init__(self, make: _Factory):
        config = make.config
        self.norm_final = make.norm()
        self.linear = make.linear(config.hidden_size, config.out_channels, "linear", ("embed", None))
        self.adaLN_modulation = nnx.List([None, make.linear(config.hidden_size, 2 * config.hidden_size, "adaLN_modulation.1")])

    def __call__(self, x: jax.Array, vec: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.adaLN_modulation[1](jax.nn.silu(vec)), 2, axis=-1)
        return self.linear(_modulate(self.norm_final(x), shift[:, None], scale[:, None]))


class Flux(nnx.Module):
    """The Flux transformer: `model(img, img_ids, txt, txt_ids, timesteps, y, guidance)` as BFL's.

    Inputs: img (B, L_img, in_channels) packed latents, img_ids (B, L_img, 3) or (L_img, 3),
    txt (B, L_txt, context_in_dim), txt_ids likewise, timesteps (B,) in [0, 1], y (B, vec_in_dim)
    pooled text, guidance (B,) for guidance-distilled models. Returns (B, L_img, out_channels).
    With `config.lora`, the weights other than the adapters are `nn.Frozen`.
    """

    def __init__(self, config: FluxConfig, *, rngs: nnx.Rngs):
        self.config = config
        make = _Factory(config, rngs)
        hidden = config.hidden_size
        self.img_in = make.linear(config.in_channels, hidden, "img_in", (None, "embed"))
        self.time_in = MLPEmbedder(make.scope("time_in"), TIME_EMBED_DIM)
        self.vector_in = MLPEmbedder(make.scope("vector_in"), config.vec_in_dim)
        self.guidance_in = MLPEmbedder(make.scope("guidance_in"), TIME_EMBED_DIM) if config.guidance_embed else None
        self.txt_in = make.linear(config.context_in_dim, hidden, "txt_in", (None, "embed"))
        self.double_blocks = nn.stack_layers(lambda r: DoubleStreamBlock(make.scope("double_blocks", r)), config.depth, rngs)
        self.single_blocks = nn.stack_layers(
            lambda r: SingleStreamBlock(make.scope("single_blocks", r)), config.depth_single_blocks, rngs
        )
        self.final_layer = LastLayer(make.scope("final_layer"))
        if config.lora is not None:
            if not any(True for _ in nn.adapted_layers(self)):
                raise ValueError(f"FluxConfig.lora.targets {config.lora.targets} match no layer of Flux "
                                 f"(names such as 'double_blocks.img_attn.qkv', 'single_blocks.linear1.q')")
            nn.freeze(self)

    def __call__(
        self,
        img: jax.Array,
        img_ids: jax.Array,
        txt: jax.Array,
        txt_ids: jax.Array,
        timesteps: jax.Array,
        y: jax.Array,
        guidance: jax.Array | None = None,
        *,
        hidden_block: int | None = None,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Predict the flow velocity; with `hidden_block=k` also return the image hidden state.

        hidden_block: index into `double_blocks` (0-based); the second output is the image
        stream after that block, (B, L_img, hidden_size) in the compute dtype, taken in the same
        scanned pass (diffusers' `transformer_blocks[k]` image output).
        """
        config = self.config
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"Flux: img and txt must be (B, L, C), got {img.shape} and {txt.shape}")
        if config.guidance_embed and guidance is None:
            raise ValueError("Flux: this model has a guidance embedding (dev); pass guidance (B,)")
        if hidden_block is not None and not 0 <= hidden_block < config.depth:
            raise ValueError(f"Flux: hidden_block {hidden_block} is outside the {config.depth} double blocks")
        dtype = nn.dtype_of(config.dtype)

        img = nn.constrain(self.img_in(img.astype(dtype)), ACTIVATION_AXES)
        vec = self.time_in(timestep_embedding(timesteps).astype(dtype))
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance).astype(dtype))
        vec = vec + self.vector_in(y.astype(dtype))
        txt = nn.constrain(self.txt_in(txt.astype(dtype)), ACTIVATION_AXES)

        batch = img.shape[0]
        ids = jnp.concatenate(
            [jnp.broadcast_to(txt_ids, (batch, *txt_ids.shape[-2:])), jnp.broadcast_to(img_ids, (batch, *img_ids.shape[-2:]))],
            axis=1,
        )
        rope = nn.axial_rope(ids, config.axes_dim, config.theta)

        def double(block: DoubleStreamBlock, carry, index):
            img, txt, tap = carry
            img, txt = block(img, txt, vec, rope)
            img = nn.constrain(img, ACTIVATION_AXES)
            txt = nn.constrain(txt, ACTIVATION_AXES)
            if tap is not None:
                tap = jnp.where(index == hidden_block, img, tap)
            return img, txt, tap

        tap = jnp.zeros_like(img) if hidden_block is not None else None
        img, txt, tap = nn.scan_layers(self.double_blocks, (img, txt, tap), double, remat_policy=config.remat)

        def single(block: SingleStreamBlock, x, index):
            return nn.constrain(block(x, vec, rope), ACTIVATION_AXES)

        x = jnp.concatenate([txt, img], axis=1)
        x = nn.scan_layers(self.single_blocks, x, single, remat_policy=config.remat)
        out = self.final_layer(x[:, txt.shape[1] :], vec)
        return out if hidden_block is None else (out, tap)
