"""Image decoding and resizing with PIL: EXIF orientation, colour modes to RGB, a bucket's
cover-resize-and-crop with an antialiased filter, optional flip, float32 in [-1, 1] channels-last.

Every failure becomes a `BadRecord` with a short reason, so that callers can skip the record.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sga_jax.data.buckets import Bucket, cover_box

_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_HIGH_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")
RESAMPLE = Image.Resampling.LANCZOS


class BadRecord(Exception):
    """A record that cannot be used; `str(error)` is the reason shown to the user."""


def _describe(error: Exception) -> str:
    """The message of an error, with its type where the message alone is not telling."""
    text = str(error)
    return text if isinstance(error, OSError) and text else f"{type(error).__name__}: {text}"


def open_image(source: bytes | str | os.PathLike, max_pixels: int) -> Image.Image:
    """Open (without decoding pixels) and refuse empty files, non-images and images over `max_pixels`."""
    if isinstance(source, bytes):
        if not source:
            raise BadRecord("empty file (0 bytes)")
        stream: Any = io.BytesIO(source)
    else:
        try:
            if os.path.getsize(source) == 0:
                raise BadRecord("empty file (0 bytes)")
        except OSError as error:
            raise BadRecord(f"unreadable: {error.strerror or error}") from error
        stream = source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream)
    except UnidentifiedImageError as error:
        raise BadRecord("not an image (PIL cannot identify it)") from error
    except Image.DecompressionBombError as error:
        raise BadRecord(f"decompression bomb refused by PIL: {error}") from error
    except Exception as error:  # noqa: BLE001 - PIL's format plugins raise many types on corrupt input
        raise BadRecord(f"cannot read image header: {_describe(error)}") from error
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise BadRecord(f"too large: {width}x{height} = {width * height} pixels > max_image_pixels {max_pixels}")
    if width < 1 or height < 1:
        raise BadRecord(f"empty image {width}x{height}")
    return image


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after the EXIF orientation is applied, read from the header only."""
    width, height = image.size
    try:
        orientation = image.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is ignored, as exif_transpose does
        orientation = 1
    return (height, width) if orientation in _TRANSPOSED else (width, height)


def probe(source: bytes | str | os.PathLike, max_pixels: int) -> tuple[int, int]:
    """Header-only check: the oriented (width, height), or BadRecord."""
    with open_image(source, max_pixels) as image:
        return oriented_size(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """A decoded RGB (uint8) or F (float, one channel in [0, 1]) image with orientation applied.

    Transparent images are composited over white; palette, grayscale and CMYK images are converted
    with PIL's conversions; 16- and 32-bit grayscale is scaled by 1/65535 into a float image
    instead of being clipped at 255, and float images are taken as [0, 1].
    """
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as error:  # noqa: BLE001 - PIL's format plugins raise many types on corrupt input
        raise BadRecord(f"cannot decode: {_describe(error)}") from error
    mode = image.mode
    if mode in _HIGH_BIT_MODES:
        pixels = np.asarray(image, dtype=np.float32)
        if mode != "F":
            pixels = pixels / 65535.0
        return Image.fromarray(np.clip(pixels, 0.0, 1.0), mode="F")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")


def resize_to_bucket(image: Image.Image, bucket: Bucket, offset: tuple[float, float], flip: bool,
                     out: np.ndarray | None = None) -> np.ndarray:
    """Cover-resize `image` onto `bucket` = (w, h) with an antialiased Lanczos filter, cropping the
    slack at `offset` in [0, 1]^2 (0.5, 0.5: center); float32 (h, w, 3) in [-1, 1], written into
    `out` when given (no intermediate copies: batches are filled in place)."""
    box = cover_box(image.width, image.height, bucket, offset)
    resized = image.resize(bucket, RESAMPLE, box=box)
    if flip:
        resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if out is None:
        out = np.empty((bucket[1], bucket[0], 3), np.float32)
    if resized.mode == "F":
        gray = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)
        np.multiply(gray[..., None], 2.0, out=out)
    else:
        np.multiply(np.asarray(resized), np.float32(2.0 / 255.0), out=out)
    out -= 1.0
    return out


def load_image(source: bytes | str | os.PathLike, bucket: Bucket, *, max_pixels: int,
               offset: tuple[float, float] = (0.5, 0.5), flip: bool = False,
               out: np.ndarray | None = None) -> np.ndarray:
    """Decode `source` (encoded bytes or a path) and return it resized to `bucket` (into `out` when
    given); BadRecord on failure."""
    with open_image(source, max_pixels) as image:
        return resize_to_bucket(to_rgb(image), bucket, offset, flip, out)


def to_pixels(images: np.ndarray) -> np.ndarray:
    """Images in the model's [-1, 1] range -> uint8 pixels, rounded and clipped (the inverse of the
    scaling `load_image` applies)."""
    return np.clip((np.asarray(images, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
