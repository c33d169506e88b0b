"""Image datasets generated with PIL for the data tests: varied sizes and aspect ratios, every colour
mode the decoder must handle, EXIF rotation, and broken files of each kind."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

BUCKETS = dict(max_long_edge=64, pixel_budget=48 * 48, multiple=16)  # -> 16x64 32x64 48x48 64x32 64x16


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png16_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (PIL cannot write one)."""
    height, width, _ = pixels.shape

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def good_images(seed: int = 0) -> dict[str, tuple[bytes, tuple[int, int]]]:
    """file name -> (encoded bytes, (width, height) after EXIF orientation)."""
    rng = np.random.default_rng(seed)

    def rgb(w: int, h: int) -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    out: dict[str, tuple[bytes, tuple[int, int]]] = {}
    sizes = [(64, 48), (48, 64), (80, 40), (40, 80), (64, 64), (96, 24), (24, 96), (50, 50), (70, 35), (33, 66),
             (128, 64), (64, 128), (45, 60), (60, 45)]
    for i, (w, h) in enumerate(sizes):
        fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
        out[f"rgb_{i:02d}.{ext}"] = (encode(rgb(w, h), fmt), (w, h))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display: 64x32 stored, 32x64 shown
    out["exif_rotated.jpg"] = (encode(rgb(64, 32), "JPEG", exif=exif.tobytes()), (32, 64))
    rgba = np.concatenate([rng.integers(0, 256, (40, 56, 3)), rng.integers(0, 256, (40, 56, 1))], -1).astype(np.uint8)
    out["rgba.png"] = (encode(Image.fromarray(rgba, "RGBA"), "PNG"), (56, 40))
    out["gray.png"] = (encode(Image.fromarray(rng.integers(0, 256, (30, 60), dtype=np.uint8), "L"), "PNG"), (60, 30))
    out["cmyk.jpg"] = (encode(Image.new("CMYK", (48, 48), (0, 255, 255, 0)), "JPEG"), (48, 48))
    gray16 = rng.integers(0, 65536, (64, 32), dtype=np.uint16)
    out["gray16.png"] = (encode(Image.fromarray(gray16), "PNG"), (32, 64))
    out["rgb16.png"] = (png16_rgb(rng.integers(0, 65536, (48, 48, 3), dtype=np.uint16)), (48, 48))
    palette = Image.fromarray(rng.integers(0, 256, (36, 72, 3), dtype=np.uint8)).convert("P")
    out["palette.png"] = (encode(palette, "PNG"), (72, 36))
    return out


def bad_images(seed: int = 0) -> dict[str, tuple[bytes, str]]:
    """file name -> (bytes, expected reason substring). `truncated.jpg` passes the header check and
    fails only when decoded."""
    rng = np.random.default_rng(seed + 1)
    jpeg = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    return {
        "empty.png": (b"", "empty file"),
        "noise.jpg": (rng.integers(0, 256, 500, dtype=np.uint8).tobytes(), "not an image"),
        "text.png": (b"this is not an image\n", "not an image"),
        "huge.png": (encode(Image.new("RGB", (300, 300)), "PNG"), "too large"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "cannot decode"),
    }


MAX_PIXELS = 200 * 200  # refuses huge.png only


def write_metadata_dataset(directory: Path, seed: int = 0) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """Images plus metadata.jsonl in `directory`; returns ({good key: oriented size}, {bad key: reason})."""
    directory.mkdir(parents=True, exist_ok=True)
    good, bad = good_images(seed), bad_images(seed)
    lines = []
    for name, (data, _) in {**good, **bad}.items():
        (directory / name).write_bytes(data)
        lines.append(json.dumps({"file_name": name, "text": f"a photo of {name}", "aesthetic": 5.0}))
    lines.append("{not json")
    (directory / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return {k: size for k, (_, size) in good.items()}, {k: reason for k, (_, reason) in bad.items()}
