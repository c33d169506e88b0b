"""The FID InceptionV3 (pytorch-fid's `FIDInceptionV3`, torch-fidelity's `FeatureExtractorInceptionV3`)
in Flax NNX, channels-last.

The network is torchvision's `Inception3(num_classes=1008, aux_logits=False)` with the blocks
patched to match the TensorFlow graph the FID statistics were defined with: the average-pool
branches of Mixed_5b-d (InceptionA), Mixed_6b-e (InceptionC) and Mixed_7b (InceptionE) do not
count padded zeros (`count_include_pad=False`), and Mixed_7c pools its branch with a 3x3 max
pool (stride 1, padding 1) instead. Mixed_6a / Mixed_7a keep torchvision's stride-2 max pools.
The 2048-d features are the spatial mean of Mixed_7c; `logits` applies the 1008-class `fc`.

Module names follow torchvision's checkpoint keys (`Mixed_5b.branch5x5_1.conv`, ...). Every
`BasicConv2d` there is a bias-free conv, a BatchNorm (eps 1e-3) and a ReLU; the network is only
ever used for inference, so the converter folds each BatchNorm's statistics and affine into its
conv (`weights.FoldedBatchNormKernel` / `FoldedBatchNormBias`) and a block here is conv + bias +
ReLU: one pass over each activation instead of three.

The input is the network's own: (B, 299, 299, 3) in [-1, 1]; the resize protocols that bring
images there are in `sga_jax.models.inception.preprocess`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sga_jax.models import nn
from sga_jax.models.config import ModelConfig

FEATURES = 2048
BATCH_NORM_EPS = 1e-3


@dataclasses.dataclass(frozen=True)
class InceptionConfig(ModelConfig):
    """The FID InceptionV3 has one shape; `num_classes` is its fc width (1008 in the FID weights),
    `dtype` the compute dtype and `param_dtype` the storage dtype."""

    num_classes: int = 1008
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        self.check_positive_ints("num_classes")
        self.check_run_settings()


Kernel = int | tuple[int, int]


def _pairs(value: Kernel) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class BasicConv2d(nnx.Module):
    """torchvision's BasicConv2d with its BatchNorm folded in: conv (+ bias) and ReLU."""

    def __init__(self, cin: int, cout: int, kernel: Kernel, config: InceptionConfig, *, rngs: nnx.Rngs,
                 stride: int = 1, padding: Kernel = 0):
        pad_h, pad_w = _pairs(padding)
        self.conv = nn.conv(cin, cout, _pairs(kernel), strides=stride, padding=((pad_h, pad_h), (pad_w, pad_w)),
                            dtype=nn.dtype_of(config.dtype), param_dtype=nn.dtype_of(config.param_dtype), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.conv(x))


def _chain(x: jax.Array, convs: Sequence[BasicConv2d]) -> jax.Array:
    for conv in convs:
        x = conv(x)
    return x


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """The FID blocks' branch pool: 3x3, stride 1, padding 1, padded zeros not counted."""
    return nn.avg_pool(x, 3, 1, 1, count_include_pad=False)


class InceptionA(nnx.Module):
    """Mixed_5b-d: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1."""

    def __init__(self, cin: int, pool_features: int, config: InceptionConfig, *, rngs: nnx.Rngs):
        conv = lambda i, o, k, **kw: BasicConv2d(i, o, k, config, rngs=rngs, **kw)
        self.branch1x1 = conv(cin, 64, 1)
        self.branch5x5_1 = conv(cin, 48, 1)
        self.branch5x5_2 = conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = conv(cin, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
        self.branch_pool = conv(cin, pool_features, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            self.branch1x1(x),
            _chain(x, (self.branch5x5_1, self.branch5x5_2)),
            _chain(x, (self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3)),
            self.branch_pool(_avg_pool_3x3(x)),
        ], axis=-1)


class InceptionB(nnx.Module):
    """Mixed_6a: stride-2 3x3 | 1x1 -> 3x3 -> stride-2 3x3 | stride-2 max pool."""

    def __init__(self, cin: int, config: InceptionConfig, *, rngs: nnx.Rngs):
        conv = lambda i, o, k, **kw: BasicConv2d(i, o, k, config, rngs=rngs, **kw)
        self.branch3x3 = conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = conv(cin, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            self.branch3x3(x),
            _chain(x, (self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3)),
            nn.max_pool(x, 3, 2),
        ], axis=-1)


