"""The evaluation passes behind `python -m sga_jax.evaluate`: which metrics a folder gets and how
they stream over its images.

Three kinds of run, told apart by their inputs:

* generated images (the paper's Table 1): GLCM score and JPEG compression ratio always; gFID
  against a reference set (`reference`, or its saved statistics), CLIP score and aesthetics when
  their networks are given;
* reconstructions paired by file name with their originals in `reference` (Table 2): NMSE, PSNR,
  SSIM and LPIPS (when its network is given) per pair and rFID between the two sets (plus GLCM and
  compression ratio);
* originals reconstructed here through a VAE (`Networks.vae`, Table 2): each image is encoded
  and decoded (tiled when large), quantised to 8 bits as if saved, and scored against itself.

Every network is optional and loaded by the caller; the report is a flat dict of numbers plus the
protocol (`sga_jax.evaluate.tables` renders it).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image
from tqdm import tqdm

from sga_jax import metrics
from sga_jax.data.transforms import to_pixels
from sga_jax.errors import ConfigError
from sga_jax.evaluate.images import ImageReader, batches, crop_to_multiple, list_images, paired, to_model_range
from sga_jax.models import clip, dinov2, inception, lpips, vae
from sga_jax.text import tokenize


@dataclasses.dataclass
class Networks:
    """The networks a run may use; each is optional. `clip` is (CLIPModel, its tokenizer);
    `aesthetics` (the CLIP ViT-L/14 model, the LAION predictor)."""

    inception: inception.InceptionV3 | None = None
    dinov2: dinov2.Dinov2 | None = None
    clip: tuple[clip.ClipModel, Any] | None = None
    aesthetics: tuple[clip.ClipModel, metrics.AestheticPredictor] | None = None
    vae: vae.AutoEncoder | None = None
    lpips: lpips.LPIPS | None = None


@dataclasses.dataclass(frozen=True)
class Settings:
    """How a run reads and scores images.

    `size`: bring every image to size x size first (`images.square`); `fid_protocol`: the
    Inception input protocol; `reference_stats` / `save_stats`: .npz files of feature statistics
    (see `metrics.save_statistics`); `reconstructions`: a folder to write the VAE's reconstructions to.
    """

    size: int | None = None
    fid_protocol: str = inception.DEFAULT_PROTOCOL
    batch_size: int = 16
    reference_stats: Path | None = None
    save_stats: Path | None = None
    reconstructions: Path | None = None


def generation_metrics(files: Sequence[Path], reader: ImageReader) -> dict[str, float]:
    """Mean GLCM score and the JPEG compression ratio of a set of images, reading one image at a time."""
    scores = []

    def images() -> Iterator[np.ndarray]:
        for path in tqdm(files, desc="GLCM + JPEG", unit="image", disable=None):
            image = reader(path)
            scores.append(metrics.glcm_score(image))
            yield image

    ratio = metrics.compression_ratio(images())
    return {"glcm_score": float(np.mean(scores)), "compression_ratio": ratio}


def _inception_stats(networks: Networks, settings: Settings) -> metrics.InceptionStatistics:
    return metrics.InceptionStatistics(networks.inception, protocol=settings.fid_protocol,
                                       batch_size=settings.batch_size)


def folder_inception_statistics(files: Sequence[Path], reader: ImageReader, networks: Networks,
                                settings: Settings, desc: str) -> metrics.FeatureStatistics:
    """FID Inception statistics of a set of images, one image read at a time."""
    stream = _inception_stats(networks, settings)
    for path in tqdm(files, desc=desc, unit="image", disable=None):
        stream.add(to_model_range(reader(path)))
    return stream.finish()


def dinov2_statistics(model: dinov2.Dinov2, files: Sequence[Path], reader: ImageReader,
                      batch_size: int) -> metrics.FeatureStatistics:
    """Streaming statistics of the DINOv2 CLS features of a set (images may differ in size
    across batches; within a batch they must agree)."""
    stats = metrics.FeatureStatistics(model.config.hidden_size)
    for batch in batches(files, batch_size, "DINOv2 features", reader):
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


def clip_score_mean(model: clip.ClipModel, tokenizer: Any, files: Sequence[Path], prompts: dict[str, str],
                    reader: ImageReader, batch_size: int) -> float:
    """Mean CLIP score of the images against their prompts; an image without a prompt is an error."""
    missing = [p.name for p in files if p.name not in prompts]
    if missing:
        raise ConfigError(f"no prompt in index.jsonl for {', '.join(missing[:5])}")
    length = model.text_model.config.max_position_embeddings
    scores = []
    for start, batch in zip(range(0, len(files), batch_size), batches(files, batch_size, "CLIP score", reader)):
        ids, _ = tokenize(tokenizer, [prompts[p.name] for p in files[start : start + batch_size]], length)
        scores.append(np.asarray(metrics.clip_score(model, jnp.asarray(batch), jnp.asarray(ids))))
    return float(np.concatenate(scores).mean())


def aesthetic_mean(clip_model: clip.ClipModel, predictor: metrics.AestheticPredictor, files: Sequence[Path],
                   reader: ImageReader, batch_size: int) -> float:
    """Mean aesthetic score of the images."""
    scores = [np.asarray(metrics.aesthetic_score(clip_model, predictor, jnp.asarray(batch)))
              for batch in batches(files, batch_size, "aesthetics", reader)]
    return float(np.concatenate(scores).mean())


def score_pairs(pairs: Iterable[tuple[str, np.ndarray, np.ndarray]], networks: Networks, settings: Settings,
                statistics: dict[str, metrics.FeatureStatistics]) -> dict[str, Any]:
    """Table 2 over (name, evaluated uint8 image, reference uint8 image) triples: mean PSNR (dB),
    SSIM, NMSE and (with its network) LPIPS, and rFID between the two sets when the Inception is
    given (the evaluated set's Inception statistics go into `statistics`)."""
    scores = {"psnr": metrics.psnr, "ssim": metrics.ssim, "nmse": metrics.nmse}
    if networks.lpips is not None:
        scores["lpips"] = functools.partial(metrics.lpips_distance, networks.lpips)
    values: dict[str, list[float]] = {metric: [] for metric in scores}
    streams = (_inception_stats(networks, settings), _inception_stats(networks, settings)) if networks.inception else ()
    for name, ours, theirs in pairs:
        if ours.shape != theirs.shape:
            raise ConfigError(f"{name}: the evaluated image is {ours.shape[:2]} but its reference is {theirs.shape[:2]}")
        a, b = jnp.asarray(to_model_range(ours)), jnp.asarray(to_model_range(theirs))
        for metric, score in scores.items():
            values[metric].append(float(score(a, b)[0]))
        for stream, image in zip(streams, (a, b)):
            stream.add(image)
    if not values["psnr"]:
        raise ConfigError("no image has a reference partner of the same file name")
    report: dict[str, Any] = {name: float(np.mean(v)) for name, v in values.items()}
    report["pairs"] = len(values["psnr"])
    if streams:
        statistics["inception"], reference = (stream.finish() for stream in streams)
        report["rfid"] = statistics["inception"].frechet_distance(reference)
    return report


@functools.partial(jax.jit, static_argnums=0)
def _reconstruct(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array) -> jax.Array:
    ae = nnx.merge(graphdef, state)
    return jnp.clip(ae.decode(ae.encode(x)), -1.0, 1.0)


def reconstruct(ae: vae.AutoEncoder, pixels: np.ndarray) -> np.ndarray:
    """A uint8 image (H, W, 3) through the VAE (posterior mean, tiled above its threshold) and back
    to uint8; sides must be multiples of the VAE's downsampling factor."""
    graphdef, state = nnx.split(ae)
    return to_pixels(np.asarray(_reconstruct(graphdef, state, jnp.asarray(to_model_range(pixels))))[0])


def _vae_pairs(ae: vae.AutoEncoder, files: Sequence[Path], reader: ImageReader,
               out: Path | None) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Originals center-cropped to multiples of the VAE's factor, and their reconstructions."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for path in tqdm(files, desc="VAE reconstruction", unit="image", disable=None):
        original = crop_to_multiple(reader(path), ae.config.downsample_factor)
        reader.record(path, original)
        recon = reconstruct(ae, original)
        if out is not None:
            Image.fromarray(recon).save(out / f"{path.stem}.png")
        yield path.name, recon, original


def _file_pairs(pairs: Sequence[tuple[Path, Path]], reader: ImageReader,
                reference_reader: ImageReader) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    for ours, theirs in tqdm(pairs, desc="pairs", unit="image", disable=None):
        yield ours.name, reader(ours), reference_reader(theirs)


Statistics = dict[str, metrics.FeatureStatistics]


def _reference_statistics(name: str, dim: int, reference: Path | None, settings: Settings,
                          compute: Callable[[list[Path], ImageReader], metrics.FeatureStatistics],
                          ) -> metrics.FeatureStatistics | None:
    """The reference set's statistics: from `settings.reference_stats`, else computed over the
    reference folder by `compute(files, reader)`, else None (no distance to report)."""
    if settings.reference_stats is not None:
        return metrics.load_statistics(settings.reference_stats, name, dim)
    if reference is not None:
        return compute(list_images(reference), ImageReader(settings.size))
    return None


def _vae_run(files: Sequence[Path], reader: ImageReader, networks: Networks, settings: Settings,
             statistics: Statistics) -> dict[str, Any]:
    pairs = _vae_pairs(networks.vae, files, reader, settings.reconstructions)
    return {"table": 2, **score_pairs(pairs, networks, settings, statistics)}


def _folder_run(images: Path, files: Sequence[Path], reference: Path | None, reader: ImageReader,
                networks: Networks, settings: Settings, statistics: Statistics) -> dict[str, Any]:
    pairs = paired(files, reference) if reference is not None else []
    if networks.lpips is not None and not pairs:
        raise ConfigError("LPIPS compares image pairs: give --reference with same-named originals, or --vae"
                         + (f" (no file of {images} has a same-named partner in {reference})" if reference else ""))
    report: dict[str, Any] = generation_metrics(files, reader)
    if pairs:
        report.update(table=2, unpaired=len(files) - len(pairs))
        report.update(score_pairs(_file_pairs(pairs, reader, ImageReader(settings.size)), networks, settings,
                                  statistics))
    else:
        report["table"] = 1
    if networks.inception is not None and not pairs:
        statistics["inception"] = folder_inception_statistics(files, reader, networks, settings, "Inception")
        theirs = _reference_statistics("inception", inception.FEATURES, reference, settings, lambda f, r: (
            folder_inception_statistics(f, r, networks, settings, "Inception (reference)")))
        if theirs is not None:
            report["gfid"] = statistics["inception"].frechet_distance(theirs)
            report["reference_images"] = theirs.count
    if networks.dinov2 is not None:
        model = networks.dinov2
        statistics["dinov2"] = dinov2_statistics(model, files, reader, settings.batch_size)
        theirs = _reference_statistics("dinov2", model.config.hidden_size, reference, settings,
                                       lambda f, r: dinov2_statistics(model, f, r, settings.batch_size))
        if theirs is not None:
            report["fd_dinov2"] = statistics["dinov2"].frechet_distance(theirs)
    if networks.clip is not None:
        model, tokenizer = networks.clip
        report["clip_score"] = clip_score_mean(model, tokenizer, files, read_prompts(images), reader,
                                               settings.batch_size)
    if networks.aesthetics is not None:
        report["aesthetics"] = aesthetic_mean(*networks.aesthetics, files, reader, settings.batch_size)
    return report


def evaluate(images: str | Path, reference: str | Path | None, networks: Networks,
             settings: Settings = Settings()) -> dict[str, Any]:
    """The report of one run (see the module docstring for the three kinds). With
    `settings.save_stats`, the evaluated set's feature statistics are written there."""
    images = Path(images)
    reference = Path(reference) if reference is not None else None
    files = list_images(images)
    reader = ImageReader(settings.size)
    statistics: Statistics = {}
    report: dict[str, Any] = {"images": len(files)}
    if networks.vae is not None:
        if reference is not None:
            raise ConfigError("a VAE run reconstructs --images and scores them against themselves; it takes no --reference")
        report.update(_vae_run(files, reader, networks, settings, statistics))
    else:
        report.update(_folder_run(images, files, reference, reader, networks, settings, statistics))
    if settings.save_stats is not None:
        if not statistics:
            raise ConfigError("--save_stats needs a feature network (--inception or --dinov2)")
        metrics.save_statistics(settings.save_stats, statistics)
    report["resolution"] = reader.resolution()
    if networks.inception is not None:
        report["fid_protocol"] = settings.fid_protocol
    if settings.size is not None:
        report["size"] = settings.size
    return report
