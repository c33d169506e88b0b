"""Decoding, colour modes, EXIF orientation, resizing and buckets, against numpy / torch references."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from data_fixtures import encode, png16_rgb
from PIL import Image
from torch_reference import nchw_to_nhwc, nhwc_to_nchw

from sga_jax.data.buckets import cover_box, make_buckets, nearest_bucket
from sga_jax.data.transforms import BadRecord, load_image, probe

BIG = 10**8
RNG = np.random.default_rng(0)


def _as_float(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float64) / 127.5 - 1.0


# EXIF orientation -> what a viewer shows, written with numpy
ORIENTED = {
    1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied(orientation):
    pixels = RNG.integers(0, 256, (20, 36, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(pixels), "PNG", exif=exif.tobytes())
    want = ORIENTED[orientation](pixels)
    size = (want.shape[1], want.shape[0])
    assert probe(data, BIG) == size
    np.testing.assert_allclose(load_image(data, size, max_pixels=BIG), _as_float(want), atol=1e-6)


def test_rgba_composited_over_white():
    rgba = RNG.integers(0, 256, (16, 24, 4), dtype=np.uint8)
    alpha = rgba[..., 3:].astype(np.float64) / 255
    want = rgba[..., :3] * alpha + 255 * (1 - alpha)
    got = load_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), (24, 16), max_pixels=BIG)
    np.testing.assert_allclose(got, _as_float(want), atol=2.5 / 127.5)


def test_grayscale_and_palette_to_rgb():
    gray = RNG.integers(0, 256, (16, 24), dtype=np.uint8)
    got = load_image(encode(Image.fromarray(gray, "L"), "PNG"), (24, 16), max_pixels=BIG)
    np.testing.assert_allclose(got, _as_float(np.repeat(gray[..., None], 3, -1)), atol=1e-6)
    indices = RNG.integers(0, 4, (16, 24), dtype=np.uint8)
    table = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], np.uint8)
    palette = Image.fromarray(indices, "P")
    palette.putpalette(table.ravel().tolist())
    got = load_image(encode(palette, "PNG"), (24, 16), max_pixels=BIG)
    np.testing.assert_allclose(got, _as_float(table[indices]), atol=1e-6)


def test_cmyk_to_rgb():
    cmyk = np.zeros((8, 16, 4), np.uint8)
    cmyk[:, 0:4] = (0, 255, 255, 0)  # red
    cmyk[:, 4:8] = (255, 0, 255, 0)  # green
    cmyk[:, 8:12] = (0, 0, 0, 255)  # black
    want = np.zeros((8, 16, 3))
    want[:, 0:4] = (255, 0, 0)
    want[:, 4:8] = (0, 255, 0)
    want[:, 12:16] = 255  # no ink: white
    got = load_image(encode(Image.fromarray(cmyk, "CMYK"), "TIFF"), (16, 8), max_pixels=BIG)
    np.testing.assert_allclose(got, _as_float(want), atol=1e-6)


def test_16_bit_grayscale_scaled_not_clipped():
    gray16 = RNG.integers(0, 65536, (12, 20), dtype=np.uint16)
    got = load_image(encode(Image.fromarray(gray16), "PNG"), (20, 12), max_pixels=BIG)
    want = gray16.astype(np.float64) / 65535 * 2 - 1
    np.testing.assert_allclose(got, np.repeat(want[..., None], 3, -1), atol=1e-6)


def test_16_bit_rgb_keeps_the_high_byte():
    rgb16 = RNG.integers(0, 65536, (12, 20, 3), dtype=np.uint16)
    got = load_image(png16_rgb(rgb16), (20, 12), max_pixels=BIG)
    np.testing.assert_allclose(got, _as_float(rgb16 / 257.0), atol=1.01 / 127.5)


def test_bad_inputs_raise_bad_record_with_reason(tmp_path):
    jpeg = encode(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    (tmp_path / "zero.jpg").write_bytes(b"")
    cases = {
        b"": "empty file", b"GIF89a garbage": "not an image", jpeg[:300]: "cannot read image header",
        jpeg[: len(jpeg) // 2]: "cannot decode",
        str(tmp_path / "zero.jpg"): "empty file", str(tmp_path / "missing.jpg"): "unreadable",
    }
    for data, reason in cases.items():
        with pytest.raises(BadRecord, match=reason):
            load_image(data, (16, 16), max_pixels=BIG)
    with pytest.raises(BadRecord, match="too large: 64x64 = 4096 pixels > max_image_pixels 4095"):
        probe(jpeg, 4095)


def _smooth(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [np.sin(2 * np.pi * (x + 0.3 * y)), np.cos(2 * np.pi * (1.5 * y - x)), np.sin(3 * np.pi * x * y)]
    return np.round((np.stack(channels, -1) + 1) * 127.5).clip(0, 255).astype(np.uint8)


def test_downscale_matches_torch_antialiased_interpolation():
    pixels = _smooth(384, 512)
    got = load_image(encode(Image.fromarray(pixels), "PNG"), (128, 96), max_pixels=BIG)
    reference = F.interpolate(nhwc_to_nchw(_as_float(pixels)[None]), size=(96, 128), mode="bicubic",
                              antialias=True, align_corners=False)
    want = nchw_to_nhwc(reference)[0]
    assert np.abs(got - want)[4:-4, 4:-4].max() < 0.03  # two antialiased kernels agree on smooth content


def test_downscale_is_antialiased():
    checker = ((np.indices((256, 256)).sum(0) % 2) * 255).astype(np.uint8)
    got = load_image(encode(Image.fromarray(checker, "L"), "PNG"), (64, 64), max_pixels=BIG)
    aliased = nchw_to_nhwc(F.interpolate(torch.from_numpy(_as_float(checker)[None, None]).float(), size=(64, 64),
                                         mode="nearest"))[0]
    assert np.abs(aliased).min() == 1.0  # nearest picks one colour of the checkerboard
    assert np.abs(got).max() < 0.02  # a proper filter gives the mean gray


def test_cover_crop_and_flip():
    stripes = np.zeros((50, 100, 3), np.uint8)
    stripes[:, :25] = (255, 0, 0)
    stripes[:, 25:75] = (0, 0, 255)
    stripes[:, 75:] = (0, 255, 0)
    data = encode(Image.fromarray(stripes), "PNG")
    assert cover_box(100, 50, (32, 32), (0.5, 0.5)) == (25.0, 0.0, 75.0, 50.0)
    center = load_image(data, (32, 32), max_pixels=BIG)
    np.testing.assert_allclose(center[:, 2:-2], np.broadcast_to([-1.0, -1.0, 1.0], (32, 28, 3)), atol=0.02)
    left = load_image(data, (32, 32), max_pixels=BIG, offset=(0.0, 0.5))
    np.testing.assert_allclose(left[:, :14], np.broadcast_to([1.0, -1.0, -1.0], (32, 14, 3)), atol=0.02)
    flipped = load_image(data, (32, 32), max_pixels=BIG, offset=(0.0, 0.5), flip=True)
    np.testing.assert_array_equal(flipped, left[:, ::-1])


@pytest.mark.parametrize("max_long_edge,pixel_budget,multiple", [(4096, 4096 * 4096, 64), (2048, 1024 * 1024, 64),
                                                                  (1024, 512 * 512, 32)])
def test_bucket_sets(max_long_edge, pixel_budget, multiple):
    buckets = make_buckets(max_long_edge, pixel_budget, multiple)
    assert len(set(buckets)) == len(buckets)
    side = int(math.isqrt(pixel_budget)) // multiple * multiple
    assert (min(side, max_long_edge), min(side, max_long_edge)) in buckets
    for w, h in buckets:
        assert w % multiple == 0 and h % multiple == 0
        assert max(w, h) <= max_long_edge and w * h <= pixel_budget and 1 / 4 <= w / h <= 4
        assert (h, w) in buckets
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)
    for width, height in [(4000, 3000), (1080, 1920), (7000, 1000), (512, 512)]:
        chosen = buckets[nearest_bucket(buckets, width, height)]
        want = min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - math.log(width / height)))
        assert chosen == want
