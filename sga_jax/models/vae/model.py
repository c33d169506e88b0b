"""The Flux autoencoder (Black Forest Labs' `ae.safetensors`) in Flax NNX, channels-last.

Module and attribute names follow BFL's checkpoint (`encoder.down.{i}.block.{j}.norm1`,
`encoder.mid.attn_1.q`, `decoder.up.{i}.upsample.conv`, ...), so the BFL key map is a rename of
leaf names only. Two forms share one parameter tree:

* F8 (BFL's native VAE): 8x spatial compression.
* F16 (Diffusion-4K's SC-VAE, the form the SGA paper trains): the encoder's `conv_in` runs at
  stride 2, and the decoder upsamples (nearest, 2x) between its final norm + SiLU and `conv_out`.
  No new parameters, so F8 weights load into it.

The res blocks of a level differ in width (the first one changes channels), and a level holds only
2-3 of them, so they are plain lists rather than a scanned stack; `config.remat` checkpoints every
res/attention block instead.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sga_jax.errors import ConfigError
from sga_jax.models import nn
from sga_jax.models.config import ModelConfig
from sga_jax.models.vae import tiling

IMAGE_AXES = ("batch", None, None, None)


@dataclasses.dataclass(frozen=True)
class AutoEncoderConfig(ModelConfig):
    """Shape, numerics and tiling of the autoencoder.

    Fields up to `shift_factor` are BFL's `AutoEncoderParams`. `f16` switches to the 16x form.
    Tiling (see `AutoEncoder.encode_tiled`): tiles of `tile_size` image pixels per side, neighbours
    sharing `tile_overlap` pixels, used automatically when an image side (input of `encode`, output
    of `decode`) exceeds `tile_threshold` pixels (`None`: never automatically).
    """

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    norm_groups: int = 32
    norm_eps: float = 1e-6
    f16: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"
    tile_size: int = 512
    tile_overlap: int = 128
    tile_threshold: int | None = 1024

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        problems = []
        for name in ("in_channels", "ch", "out_ch", "num_res_blocks", "z_channels", "norm_groups"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            problems.append(f"ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}")
        elif self.norm_groups >= 1:
            widths = sorted({self.ch * m for m in self.ch_mult})
            bad = [w for w in widths if w % self.norm_groups]
            if bad:
                problems.append(f"channel widths {bad} (ch * ch_mult) are not divisible by norm_groups={self.norm_groups}")
        if self.scale_factor == 0:
            problems.append("scale_factor must be non-zero")
        problems.extend(self.run_setting_problems())
        factor = self.downsample_factor if self.ch_mult else 1
        if self.tile_size % factor or self.tile_overlap % factor:
            problems.append(
                f"tile_size={self.tile_size} and tile_overlap={self.tile_overlap} must be multiples of the "
                f"downsampling factor {factor}"
            )
        if not 0 < self.tile_overlap < self.tile_size:
            problems.append(f"need 0 < tile_overlap < tile_size, got {self.tile_overlap} and {self.tile_size}")
        if self.tile_threshold is not None and self.tile_threshold < 1:
            problems.append(f"tile_threshold must be positive or None, got {self.tile_threshold}")
        if problems:
            raise ConfigError("AutoEncoderConfig: " + "; ".join(problems))

    @classmethod
    def flux(cls, **overrides: Any) -> "AutoEncoderConfig":
        """Flux.1's VAE (F8, 16 latent channels), as in BFL's `ae.safetensors`."""
        return cls(**overrides)

    @classmethod
    def flux_f16(cls, **overrides: Any) -> "AutoEncoderConfig":
        """The F16 form of Flux's VAE (Diffusion-4K SC-VAE) trained by the SGA paper."""
        return cls(**{"f16": True, **overrides})

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side: 8 (F8) or 16 (F16) for Flux."""
        return 2 ** (len(self.ch_mult) - 1) * (2 if self.f16 else 1)


def _checkpointed(module: nnx.Module, x: jax.Array, policy: str) -> jax.Array:
    """`module(x)` under the remat policy (its parameters enter the checkpoint as arguments)."""
    if policy == "none":
        return module(x)
    graphdef, state = nnx.split(module)
    return nn.remat(lambda s, h: nnx.merge(graphdef, s)(h), policy)(state, x)


def upsample_nearest(x: jax.Array, factor: int = 2) -> jax.Array:
    """Nearest-neighbour upsampling of (B, H, W, C) by an integer factor (PyTorch `mode="nearest"`)."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


