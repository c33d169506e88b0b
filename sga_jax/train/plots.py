"""Pictures a training run leaves behind: loss curves from metrics.jsonl and grids of samples."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from sga_jax.data.transforms import to_pixels

TERMS = ("loss", "loss_fm", "loss_sga", "loss_irepa", "loss_repa")


def read_metrics(path: str | Path) -> list[dict]:
    """The JSON objects of a metrics.jsonl file, skipping a torn last line."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def smooth(values: Sequence[float], window: int = 8) -> np.ndarray:
    """Trailing moving average (shorter windows at the start), to see a trend through the noise
    that per-step random timesteps put into a diffusion loss."""
    values = np.asarray(values, np.float64)
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    counts = np.minimum(ends, window)
    return (sums[ends] - sums[ends - counts]) / counts


def loss_curves(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """Plot each loss term of a run on its own panel (flow matching and alignment apart)."""
    metrics_path = Path(metrics_path)
    if not metrics_path.is_file():
        return None
    rows = read_metrics(metrics_path)
    terms = [t for t in TERMS if any(t in r for r in rows)]
    if not terms:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(terms), figsize=(4 * len(terms), 3.2), squeeze=False)
    for ax, term in zip(axes[0], terms):
        steps, values = zip(*[(r["step"], r[term]) for r in rows if term in r])
        ax.plot(steps, values, marker=".", alpha=0.35, label="logged")
        ax.plot(steps, smooth(values), label="moving average")
        ax.set_title(term)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def save_grid(images: np.ndarray, path: str | Path, *, captions: Sequence[str] = (), columns: int | None = None) -> Path:
    """Save (B, H, W, 3) images in [-1, 1] as one PNG grid (captions go to a .txt beside it)."""
    images = np.asarray(images, np.float32)
    b, h, w, _ = images.shape
    columns = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / columns)
    canvas = np.zeros((rows * h, columns * w, 3), np.uint8)
    pixels = to_pixels(images)
    for i in range(b):
        r, c = divmod(i, columns)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = pixels[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    if captions:
        path.with_suffix(".txt").write_text("\n".join(captions) + "\n")
    return path
