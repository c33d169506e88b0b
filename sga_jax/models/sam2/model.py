"""SAM2's image-encoder trunk (Hiera, as in `Sam2HieraDetModel`) in Flax NNX.

A 7x7 stride-4 patch convolution; a position embedding made of a learned background table resized
with PyTorch's bicubic to the stride-4 grid plus a learned window table tiled over it; then four
stages of multi-scale blocks. Each stage after the first opens with a block that projects to the
new width and halves the grid by 2x2 max-pooling the queries (and the projected shortcut) inside
its windows; the other blocks attend within non-overlapping windows (zero-padded to a multiple of
the window) except the listed global-attention blocks. All arrays stay channels-last
(B, H, W, C); the last stage has stride 32.

Blocks of one stage share shapes and are stacked and run with `lax.scan`; a stage that mixes
windowed and global blocks picks the attention per layer with `lax.cond`. Parameter names follow
the hub checkpoint's block (`layer_norm1`, `attn.qkv`, `attn.proj`, `mlp.proj_in`, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sga_jax.errors import ConfigError
from sga_jax.models import nn
from sga_jax.models.config import ModelConfig

IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Sam2HieraConfig(ModelConfig):
    """Hiera trunk hyper-parameters (names as transformers' `Sam2HieraDetConfig`) plus compute settings.

    Defaults are SAM2 / SAM2.1 Hiera B+ (facebook/sam2.1-hiera-base-plus).
    """

    hidden_size: int = 112
    num_attention_heads: int = 2
    num_channels: int = 3
    image_size: tuple[int, int] = (1024, 1024)
    patch_kernel_size: tuple[int, int] = (7, 7)
    patch_stride: tuple[int, int] = (4, 4)
    patch_padding: tuple[int, int] = (3, 3)
    query_stride: tuple[int, int] = (2, 2)
    window_positional_embedding_background_size: tuple[int, int] = (14, 14)
    num_query_pool_stages: int = 3
    blocks_per_stage: tuple[int, ...] = (2, 3, 16, 3)
    embed_dim_per_stage: tuple[int, ...] = (112, 224, 448, 896)
    num_attention_heads_per_stage: tuple[int, ...] = (2, 4, 8, 16)
    window_size_per_stage: tuple[int, ...] = (8, 4, 14, 7)
    global_attention_blocks: tuple[int, ...] = (12, 16, 20)
    mlp_ratio: float = 4.0
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "xla"
    remat: str = "none"

    def __post_init__(self):
        stages = len(self.blocks_per_stage)
        for name in ("embed_dim_per_stage", "num_attention_heads_per_stage", "window_size_per_stage"):
            if len(getattr(self, name)) != stages:
                raise ConfigError(f"Sam2HieraConfig.{name} has {len(getattr(self, name))} entries, expected {stages} (one per stage)")
        if self.embed_dim_per_stage[0] != self.hidden_size:
            raise ConfigError(
                f"Sam2HieraConfig: hidden_size {self.hidden_size} must equal embed_dim_per_stage[0] {self.embed_dim_per_stage[0]}"
            )
        if self.query_stride[0] != self.query_stride[1]:
            raise ConfigError(f"Sam2HieraConfig: query_stride {self.query_stride} must be square")
        if not 0 <= self.num_query_pool_stages < stages:
            raise ConfigError(f"Sam2HieraConfig: num_query_pool_stages {self.num_query_pool_stages} must be below {stages}")
        for s in range(1, stages):
            pooled = s <= self.num_query_pool_stages
            if pooled and self.embed_dim_per_stage[s] == self.embed_dim_per_stage[s - 1]:
                raise ConfigError(f"Sam2HieraConfig: query-pooling stage {s} must change the width (as Hiera does)")
            if pooled and self.window_size_per_stage[s - 1] % self.query_stride[0]:
                raise ConfigError(
                    f"Sam2HieraConfig: window {self.window_size_per_stage[s - 1]} of stage {s - 1} is not a multiple "
                    f"of the query stride {self.query_stride[0]}"
                )
        for dim, heads in zip(self.embed_dim_per_stage, self.num_attention_heads_per_stage):
            if dim % heads:
                raise ConfigError(f"Sam2HieraConfig: width {dim} is not divisible by {heads} heads")
        if any(b >= sum(self.blocks_per_stage) for b in self.global_attention_blocks):
            raise ConfigError(f"Sam2HieraConfig: global_attention_blocks {self.global_attention_blocks} beyond the last block")
        nn.activation(self.hidden_act)
        self.check_run_settings()

    @property
    def stride(self) -> int:
        """Pixels per token of the last stage (32 for SAM2)."""
        return self.patch_stride[0] * self.query_stride[0] ** self.num_query_pool_stages

    @property
    def stage_starts(self) -> tuple[int, ...]:
        """Index of each stage's first block in the checkpoint's flat block list."""
        return tuple(int(x) for x in np.cumsum((0,) + tuple(self.blocks_per_stage))[:-1])

    def window_of(self, block: int) -> int:
        """Attention window of flat block `block` (0: global), as transformers assigns it."""
        stage = int(np.searchsorted(np.cumsum(self.blocks_per_stage), block, side="right"))
        if block in self.global_attention_blocks:
            return 0
        first = block == self.stage_starts[stage]
        return self.window_size_per_stage[stage - 1] if stage > 0 and first else self.window_size_per_stage[stage]

    @classmethod
    def base_plus(cls, **overrides: Any) -> "Sam2HieraConfig":
        """SAM2 / SAM2.1 Hiera B+ (the paper's "SAM2-B/32")."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> "Sam2HieraConfig":
        """A small random-weight configuration for tests and the CPU demo: windowed, padded and
        global blocks, and a stage that mixes windowed and global attention."""
        base = dict(
            hidden_size=16, num_attention_heads=1, image_size=(64, 64), blocks_per_stage=(1, 2, 3, 2),
            embed_dim_per_stage=(16, 32, 64, 128), num_attention_heads_per_stage=(1, 2, 2, 4),
            window_size_per_stage=(4, 2, 4, 2), global_attention_blocks=(4, 7),
            window_positional_embedding_background_size=(6, 6),
        )
        return cls(**{**base, **overrides})

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides: Any) -> "Sam2HieraConfig":
        """Read a transformers config dict: "sam2" (full model), "sam2_vision_model" or
        "sam2_hiera_det_model"; the trunk's settings are taken from where each keeps them."""
        model_type = hf.get("model_type")
        if model_type == "sam2":
            hf = hf["vision_config"]
            model_type = hf.get("model_type")
        if model_type == "sam2_vision_model":
            hf = hf["backbone_config"]
            model_type = hf.get("model_type")
        if model_type != "sam2_hiera_det_model":
            raise ConfigError(f"config.json: model_type {model_type!r} is not a SAM2 model")
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
        pairs = {"image_size", "patch_kernel_size", "patch_stride", "patch_padding", "query_stride",
                 "window_positional_embedding_background_size"}
        hf_defaults = dict(
            hidden_size=96, num_attention_heads=1, window_positional_embedding_background_size=(7, 7),
            blocks_per_stage=(1, 2, 7, 2), embed_dim_per_stage=(96, 192, 384, 768),
            num_attention_heads_per_stage=(1, 2, 4, 8), window_size_per_stage=(8, 4, 14, 7),
            global_attention_blocks=(5, 7, 9),
        )
        fields: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in ("dtype", "param_dtype", "attention", "remat"):
                continue
            value = hf.get(f.name)
            if value is None:
                value = hf_defaults.get(f.name)
            if value is None:
                continue
            fields[f.name] = pair(value) if f.name in pairs else tuple(value) if isinstance(value, list) else value
        return cls(**{**fields, **overrides})


def max_pool(x: jax.Array, stride: int) -> jax.Array:
    """stride x stride max pooling of (B, H, W, C), dropping an incomplete last row/column."""
    h, w = x.shape[1] // stride * stride, x.shape[2] // stride * stride
    return einops.reduce(x[:, :h, :w], "b (h sh) (w sw) c -> b h w c", "max", sh=stride, sw=stride)


def window_partition(x: jax.Array, window: int) -> tuple[jax.Array, tuple[int, int]]:
    """(B, H, W, C) -> (B * nh * nw, window, window, C), zero-padding H and W up to multiples."""
    h, w = x.shape[1:3]
    hp, wp = h + (-h) % window, w + (-w) % window
    x = jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
    return einops.rearrange(x, "b (nh wh) (nw ww) c -> (b nh nw) wh ww c", wh=window, ww=window), (hp, wp)


def window_unpartition(windows: jax.Array, window: int, padded: tuple[int, int], size: tuple[int, int]) -> jax.Array:
    """Inverse of `window_partition`: back to (B, H, W, C) with the padding cropped."""
    x = einops.rearrange(windows, "(b nh nw) wh ww c -> b (nh wh) (nw ww) c", nh=padded[0] // window, nw=padded[1] // window)
    return x[:, : size[0], : size[1]]


class MultiScaleAttention(nnx.Module):
    """Attention over (B, H, W, C) tokens with optional max-pooled queries (hub: `qkv`, `proj`)."""

    def __init__(self, dim: int, dim_out: int, heads: int, pool: int, config: Sam2HieraConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=nn.dtype_of(config.dtype), param_dtype=nn.dtype_of(config.param_dtype))
        self.heads = heads
        self.pool = pool
        self.implementation = config.attention
        self.qkv = nn.linear(dim, 3 * dim_out, ("embed", "heads"), **kw)
        self.proj = nn.linear(dim_out, dim_out, ("heads", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h, w = x.shape[1:3]
        q, k, v = einops.rearrange(self.qkv(x), "b h w (qkv n d) -> qkv b (h w) n d", qkv=3, n=self.heads)
        if self.pool > 1:
            q = max_pool(einops.rearrange(q, "b (h w) n d -> b h w (n d)", h=h), self.pool)
            h, w = q.shape[1:3]
            q = einops.rearrange(q, "b h w (n d) -> b (h w) n d", n=self.heads)
        out = nn.attention(q, k, v, implementation=self.implementation)
        return self.proj(einops.rearrange(out, "b (h w) n d -> b h w (n d)", h=h))


class FeedForward(nnx.Module):
    """proj_in -> activation -> proj_out (hub: `mlp.proj_in`, `mlp.proj_out`)."""

    def __init__(self, dim: int, hidden: int, config: Sam2HieraConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=nn.dtype_of(config.dtype), param_dtype=nn.dtype_of(config.param_dtype))
        self.act = nn.activation(config.hidden_act)
        self.proj_in = nn.linear(dim, hidden, ("embed", "mlp"), **kw)
        self.proj_out = nn.linear(hidden, dim, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj_out(self.act(self.proj_in(x)))


class MultiScaleBlock(nnx.Module):
    """Hiera block: windowed (or global) attention with optional query pooling, then an MLP.

    The attention window is a call argument, so that blocks of one shape share a stacked scan.
    """

    def __init__(self, dim: int, dim_out: int, heads: int, pool: int, config: Sam2HieraConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, eps=config.layer_norm_eps, dtype=nn.dtype_of(config.dtype), param_dtype=nn.dtype_of(config.param_dtype))
        self.pool = pool
        self.projects = dim != dim_out
        self.layer_norm1 = nn.layer_norm(dim, **kw)
        self.attn = MultiScaleAttention(dim, dim_out, heads, pool, config, rngs=rngs)
        self.layer_norm2 = nn.layer_norm(dim_out, **kw)
        self.mlp = FeedForward(dim_out, int(dim_out * config.mlp_ratio), config, rngs=rngs)
        if self.projects:
            self.proj = nn.linear(
                dim, dim_out, ("embed", "mlp"), rngs=rngs, dtype=nn.dtype_of(config.dtype), param_dtype=nn.dtype_of(config.param_dtype)
            )

    def __call__(self, x: jax.Array, window: int) -> jax.Array:
        shortcut = x
        x = self.layer_norm1(x)
        if self.projects:
            shortcut = self.proj(x)
            if self.pool > 1:
                shortcut = max_pool(shortcut, self.pool)
        size = x.shape[1:3]
        if window:
            x, padded = window_partition(x, window)
        x = self.attn(x)
        if window:
            if self.pool > 1:
                window //= self.pool
                size = shortcut.shape[1:3]
                padded = (size[0] + (-size[0]) % window, size[1] + (-size[1]) % window)
            x = window_unpartition(x, window, padded, size)
        x = shortcut + x
        x = x + self.mlp(self.layer_norm2(x))
        return nn.constrain(x, ("batch", None, None, "embed"))


class Stage(nnx.Module):
    """One Hiera stage: an optional opening block (new width, pooled queries) and a stacked run of
    equal blocks whose windows (0 = global) are `windows`, one per stacked block."""

    def __init__(self, config: Sam2HieraConfig, stage: int, *, rngs: nnx.Rngs):
        start = config.stage_starts[stage]
        count = config.blocks_per_stage[stage]
        dim = config.embed_dim_per_stage[stage]
        heads = config.num_attention_heads_per_stage[stage]
        self.remat = config.remat
        self.first_window = None
        if stage > 0:
            pool = config.query_stride[0] if stage <= config.num_query_pool_stages else 1
            self.first = MultiScaleBlock(config.embed_dim_per_stage[stage - 1], dim, heads, pool, config, rngs=rngs)
            self.first_window = config.window_of(start)
            start, count = start + 1, count - 1
        self.windows = tuple(config.window_of(b) for b in range(start, start + count))
        if count:
            self.blocks = nn.stack_layers(lambda r: MultiScaleBlock(dim, dim, heads, 1, config, rngs=r), count, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.first_window is not None:
            x = self.first(x, self.first_window)
        if not self.windows:
            return x
        windows = sorted(set(self.windows))
        if len(windows) == 1:
            body = lambda block, h, _: block(h, windows[0])  # noqa: E731
        else:
            choice = jnp.asarray([windows.index(w) for w in self.windows], jnp.int32)

            def body(block: MultiScaleBlock, h: jax.Array, index: jax.Array) -> jax.Array:
                branches = [lambda y, w=w: block(y, w) for w in windows]
                return jax.lax.switch(choice[index], branches, h)

        return nn.scan_layers(self.blocks, x, body, remat_policy=self.remat)


class Sam2Hiera(nnx.Module):
    """SAM2's Hiera trunk: normalised pixels (B, H, W, 3) -> the last stage (B, H/32, W/32, C_last),
    transformers' `Sam2HieraDetModel.last_hidden_state`; `all_stages=True` returns every stage's
    output (strides 4, 8, 16, 32), its `intermediate_hidden_states`."""

    def __init__(self, config: Sam2HieraConfig, *, rngs: nnx.Rngs):
        self.config = config
        pdt = nn.dtype_of(config.param_dtype)
        c = config.hidden_size
        self.patch_embed = PatchEmbed(config, rngs=rngs)
        background = config.window_positional_embedding_background_size
        window = config.window_size_per_stage[0]
        self.pos_embed = nnx.Param(jnp.zeros((1, *background, c), pdt), out_sharding=(None, None, None, "embed"), eager_sharding=False)
        self.pos_embed_window = nnx.Param(jnp.zeros((1, window, window, c), pdt), out_sharding=(None, None, None, "embed"), eager_sharding=False)
        self.stages = nnx.List([Stage(config, s, rngs=rngs) for s in range(len(config.blocks_per_stage))])

    def position_embedding(self, size: tuple[int, int]) -> jax.Array:
        """(1, h, w, C): the background table resized (PyTorch bicubic) plus the window table tiled."""
        window = self.pos_embed_window[...]
        wh, ww = window.shape[1:3]
        if size[0] % wh or size[1] % ww:
            raise ValueError(
                f"SAM2 Hiera: the stride-{self.config.patch_stride[0]} grid {size} must be a multiple of the "
                f"window position embedding {(wh, ww)} (input sides multiples of {self.config.stride} always are)"
            )
        background = nn.resize_torch(self.pos_embed[...].astype(jnp.float32), size, "bicubic").astype(window.dtype)
        return background + jnp.tile(window, (1, size[0] // wh, size[1] // ww, 1))

    def __call__(self, pixel_values: jax.Array, *, all_stages: bool = False) -> jax.Array | tuple[jax.Array, ...]:
        dtype = nn.dtype_of(self.config.dtype) or pixel_values.dtype
        x = self.patch_embed(pixel_values.astype(dtype))
        x = x + self.position_embedding(x.shape[1:3]).astype(x.dtype)
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return tuple(outputs) if all_stages else x


class PatchEmbed(nnx.Module):
    """The overlapping stem convolution (hub: `patch_embed.projection`)."""

    def __init__(self, config: Sam2HieraConfig, *, rngs: nnx.Rngs):
        self.projection = nn.conv(
            config.num_channels, config.hidden_size, config.patch_kernel_size, strides=config.patch_stride,
            padding=[(p, p) for p in config.patch_padding], rngs=rngs,
            dtype=nn.dtype_of(config.dtype), param_dtype=nn.dtype_of(config.param_dtype), axes=(None, "embed"),
        )

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        return self.projection(pixel_values)

