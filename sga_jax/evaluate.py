"""`python -m sga_jax.evaluate`: the image metrics of `sga_jax.metrics` over folders of images.

    python -m sga_jax.evaluate --images samples/                     # GLCM score, compression ratio
    python -m sga_jax.evaluate --images recon/ --reference originals/  # + PSNR, SSIM, NMSE by file name
    python -m sga_jax.evaluate --images samples/ --reference real/ --dinov2 dinov2-large/  # + FD-DINOv2
    python -m sga_jax.evaluate --images samples/ --clip clip-vit-base-patch16/          # + CLIP score
    python -m sga_jax.evaluate --images samples/ --aesthetics predictor.safetensors --aesthetics_clip clip-vit-large-patch14/

Images are read as 8-bit RGB. With `--reference`, files are paired by name for the reconstruction
metrics (pairs must have the same size; names without a partner are skipped and counted). With
`--dinov2` (a save_pretrained DINOv2 directory) the Fréchet distance between the two sets' CLS
features is added; `--reference_stats` reads the reference set's statistics from an .npz written
by `--save_stats` instead of encoding it again. With `--clip` (a save_pretrained `CLIPModel`
directory holding its tokenizer) the mean CLIP score against the prompts of IMAGES/index.jsonl
(as `python -m sga_jax.sample` writes it: {"file": ..., "prompt": ...} per line) is added; with
`--aesthetics` (the LAION predictor as safetensors) and `--aesthetics_clip` (CLIP ViT-L/14) the
mean aesthetic score. The report is printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterator, Sequence

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from sga_jax import metrics
from sga_jax.data.sources import IMAGE_EXTENSIONS
from sga_jax.data.transforms import BadRecord, open_image
from sga_jax.models import clip, dinov2
from sga_jax.text import load_tokenizer, tokenize

MAX_PIXELS = 8192 * 8192


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly inside `folder`, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def read_rgb(path: Path) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3); unreadable files raise a ValueError naming them."""
    try:
        with open_image(path, MAX_PIXELS) as image:
            return np.asarray(image.convert("RGB"))
    except BadRecord as error:
        raise ValueError(f"{path}: {error}") from error


def to_model_range(image: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1], batched (1, H, W, 3)."""
    return (image.astype(np.float32) / 127.5 - 1.0)[None]


def generation_metrics(files: Sequence[Path]) -> dict[str, float]:
    """Mean GLCM score and the JPEG compression ratio of a set of images, reading one image at a time."""
    scores = []

    def images() -> Iterator[np.ndarray]:
        for path in tqdm(files, desc="GLCM + JPEG", unit="image", disable=None):
            image = read_rgb(path)
            scores.append(metrics.glcm_score(image))
            yield image

    ratio = metrics.compression_ratio(images())
    return {"glcm_score": float(np.mean(scores)), "compression_ratio": ratio}


def reconstruction_metrics(files: Sequence[Path], reference: Path) -> dict[str, float]:
    """Mean PSNR (dB), SSIM and NMSE of `files` against the same names in `reference`."""
    partners = {p.name: p for p in list_images(reference)}
    values: dict[str, list[float]] = {"psnr": [], "ssim": [], "nmse": []}
    for path in files:
        if path.name not in partners:
            continue
        ours, theirs = read_rgb(path), read_rgb(partners[path.name])
        if ours.shape != theirs.shape:
            raise ValueError(f"{path} is {ours.shape[:2]} but {partners[path.name]} is {theirs.shape[:2]}")
        a, b = jnp.asarray(to_model_range(ours)), jnp.asarray(to_model_range(theirs))
        values["psnr"].append(float(metrics.psnr(a, b)[0]))
        values["ssim"].append(float(metrics.ssim(a, b)[0]))
        values["nmse"].append(float(metrics.nmse(a, b)[0]))
    if not values["psnr"]:
        raise ValueError(f"no file name in the images folder also appears in {reference}")
    report = {name: float(np.mean(v)) for name, v in values.items()}
    report["pairs"] = len(values["psnr"])
    report["unpaired"] = len(files) - len(values["psnr"])
    return report


def _batches(files: Sequence[Path], size: int, desc: str) -> Iterator[np.ndarray]:
    """Batches of images in [-1, 1], with a progress bar; a batch's images must share a size."""
    for start in tqdm(range(0, len(files), size), desc=desc, unit="batch", disable=None):
        chunk = files[start : start + size]
        images = [to_model_range(read_rgb(p)) for p in chunk]
        for path, image in zip(chunk, images):
            if image.shape != images[0].shape:
                raise ValueError(f"{path} is {image.shape[1:3]} but {chunk[0]} is {images[0].shape[1:3]}: "
                                 "images in one batch must share a size (use --batch_size 1)")
        yield np.concatenate(images)


