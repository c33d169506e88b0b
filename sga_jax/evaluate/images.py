"""Image folders as the evaluation reads them: listing, 8-bit RGB decoding, pairing by file name,
and the size protocol (Diffusion-4K's `fid_preprocess`: torchvision's short-side resize, then a
center crop to a square)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from sga_jax.data.sources import IMAGE_EXTENSIONS
from sga_jax.data.transforms import BadRecord, open_image
from sga_jax.errors import ConfigError
from sga_jax.models import nn

MAX_PIXELS = 8192 * 8192


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly inside `folder`, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ConfigError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def read_rgb(path: Path) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3); unreadable files raise a ConfigError naming them."""
    try:
        with open_image(path, MAX_PIXELS) as image:
            return np.asarray(image.convert("RGB"))
    except BadRecord as error:
        raise ConfigError(f"{path}: {error}") from error


def to_model_range(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels (H, W, 3) -> float32 in [-1, 1], batched (1, H, W, 3)."""
    return (pixels.astype(np.float32) / 127.5 - 1.0)[None]


@functools.partial(jax.jit, static_argnums=1)
def _square(pixels: jax.Array, size: int) -> jax.Array:
    resized = nn.resize_short_side(pixels.astype(jnp.float32), size)
    return jnp.round(nn.center_crop(resized, (size, size))).astype(jnp.uint8)


def square(pixels: np.ndarray, size: int) -> np.ndarray:
    """Diffusion-4K's `fid_preprocess` of a uint8 image (H, W, 3): torchvision's `F.resize(img,
    size)` (short side to `size`, bilinear, antialiased, rounded to uint8) and `F.center_crop`
    to size x size."""
    return np.asarray(_square(jnp.asarray(pixels), size))


def crop_to_multiple(pixels: np.ndarray, multiple: int) -> np.ndarray:
    """Center-crop (H, W, 3) so that both sides are multiples of `multiple` (e.g. a VAE's factor)."""
    height, width = (side - side % multiple for side in pixels.shape[:2])
    if not height or not width:
        raise ConfigError(f"an image of {pixels.shape[:2]} pixels is smaller than {multiple} on a side")
    return np.asarray(nn.center_crop(pixels, (height, width)))


class ImageReader:
    """Reads images under the size protocol: `size=None` keeps them as they are, else each is
    brought to size x size by `square`. Remembers the size of each image it read (or that was
    `record`ed for it) for the report's resolution."""

    def __init__(self, size: int | None = None):
        if size is not None and size < 1:
            raise ConfigError(f"size must be positive, got {size}")
        self.size = size
        self.sizes: dict[Path, tuple[int, int]] = {}

    def __call__(self, path: Path) -> np.ndarray:
        pixels = read_rgb(path)
        if self.size is not None:
            pixels = square(pixels, self.size)
        self.record(path, pixels)
        return pixels

    def record(self, path: Path, pixels: np.ndarray) -> None:
        """Note the size (height, width) an image was evaluated at."""
        self.sizes[path] = tuple(pixels.shape[:2])

    def resolution(self) -> str:
        """The sizes evaluated, e.g. "512x512" or "300x451 (1), 512x512 (5)" (height x width)."""
        counts: dict[tuple[int, int], int] = {}
        for size in self.sizes.values():
            counts[size] = counts.get(size, 0) + 1
        if len(counts) == 1:
            return "{}x{}".format(*next(iter(counts)))
        return ", ".join(f"{h}x{w} ({n})" for (h, w), n in sorted(counts.items()))


def paired(files: Sequence[Path], reference: Path) -> list[tuple[Path, Path]]:
    """(file, same-named file of `reference`) for every file that has a partner."""
    partners = {p.name: p for p in list_images(reference)}
    return [(path, partners[path.name]) for path in files if path.name in partners]


def batches(files: Sequence[Path], size: int, desc: str, reader: ImageReader) -> Iterator[np.ndarray]:
    """Batches of images in [-1, 1], with a progress bar; a batch's images must share a size."""
    for start in tqdm(range(0, len(files), size), desc=desc, unit="batch", disable=None):
        chunk = files[start : start + size]
        images = [to_model_range(reader(p)) for p in chunk]
        for path, image in zip(chunk, images):
            if image.shape != images[0].shape:
                raise ConfigError(f"{path} is {image.shape[1:3]} but {chunk[0]} is {images[0].shape[1:3]}: "
                                  "images in one batch must share a size (use --batch_size 1 or --size)")
        yield np.concatenate(images)