class InceptionC(nnx.Module):
    """Mixed_6b-e: factorised 7x7 convolutions with `c7` inner channels."""

    def __init__(self, cin: int, c7: int, config: InceptionConfig, *, rngs: nnx.Rngs):
        conv = lambda i, o, k, **kw: BasicConv2d(i, o, k, config, rngs=rngs, **kw)
        self.branch1x1 = conv(cin, 192, 1)
        self.branch7x7_1 = conv(cin, c7, 1)
        self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = conv(cin, c7, 1)
        self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = conv(cin, 192, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            self.branch1x1(x),
            _chain(x, (self.branch7x7_1, self.branch7x7_2, self.branch7x7_3)),
            _chain(x, (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                       self.branch7x7dbl_5)),
            self.branch_pool(_avg_pool_3x3(x)),
        ], axis=-1)


class InceptionD(nnx.Module):
    """Mixed_7a: 1x1 -> stride-2 3x3 | 1x1 -> 1x7 -> 7x1 -> stride-2 3x3 | stride-2 max pool."""

    def __init__(self, cin: int, config: InceptionConfig, *, rngs: nnx.Rngs):
        conv = lambda i, o, k, **kw: BasicConv2d(i, o, k, config, rngs=rngs, **kw)
        self.branch3x3_1 = conv(cin, 192, 1)
        self.branch3x3_2 = conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = conv(cin, 192, 1)
        self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            _chain(x, (self.branch3x3_1, self.branch3x3_2)),
            _chain(x, (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4)),
            nn.max_pool(x, 3, 2),
        ], axis=-1)


class InceptionE(nnx.Module):
    """Mixed_7b (`max_pool=False`: FIDInceptionE_1) and Mixed_7c (`max_pool=True`: FIDInceptionE_2):
    split 1x3 / 3x1 convolutions, and the branch pool (average without padding, or max)."""

    def __init__(self, cin: int, config: InceptionConfig, *, max_pool: bool, rngs: nnx.Rngs):
        conv = lambda i, o, k, **kw: BasicConv2d(i, o, k, config, rngs=rngs, **kw)
        self.max_pool = max_pool
        self.branch1x1 = conv(cin, 320, 1)
        self.branch3x3_1 = conv(cin, 384, 1)
        self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = conv(cin, 448, 1)
        self.branch3x3dbl_2 = conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = conv(cin, 192, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = nn.max_pool(x, 3, 1, 1) if self.max_pool else _avg_pool_3x3(x)
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(pooled),
        ], axis=-1)


class InceptionV3(nnx.Module):
    """The FID InceptionV3: (B, 299, 299, 3) in [-1, 1] -> 2048-d pool features (B, 2048)."""

    def __init__(self, config: InceptionConfig, *, rngs: nnx.Rngs):
        self.config = config
        conv = lambda i, o, k, **kw: BasicConv2d(i, o, k, config, rngs=rngs, **kw)
        self.Conv2d_1a_3x3 = conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = conv(32, 32, 3)
        self.Conv2d_2b_3x3 = conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = conv(64, 80, 1)
        self.Conv2d_4a_3x3 = conv(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32, config, rngs=rngs)
        self.Mixed_5c = InceptionA(256, 64, config, rngs=rngs)
        self.Mixed_5d = InceptionA(288, 64, config, rngs=rngs)
        self.Mixed_6a = InceptionB(288, config, rngs=rngs)
        self.Mixed_6b = InceptionC(768, 128, config, rngs=rngs)
        self.Mixed_6c = InceptionC(768, 160, config, rngs=rngs)
        self.Mixed_6d = InceptionC(768, 160, config, rngs=rngs)
        self.Mixed_6e = InceptionC(768, 192, config, rngs=rngs)
        self.Mixed_7a = InceptionD(768, config, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, config, max_pool=False, rngs=rngs)
        self.Mixed_7c = InceptionE(2048, config, max_pool=True, rngs=rngs)
        self.fc = nn.linear(FEATURES, config.num_classes, ("embed", "vocab"), dtype=nn.dtype_of(config.dtype),
                            param_dtype=nn.dtype_of(config.param_dtype), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[1:] != (299, 299, 3):
            raise ValueError(f"InceptionV3 takes (B, 299, 299, 3) inputs in [-1, 1], got shape {tuple(x.shape)}; "
                             "bring images there with sga_jax.models.inception.inception_input")
        x = nn.constrain(x.astype(nn.dtype_of(self.config.dtype)), ("batch", None, None, None))
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = nn.max_pool(x, 3, 2)
        x = nn.max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))

    def logits(self, features: jax.Array) -> jax.Array:
        """The 1008-class logits of pool features (B, 2048)."""
        return self.fc(features.astype(nn.dtype_of(self.config.dtype)))

