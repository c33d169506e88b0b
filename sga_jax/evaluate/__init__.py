"""Evaluation over folders of images: the SGA paper's Tables 1 and 2 (`python -m sga_jax.evaluate`).

- `images`: listing, 8-bit decoding, pairing by name, the size protocol (`square`)
- `run`: the metric passes and `evaluate(images, reference, networks, settings) -> report`
- `tables`: the report as the paper's table row in Markdown, with its protocol
- `__main__`: the command line (arguments -> networks -> `evaluate` -> JSON + Markdown)
"""

from sga_jax.evaluate.images import ImageReader, crop_to_multiple, list_images, paired, read_rgb, square
from sga_jax.evaluate.run import (
    Networks, Settings, aesthetic_mean, clip_score_mean, dinov2_statistics, evaluate, folder_inception_statistics,
    generation_metrics, read_prompts, reconstruct, score_pairs,
)
from sga_jax.evaluate.tables import TABLE1, TABLE2, markdown

__all__ = [
    "TABLE1", "TABLE2", "ImageReader", "Networks", "Settings", "aesthetic_mean", "clip_score_mean", "crop_to_multiple",
    "dinov2_statistics", "evaluate", "folder_inception_statistics", "generation_metrics", "list_images", "markdown",
    "paired", "read_prompts", "read_rgb", "reconstruct", "score_pairs", "square",
]
