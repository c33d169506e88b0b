"""Run pictures: loss curves from metrics.jsonl (torn last line tolerated) and sample grids."""

import json

import numpy as np
from PIL import Image

from sga_jax.train import plots


def test_smooth_is_a_trailing_moving_average():
    values = np.arange(1.0, 11.0)
    expected = [np.mean(values[max(0, i - 2) : i + 1]) for i in range(10)]
    np.testing.assert_allclose(plots.smooth(values, window=3), expected)


def test_loss_curves_and_sample_grid_are_written(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s, "loss_fm": 0.5 / s, "loss_sga": 0.1 / s} for s in range(1, 11)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 11, "lo')
    out = plots.loss_curves(metrics, tmp_path / "curve.png")
    assert out is not None and Image.open(out).size[0] > Image.open(out).size[1]
    assert plots.loss_curves(tmp_path / "missing.jsonl", tmp_path / "none.png") is None

    images = np.linspace(-1, 1, 3 * 8 * 8 * 3).reshape(3, 8, 8, 3)
    grid = plots.save_grid(images, tmp_path / "grid.png", captions=["a", "b", "c"])
    pixels = np.asarray(Image.open(grid))
    assert pixels.shape == (16, 16, 3)
    np.testing.assert_array_equal(pixels[:8, :8], np.clip((images[0] + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8))
    assert (tmp_path / "grid.txt").read_text().split() == ["a", "b", "c"]
