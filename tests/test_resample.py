"""The resize protocols of `sga_jax.models.nn.resample` against the implementations they follow:
PyTorch's `F.interpolate` (bilinear, with and without antialias), torch-fidelity's TensorFlow-1
bilinear, and torchvision's `F.resize` of the short side + `F.center_crop` on uint8 tensors."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torchvision.transforms import functional as TF

from sga_jax.models import nn
from tests.torch_reference import assert_close_relative, nchw_to_nhwc, nhwc_to_nchw

SIZES = [((37, 50), (299, 299)), ((512, 384), (299, 299)), ((64, 96), (17, 40)), ((7, 5), (3, 11))]


def _image(shape, seed=0):
    return np.random.default_rng(seed).normal(size=(2, *shape, 3)).astype(np.float32)


@pytest.mark.parametrize("antialias", [False, True], ids=["plain", "antialias"])
@pytest.mark.parametrize("shapes", SIZES, ids=lambda s: f"{s[0]}->{s[1]}")
def test_bilinear_is_pytorch_interpolate(shapes, antialias):
    (src, dst) = shapes
    x = _image(src)
    want = F.interpolate(nhwc_to_nchw(x).double(), size=dst, mode="bilinear", align_corners=False, antialias=antialias)
    got = nn.resize_torch(jnp.asarray(x), dst, "bilinear", antialias=antialias)
    assert_close_relative(got, nchw_to_nhwc(want), 1e-6, f"bilinear {shapes} antialias={antialias}")


@pytest.mark.parametrize("shapes", SIZES, ids=lambda s: f"{s[0]}->{s[1]}")
def test_tf1_bilinear_is_torch_fidelity(shapes):
    (src, dst) = shapes
    x = _image(src, seed=1) * 60 + 128
    want = interpolate_bilinear_2d_like_tensorflow1x(nhwc_to_nchw(x), size=dst, align_corners=False)
    got = nn.resize_tf1_bilinear(jnp.asarray(x), dst)
    assert_close_relative(got, nchw_to_nhwc(want), 1e-6, f"TF1 bilinear {shapes}")
    assert nn.tf1_bilinear_taps(4, 2).index.tolist() == [[0, 1], [2, 3]]  # no half-pixel offset


@pytest.mark.parametrize("shape,size", [((300, 450), 256), ((450, 300), 256), ((97, 64), 64), ((64, 64), 64)])
def test_short_side_resize_and_center_crop_are_torchvision(shape, size):
    image = np.random.default_rng(2).integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None]
    want = TF.center_crop(TF.resize(tensor, size), (size, size))[0].permute(1, 2, 0).numpy()
    resized = nn.resize_short_side(jnp.asarray(image, jnp.float32), size)
    assert resized.shape[:2] == tuple(TF.resize(tensor, size).shape[2:])
    got = np.asarray(jnp.round(nn.center_crop(resized, (size, size)))).astype(np.uint8)
    differ = got != want
    # float32 weights on both sides; only a value within rounding error of k + 0.5 may differ by one level
    assert np.abs(got.astype(int) - want).max() <= 1 and differ.mean() < 1e-3


def test_taps_matrix_and_errors():
    taps = nn.torch_taps(5, 3, "bilinear", antialias=True)
    assert np.allclose(taps.matrix().sum(axis=1), 1.0)
    with pytest.raises(ValueError, match="unknown resize mode 'nearest'"):
        nn.torch_taps(5, 3, "nearest")
    with pytest.raises(ValueError, match=r"center crop \(9, 9\) is larger than the image \(8, 12\)"):
        nn.center_crop(jnp.zeros((8, 12, 3)), (9, 9))
    with pytest.raises(ValueError, match="sizes must be positive"):
        nn.tf1_bilinear_taps(0, 3)