class _Factory:
    """Layer constructors bound to one config's norm settings and dtypes."""

    def __init__(self, config: AutoEncoderConfig, rngs: nnx.Rngs):
        self.config = config
        self.rngs = rngs
        self.dtype = nn.dtype_of(config.dtype)
        self.param_dtype = nn.dtype_of(config.param_dtype)

    def conv(self, cin: int, cout: int, kernel: int = 3, **kw: Any) -> nnx.Conv:
        kw.setdefault("padding", kernel // 2)
        return nn.conv(cin, cout, kernel, rngs=self.rngs, dtype=self.dtype, param_dtype=self.param_dtype, **kw)

    def norm(self, dim: int) -> nnx.GroupNorm:
        c = self.config
        return nn.group_norm(c.norm_groups, dim, rngs=self.rngs, eps=c.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)

    def proj(self, dim: int) -> nnx.Linear:
        return nn.linear(dim, dim, ("conv_in", "conv_out"), rngs=self.rngs, dtype=self.dtype, param_dtype=self.param_dtype)


class ResnetBlock(nnx.Module):
    """GroupNorm-SiLU-conv twice, plus a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, make: _Factory, in_channels: int, out_channels: int):
        self.norm1 = make.norm(in_channels)
        self.conv1 = make.conv(in_channels, out_channels)
        self.norm2 = make.norm(out_channels)
        self.conv2 = make.conv(out_channels, out_channels)
        self.nin_shortcut = make.conv(in_channels, out_channels, 1) if in_channels != out_channels else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if self.nin_shortcut is not None else x
        return skip + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over all positions, residual; q/k/v/proj_out act per pixel
    (BFL stores them as 1x1 convs, diffusers as linears; here they are dense layers)."""

    def __init__(self, make: _Factory, channels: int):
        self.norm = make.norm(channels)
        self.q = make.proj(channels)
        self.k = make.proj(channels)
        self.v = make.proj(channels)
        self.proj_out = make.proj(channels)
        self.implementation = make.config.attention

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        normed = self.norm(x)
        q, k, v = (proj(normed).reshape(b, h * w, 1, c) for proj in (self.q, self.k, self.v))
        out = nn.attention(q, k, v, implementation=self.implementation).reshape(b, h, w, c)
        return x + self.proj_out(out)


class Downsample(nnx.Module):
    """Pad right and bottom by one, then a 3x3 stride-2 conv (BFL / diffusers `padding=0`)."""

    def __init__(self, make: _Factory, channels: int):
        self.conv = make.conv(channels, channels, strides=2, padding=((0, 1), (0, 1)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest 2x upsampling, then a 3x3 conv."""

    def __init__(self, make: _Factory, channels: int):
        self.conv = make.conv(channels, channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(upsample_nearest(x))


def _res_blocks(make: _Factory, in_channels: int, out_channels: int, count: int) -> nnx.List:
    widths = [in_channels] + [out_channels] * count
    return nnx.List([ResnetBlock(make, widths[j], out_channels) for j in range(count)])


def _run_blocks(blocks: nnx.List, x: jax.Array, remat: str) -> jax.Array:
    for block in blocks:
        x = _checkpointed(block, x, remat)
    return x


class DownLevel(nnx.Module):
    """One encoder level: res blocks, then a `downsample` (None on the last level)."""

    def __init__(self, make: _Factory, in_channels: int, out_channels: int, count: int, downsample: bool):
        self.block = _res_blocks(make, in_channels, out_channels, count)
        self.downsample = Downsample(make, out_channels) if downsample else None

    def __call__(self, x: jax.Array, remat: str) -> jax.Array:
        x = _run_blocks(self.block, x, remat)
        return nn.constrain(self.downsample(x), IMAGE_AXES) if self.downsample is not None else x


class UpLevel(nnx.Module):
    """One decoder level: res blocks, then an `upsample` (None on level 0, the full resolution)."""

    def __init__(self, make: _Factory, in_channels: int, out_channels: int, count: int, upsample: bool):
        self.block = _res_blocks(make, in_channels, out_channels, count)
        self.upsample = Upsample(make, out_channels) if upsample else None

    def __call__(self, x: jax.Array, remat: str) -> jax.Array:
        x = _run_blocks(self.block, x, remat)
        return nn.constrain(self.upsample(x), IMAGE_AXES) if self.upsample is not None else x


class Mid(nnx.Module):
    """Res block, attention, res block at the lowest resolution."""

    def __init__(self, make: _Factory, channels: int):
        self.block_1 = ResnetBlock(make, channels, channels)
        self.attn_1 = AttnBlock(make, channels)
        self.block_2 = ResnetBlock(make, channels, channels)

    def __call__(self, x: jax.Array, remat: str) -> jax.Array:
        for module in (self.block_1, self.attn_1, self.block_2):
            x = _checkpointed(module, x, remat)
        return x


class Encoder(nnx.Module):
    """Image (B, H, W, in_channels) -> posterior moments (B, H/f, W/f, 2 * z_channels)."""

    def __init__(self, config: AutoEncoderConfig, *, rngs: nnx.Rngs):
        make = _Factory(config, rngs)
        c = config
        self.remat = c.remat
        self.conv_in = make.conv(c.in_channels, c.ch, strides=2 if c.f16 else 1)
        widths = [c.ch] + [c.ch * m for m in c.ch_mult]
        last = len(c.ch_mult) - 1
        self.down = nnx.List(
            [
                DownLevel(make, widths[i], widths[i + 1], c.num_res_blocks, downsample=i != last)
                for i in range(len(c.ch_mult))
            ]
        )
        self.mid = Mid(make, widths[-1])
        self.norm_out = make.norm(widths[-1])
        self.conv_out = make.conv(widths[-1], 2 * c.z_channels)

    def __call__(self, x: jax.Array, return_features: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Moments; with `return_features`, also the input of `conv_out` (after `norm_out` and SiLU,
        (B, H/f, W/f, ch * ch_mult[-1])), the layer stage 1's SGA weight differentiates at."""
        h = nn.constrain(self.conv_in(x), IMAGE_AXES)
        for level in self.down:
            h = level(h, self.remat)
        h = self.mid(h, self.remat)
        features = jax.nn.silu(self.norm_out(h))
        moments = self.conv_out(features)
        return (moments, features) if return_features else moments


class Decoder(nnx.Module):
    """Latent (B, h, w, z_channels) -> image (B, h*f, w*f, out_ch).

    `up[i]` is level i (0 = full resolution), run from the last level down, as in BFL.
    """

    def __init__(self, config: AutoEncoderConfig, *, rngs: nnx.Rngs):
        make = _Factory(config, rngs)
        c = config
        self.remat = c.remat
        self.f16 = c.f16
        widths = [c.ch * m for m in c.ch_mult]
        self.conv_in = make.conv(c.z_channels, widths[-1])
        self.mid = Mid(make, widths[-1])
        inputs = widths[1:] + [widths[-1]]
        self.up = nnx.List(
            [
                UpLevel(make, inputs[i], widths[i], c.num_res_blocks + 1, upsample=i != 0)
                for i in range(len(c.ch_mult))
            ]
        )
        self.norm_out = make.norm(widths[0])
        self.conv_out = make.conv(widths[0], c.out_ch)

    def __call__(self, z: jax.Array, return_features: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Decode; with `return_features`, also return the input of `conv_out` (see `AutoEncoder.decode`)."""
        h = nn.constrain(self.conv_in(z), IMAGE_AXES)
        h = self.mid(h, self.remat)
        for level in reversed(self.up):
            h = level(h, self.remat)
        features = jax.nn.silu(self.norm_out(h))
        if self.f16:
            features = upsample_nearest(features)
        image = self.conv_out(features)
        return (image, features) if return_features else image


def posterior_moments(moments: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Split encoder output into the diagonal Gaussian's (mean, logvar), in float32.

    logvar is clamped to [-30, 20] as diffusers' `DiagonalGaussianDistribution` does.
    """
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)


def posterior_sample(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
    """A sample `mean + exp(logvar / 2) * eps`, eps ~ N(0, I) drawn from `rng`."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


class AutoEncoder(nnx.Module):
    """Flux's KL autoencoder: images (B, H, W, 3) in [-1, 1] <-> scaled latents (B, H/f, W/f, 16).

    `encode` returns `scale_factor * (latent - shift_factor)`, `decode` inverts that scaling first,
    exactly as BFL's `AutoEncoder`. Large inputs go through overlapping tiles (see `encode_tiled`).
    """

    def __init__(self, config: AutoEncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)

    def in_form(self, f16: bool) -> "AutoEncoder":
        """This autoencoder in the F16 (`f16=True`) or F8 form, sharing its parameters (no copy):
        the two forms differ only in static strides and one upsample."""
        if f16 == self.config.f16:
            return self
        config = dataclasses.replace(self.config, f16=f16)
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: AutoEncoder(config, rngs=nn.construction_rngs(0))))
        return nnx.merge(graphdef, nnx.state(self))

    def _tiles(self, height: int, width: int) -> bool:
        threshold = self.config.tile_threshold
        return threshold is not None and max(height, width) > threshold

    def encode_moments(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Unscaled posterior (mean, logvar), each (B, H/f, W/f, z_channels) float32.

        Tiled automatically when a side of `x` exceeds `config.tile_threshold`.
        """
        if self._tiles(x.shape[1], x.shape[2]):
            return self.encode_moments_tiled(x)
        return posterior_moments(self.encoder(x))

    def encode(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Scaled, shifted latent `scale * (mean - shift)` of the posterior mean, or of a posterior
        sample drawn with `rng` when one is given."""
        return self._scale(*self.encode_moments(x), rng)

    def decode(self, z: jax.Array, return_features: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Image (float32) from a scaled latent; tiled automatically when the image side exceeds
        `config.tile_threshold`.

        With `return_features=True` also returns the decoder activation that enters `conv_out`:
        after `norm_out` and SiLU, and for F16 after the nearest 2x upsample as well, so that it
        always has the image's height and width (B, H, W, ch * ch_mult[0]). This is the activation
        of Diffusion-4K's scale-consistency loss (F16 student against F8 teacher, same size).
        """
        f = self.config.downsample_factor
        if self._tiles(z.shape[1] * f, z.shape[2] * f):
            return self.decode_tiled(z, return_features)
        return self._decode(z, return_features)

    def encode_moments_tiled(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """`encode_moments` over overlapping tiles of `config.tile_size` pixels whose neighbours
        share `config.tile_overlap` pixels, cross-faded in latent space (see `tiling`); memory is
        bounded by one tile."""
        graphdef, state = nnx.split(self)
        return posterior_moments(_encode_tiled(graphdef, state, x))

    def encode_tiled(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """`encode` through `encode_moments_tiled`."""
        return self._scale(*self.encode_moments_tiled(x), rng)

    def decode_tiled(self, z: jax.Array, return_features: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        """`decode` over overlapping latent tiles (`config.tile_size / f` latent pixels, overlap
        `config.tile_overlap / f`), cross-faded in image space (see `tiling`); memory is bounded
        by one tile."""
        graphdef, state = nnx.split(self)
        return _decode_tiled(graphdef, state, z, return_features)

    def _scale(self, mean: jax.Array, logvar: jax.Array, rng: jax.Array | None) -> jax.Array:
        latent = mean if rng is None else posterior_sample(mean, logvar, rng)
        return self.config.scale_factor * (latent - self.config.shift_factor)

    def _decode(self, z: jax.Array, return_features: bool) -> jax.Array | tuple[jax.Array, jax.Array]:
        c = self.config
        out = self.decoder(z.astype(jnp.float32) / c.scale_factor + c.shift_factor, return_features)
        return jax.tree.map(lambda a: a.astype(jnp.float32), out)


@functools.partial(jax.jit, static_argnums=0)
def _encode_tiled(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, state)
    c = model.config
    return tiling.tiled_map(model.encoder, x, tile=c.tile_size, overlap=c.tile_overlap)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _decode_tiled(graphdef: nnx.GraphDef, state: nnx.State, z: jax.Array, return_features: bool) -> Any:
    model = nnx.merge(graphdef, state)
    c = model.config
    f = c.downsample_factor
    return tiling.tiled_map(
        lambda t: model._decode(t, return_features), z, tile=c.tile_size // f, overlap=c.tile_overlap // f
    )
