"""Aspect-ratio buckets: a fixed set of (width, height) training sizes, and which one an image uses.

Every size is a multiple of `multiple` (64 px lets F16 latents pack 2 x 2), no edge exceeds
`max_long_edge` and no area exceeds `pixel_budget`. An image goes to the bucket whose aspect ratio is
nearest its own in log space; it is then resized to cover that bucket and cropped to it.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from sga_jax.errors import ConfigError


Bucket = tuple[int, int]  # (width, height) in pixels


def make_buckets(max_long_edge: int, pixel_budget: int, multiple: int, *, max_aspect: float = 4.0) -> list[Bucket]:
    """All (w, h) with w, h multiples of `multiple`, max(w, h) <= max_long_edge, w*h <= pixel_budget,
    aspect ratio within [1/max_aspect, max_aspect], each the largest height for its width (and the
    largest width for its height), sorted by aspect ratio w/h.
    """
    if multiple < 1 or max_long_edge < multiple:
        raise ConfigError(f"need 1 <= multiple <= max_long_edge, got multiple={multiple}, max_long_edge={max_long_edge}")
    if pixel_budget < multiple * multiple:
        raise ConfigError(f"pixel_budget {pixel_budget} is below one {multiple}x{multiple} tile")
    if max_aspect < 1:
        raise ConfigError(f"max_aspect must be >= 1, got {max_aspect}")
    longest = max_long_edge // multiple * multiple
    sizes: set[Bucket] = set()
    for w in range(multiple, longest + 1, multiple):
        h = min(pixel_budget // w // multiple * multiple, longest)
        if h >= multiple and 1 / max_aspect <= w / h <= max_aspect:
            sizes.add((w, h))
            sizes.add((h, w))
    # keep only sizes no other size dominates (same ratio class, both edges at least as large)
    best: dict[float, Bucket] = {}
    for w, h in sizes:
        ratio = round(w / h, 6)
        if ratio not in best or w * h > best[ratio][0] * best[ratio][1]:
            best[ratio] = (w, h)
    buckets = sorted(best.values(), key=lambda b: b[0] / b[1])
    if not buckets:
        raise ConfigError(
            f"no bucket fits max_long_edge={max_long_edge}, pixel_budget={pixel_budget}, "
            f"multiple={multiple}, max_aspect={max_aspect}"
        )
    return buckets


def nearest_bucket(buckets: Sequence[Bucket], width: int, height: int) -> int:
    """Index of the bucket whose aspect ratio is nearest width/height (log distance; first on ties)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    log_ratios = np.log(np.array([w / h for w, h in buckets]))
    return int(np.argmin(np.abs(log_ratios - math.log(width / height))))


def cover_box(width: int, height: int, bucket: Bucket,
              offset: tuple[float, float]) -> tuple[float, float, float, float]:
    """The source box (left, top, right, bottom) that resizes onto `bucket` after resizing the
    image to cover it: the largest box of the bucket's aspect ratio, placed at `offset` in [0, 1]^2
    of the slack (0.5, 0.5 is a center crop)."""
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    box_w, box_h = min(bw / scale, width), min(bh / scale, height)
    left = (width - box_w) * offset[0]
    top = (height - box_h) * offset[1]
    return left, top, left + box_w, top + box_h


def bucket_name(bucket: Bucket) -> str:
    """'WxH', the key used in bucket histograms."""
    return f"{bucket[0]}x{bucket[1]}"
