"""taming-transformers' NLayerDiscriminator (the pix2pix PatchGAN) in Flax NNX, channels-last.

    Conv(in -> ndf, k4 s2 p1, bias) -> LeakyReLU(0.2)
    n_layers - 1 times: Conv(k4 s2 p1, no bias) -> BatchNorm -> LeakyReLU(0.2), widths ndf * min(2^n, 8)
    Conv(k4 s1 p1, no bias) -> BatchNorm -> LeakyReLU(0.2)
    Conv(-> 1, k4 s1 p1, bias)                                  logits (B, h, w, 1), one per patch

A 256 px input gives 30 x 30 logits with the default 3 layers. Padding is PyTorch's, written out
((1, 1), (1, 1)): 'SAME' pads a stride-2 kernel of 4 differently.

BatchNorm runs as in taming's training, where the discriminator is only ever used: statistics of
the batch it is called on (`nn.BatchStatNorm`), no running averages. Call it on real and fake
images separately, as taming does, so each call has its own statistics.

Initialisation follows taming's `weights_init`: conv kernels N(0, 0.02), BatchNorm scales
N(1, 0.02), biases 0 (taming leaves the two conv biases at PyTorch's default uniform init).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sga_jax.errors import ConfigError
from sga_jax.models import nn
from sga_jax.models.config import ModelConfig

PADDING = ((1, 1), (1, 1))
KERNEL = 4
SLOPE = 0.2


@dataclasses.dataclass(frozen=True)
class PatchGANConfig(ModelConfig):
    """Shape and numerics of the discriminator (taming's `NLayerDiscriminator` arguments)."""

    in_channels: int = 3
    ndf: int = 64
    n_layers: int = 3
    norm_eps: float = 1e-5
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        self.check_positive_ints("in_channels", "ndf", "n_layers")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError as err:
                raise ConfigError(f"PatchGANConfig.{name} {getattr(self, name)!r} is not a dtype name") from err

    def widths(self) -> list[int]:
        """Output channels of the first conv and of each normalised block."""
        return [self.ndf * min(2**n, 8) for n in range(self.n_layers + 1)]


class DiscriminatorBlock(nnx.Module):
    """Conv (no bias) -> BatchNorm in training mode -> LeakyReLU(0.2)."""

    def __init__(self, cin: int, cout: int, stride: int, config: PatchGANConfig, *, rngs: nnx.Rngs):
        dtype, param_dtype = nn.dtype_of(config.dtype), nn.dtype_of(config.param_dtype)
        self.conv = nn.conv(cin, cout, KERNEL, strides=stride, padding=PADDING, use_bias=False, dtype=dtype,
                            param_dtype=param_dtype, kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.norm = nn.BatchStatNorm(cout, eps=config.norm_eps, dtype=dtype, param_dtype=param_dtype,
                                     scale_init=lambda key, shape, dt: 1.0 + 0.02 * jax.random.normal(key, shape, dt),
                                     rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.leaky_relu(self.norm(self.conv(x)), SLOPE)


class NLayerDiscriminator(nnx.Module):
    """Images (B, H, W, in_channels), [-1, 1] -> patch logits (B, h, w, 1)."""

    def __init__(self, config: PatchGANConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype, param_dtype = nn.dtype_of(config.dtype), nn.dtype_of(config.param_dtype)
        init = nnx.initializers.normal(0.02)
        widths = config.widths()
        self.conv_in = nn.conv(config.in_channels, widths[0], KERNEL, strides=2, padding=PADDING, dtype=dtype,
                               param_dtype=param_dtype, kernel_init=init, rngs=rngs)
        strides = [2] * (config.n_layers - 1) + [1]
        self.blocks = nnx.List([DiscriminatorBlock(widths[i], widths[i + 1], strides[i], config, rngs=rngs)
                                for i in range(config.n_layers)])
        self.conv_out = nn.conv(widths[-1], 1, KERNEL, strides=1, padding=PADDING, dtype=dtype,
                                param_dtype=param_dtype, kernel_init=init, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.leaky_relu(self.conv_in(x), SLOPE)
        for block in self.blocks:
            h = block(h)
        return self.conv_out(h)
