"""Diffusion-4K's detail metrics for generated images (uint8 RGB, (H, W, 3)), on the host.

GLCM score: the image in grey (ITU-R BT.601 luma as OpenCV's `COLOR_BGR2GRAY` rounds it)
quantised to 64 levels, cut into non-overlapping 64 x 64 patches; each patch's grey-level
co-occurrence matrix (distances 1-4, angles 0, pi/4, pi/2, 3pi/4, normalised per distance and
angle, as `skimage.feature.graycomatrix(..., levels=64, normed=True)`) is scored by the base-2
Shannon entropy of the distinct values of that array (as `skimage.measure.shannon_entropy`), and
the scores are averaged over patches. Higher means richer texture.

Compression ratio: raw RGB bytes over JPEG (quality 95) bytes, summed over a set of images.
Higher means less fine detail for the codec to keep.
"""

from __future__ import annotations

import io
from typing import Iterable

import numpy as np
from PIL import Image

LEVELS = 64
DISTANCES = (1, 2, 3, 4)
ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
PATCH = 64
JPEG_QUALITY = 95


def _check_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
    return image


def grey64(image: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> 64-level grey (H, W) uint8: OpenCV's fixed-point BT.601 luma, then // 4."""
    rgb = _check_rgb(image).astype(np.int32)
    luma = (rgb[..., 0] * 4899 + rgb[..., 1] * 9617 + rgb[..., 2] * 1868 + (1 << 13)) >> 14
    return (luma // 4).astype(np.uint8)


def cooccurrence(grey: np.ndarray) -> np.ndarray:
    """Normalised co-occurrence matrix (LEVELS, LEVELS, len(DISTANCES), len(ANGLES)) of a grey
    patch with values < LEVELS: pairs (grey[r, c], grey[r + dr, c + dc]) with the offset
    (dr, dc) = (round(sin(angle) d), round(cos(angle) d)), each slice divided by its pair count."""
    rows, cols = grey.shape
    out = np.zeros((LEVELS, LEVELS, len(DISTANCES), len(ANGLES)), np.float64)
    for a, angle in enumerate(ANGLES):
        for d, distance in enumerate(DISTANCES):
            dr, dc = int(round(np.sin(angle) * distance)), int(round(np.cos(angle) * distance))
            first = grey[max(0, -dr) : min(rows, rows - dr), max(0, -dc) : min(cols, cols - dc)]
            second = grey[max(0, dr) : min(rows, rows + dr), max(0, dc) : min(cols, cols + dc)]
            pairs = first.astype(np.int64) * LEVELS + second
            counts = np.bincount(pairs.ravel(), minlength=LEVELS * LEVELS).reshape(LEVELS, LEVELS)
            out[:, :, d, a] = counts / max(counts.sum(), 1)
    return out


def _value_entropy(array: np.ndarray) -> float:
    _, counts = np.unique(array, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def glcm_score(image: np.ndarray, patch: int = PATCH) -> float:
    """Mean GLCM entropy over the image's whole `patch` x `patch` tiles (a partial edge is dropped)."""
    grey = grey64(image)
    tiles_y, tiles_x = grey.shape[0] // patch, grey.shape[1] // patch
    if not tiles_y or not tiles_x:
        raise ValueError(f"image {grey.shape} is smaller than one {patch} x {patch} patch")
    scores = [
        _value_entropy(cooccurrence(grey[i * patch : (i + 1) * patch, j * patch : (j + 1) * patch]))
        for i in range(tiles_y)
        for j in range(tiles_x)
    ]
    return float(np.mean(scores))


def jpeg_bytes(image: np.ndarray, quality: int = JPEG_QUALITY) -> int:
    """Size of the image encoded as JPEG by Pillow at `quality`."""
    buffer = io.BytesIO()
    Image.fromarray(_check_rgb(image)).save(buffer, format="JPEG", quality=quality)
    return buffer.tell()


def compression_ratio(images: Iterable[np.ndarray], quality: int = JPEG_QUALITY) -> float:
    """Raw RGB bytes over JPEG bytes, summed over `images`."""
    raw = encoded = 0
    for image in images:
        raw += _check_rgb(image).size
        encoded += jpeg_bytes(image, quality)
    if not encoded:
        raise ValueError("compression_ratio: no images")
    return raw / encoded
