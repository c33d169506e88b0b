"""LPIPS v0.1 with the VGG16 trunk (Zhang et al. 2018, the `lpips` package's `LPIPS(net="vgg")`)
in Flax NNX, channels-last: the paper's reconstruction metric and the VAE stage's perceptual loss.

    d(x, y) = sum_l  w_l . mean_hw (n_l(x) - n_l(y))^2,   n_l(x) = f_l(x) / (||f_l(x)||_c + 1e-10)

* Inputs (B, H, W, 3) in [-1, 1] go through the ScalingLayer, `(x - shift) / scale`, ImageNet's
  mean and std applied to (x + 1) / 2.
* f_l are torchvision's `vgg16().features` taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: 3x3
  convs (padding 1) + ReLU, a 2x2 max pool (floor mode) before every stage but the first. The
  module keeps torchvision's names (`features.{0,2,5,...,28}`), so its checkpoint loads by a rename
  of leaves.
* n_l is the unit normalisation over channels. Its norm is gradient-safe: LPIPS's
  `sqrt(sum x^2)` has a NaN gradient wherever a feature vector is all zero (ReLU often makes it
  so); here the norm's gradient is 0 there, and the value is unchanged.
* w_l are the five `lin` layers (1x1 convs, no bias) of the lpips package's `weights/v0.1/vgg.pth`.
  A 1x1 conv commutes with the spatial mean, so each is applied to the mean (B, C) as a dense
  layer; no dropout (lpips's dropout is inactive in eval mode).

The two images run through the trunk separately, not as one concatenated batch, so that as a loss
(`model(reconstruction, stop_gradient(target))`) the backward pass covers one branch only. Convs
run in `config.dtype`; normalisation, differences and the result are float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sga_jax.models import nn
from sga_jax.models.config import ModelConfig

# torchvision vgg16().features: index of each conv, its output width; a max pool precedes 5, 10, 17, 24
CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
STAGES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))  # the convs before each tap
TAP_CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10
IMAGE_AXES = ("batch", None, None, None)


@dataclasses.dataclass(frozen=True)
class LPIPSConfig(ModelConfig):
    """Run settings of LPIPS-VGG16 (its layout is fixed): compute and parameter dtypes."""

    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        self.check_run_settings()


def unit_normalize(x: jax.Array) -> jax.Array:
    """`x / (||x||_channels + 1e-10)` in float32, with a zero (not NaN) norm gradient at all-zero vectors."""
    x = x.astype(jnp.float32)
    squares = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    positive = squares > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, squares, 1.0)), 0.0)
    return x / (norm + EPS)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """PyTorch's `MaxPool2d(2, 2)` (floor mode: an odd last row / column is dropped)."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


class LPIPS(nnx.Module):
    """LPIPS-VGG16: `model(x, y)` -> (B,) float32 distances of two (B, H, W, 3) batches in [-1, 1]."""

    def __init__(self, config: LPIPSConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype, param_dtype = nn.dtype_of(config.dtype), nn.dtype_of(config.param_dtype)
        widths = (3,) + WIDTHS
        self.features = nnx.Dict({
            str(index): nn.conv(widths[i], widths[i + 1], 3, padding=1, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
            for i, index in enumerate(CONVS)
        })
        for k, channels in enumerate(TAP_CHANNELS):
            setattr(self, f"lin{k}", nn.linear(channels, 1, ("conv_in", "conv_out"), rngs=rngs, use_bias=False,
                                               param_dtype=param_dtype))

    def taps(self, images: jax.Array) -> list[jax.Array]:
        """The five VGG16 activations relu1_2 ... relu5_3 of [-1, 1] images, in the compute dtype."""
        x = (images.astype(jnp.float32) - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
        x = nn.constrain(x.astype(nn.dtype_of(self.config.dtype)), IMAGE_AXES)
        out = []
        for stage, convs in enumerate(STAGES):
            if stage:
                x = max_pool_2x2(x)
            for index in convs:
                x = jax.nn.relu(self.features[str(index)](x))
            x = nn.constrain(x, IMAGE_AXES)
            out.append(x)
        return out

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"LPIPS expects two (B, H, W, 3) batches of one shape, got {x.shape} and {y.shape}")
        total = jnp.zeros(x.shape[:1], jnp.float32)
        for k, (a, b) in enumerate(zip(self.taps(x), self.taps(y))):
            per_channel = jnp.mean(jnp.square(unit_normalize(a) - unit_normalize(b)), axis=(1, 2))
            total = total + getattr(self, f"lin{k}")(per_channel)[:, 0].astype(jnp.float32)
        return total