def dinov2_statistics(model: dinov2.Dinov2, files: Sequence[Path], batch_size: int) -> metrics.FeatureStatistics:
    """Streaming statistics of the DINOv2 CLS features of a set (images may differ in size
    across batches; within a batch they must agree)."""
    stats = metrics.FeatureStatistics(model.config.hidden_size)
    for batch in _batches(files, batch_size, "DINOv2 features"):
        stats.update(metrics.dinov2_features(model, jnp.asarray(batch)))
    return stats


def read_prompts(folder: str | Path) -> dict[str, str]:
    """File name -> prompt from the folder's index.jsonl."""
    index = Path(folder) / "index.jsonl"
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found: CLIP score needs each image's prompt "
                                '(lines {"file": ..., "prompt": ...}, as python -m sga_jax.sample writes)')
    records = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
    return {r["file"]: r["prompt"] for r in records}


def clip_score_mean(model: clip.ClipModel, tokenizer: object, files: Sequence[Path], prompts: dict[str, str],
                    batch_size: int) -> float:
    """Mean CLIP score of the images against their prompts; an image without a prompt is an error."""
    missing = [p.name for p in files if p.name not in prompts]
    if missing:
        raise ValueError(f"no prompt in index.jsonl for {', '.join(missing[:5])}")
    length = model.text_model.config.max_position_embeddings
    scores = []
    for start, batch in zip(range(0, len(files), batch_size), _batches(files, batch_size, "CLIP score")):
        ids, _ = tokenize(tokenizer, [prompts[p.name] for p in files[start : start + batch_size]], length)
        scores.append(np.asarray(metrics.clip_score(model, jnp.asarray(batch), jnp.asarray(ids))))
    return float(np.concatenate(scores).mean())


def aesthetic_mean(clip_model: clip.ClipModel, predictor: metrics.AestheticPredictor, files: Sequence[Path],
                   batch_size: int) -> float:
    """Mean aesthetic score of the images."""
    scores = [np.asarray(metrics.aesthetic_score(clip_model, predictor, jnp.asarray(batch)))
              for batch in _batches(files, batch_size, "aesthetics")]
    return float(np.concatenate(scores).mean())


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m sga_jax.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="folder of images to score")
    parser.add_argument("--reference", help="folder of reference images (pairs by name; the FD reference set)")
    parser.add_argument("--dinov2", help="save_pretrained DINOv2 directory: adds FD-DINOv2")
    parser.add_argument("--reference_stats", help=".npz of reference feature statistics (from --save_stats)")
    parser.add_argument("--save_stats", help="write the images' DINOv2 feature statistics to this .npz")
    parser.add_argument("--clip", help="save_pretrained CLIPModel directory with its tokenizer: adds CLIP score")
    parser.add_argument("--aesthetics", help="the LAION aesthetic predictor as safetensors: adds its mean score")
    parser.add_argument("--aesthetics_clip", help="the CLIPModel directory (ViT-L/14) the predictor reads")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--out", help="JSON report path (default: IMAGES/metrics.json)")
    args = parser.parse_args(argv)
    if (args.save_stats or args.reference_stats) and not args.dinov2:
        parser.error("--save_stats and --reference_stats need --dinov2")
    if bool(args.aesthetics) != bool(args.aesthetics_clip):
        parser.error("--aesthetics and --aesthetics_clip go together")

    files = list_images(args.images)
    report: dict[str, object] = {"images": len(files), **generation_metrics(files)}
    if args.reference:
        report.update(reconstruction_metrics(files, Path(args.reference)))
    if args.dinov2:
        model = dinov2.load(args.dinov2)
        stats = dinov2_statistics(model, files, args.batch_size)
        if args.save_stats:
            stats.save(args.save_stats)
        if args.reference_stats:
            reference = metrics.FeatureStatistics.load(args.reference_stats)
        elif args.reference:
            reference = dinov2_statistics(model, list_images(args.reference), args.batch_size)
        else:
            reference = None
        if reference is not None:
            report["fd_dinov2"] = metrics.frechet_distance(stats.mean, stats.covariance,
                                                           reference.mean, reference.covariance)
    if args.clip:
        clip_model = clip.load_clip_model(args.clip)
        report["clip_score"] = clip_score_mean(clip_model, load_tokenizer("clip", args.clip), files,
                                               read_prompts(args.images), args.batch_size)
    if args.aesthetics:
        report["aesthetics"] = aesthetic_mean(clip.load_clip_model(args.aesthetics_clip),
                                              metrics.load_aesthetic_predictor(args.aesthetics), files, args.batch_size)
    out = Path(args.out) if args.out else Path(args.images) / "metrics.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
