"""Input pipeline throughput: decode + bucket resize to 2K, sga-jax's Grain pipeline against a torch
DataLoader doing the same PIL work, with 0, 1 and 2 worker processes, side by side in one run.

python bench/data.py [--images 16] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from absl import flags
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import markdown_table, write_section  # noqa: E402
from sga_jax.data import default_data_config, make_pipeline  # noqa: E402
from sga_jax.data.buckets import cover_box  # noqa: E402

SOURCE_SIZES = [(3840, 2160), (2160, 3840), (3000, 3000), (4096, 2730), (2730, 4096), (3600, 2400)]
SAMPLES = ["astronaut", "coffee", "chelsea", "rocket"]


def write_dataset(directory: Path, count: int) -> None:
    """`count` JPEGs (quality 95) of 4K-class photographs: scikit-image samples upscaled to varied sizes."""
    import skimage.data

    lines = []
    for i in range(count):
        photo = Image.fromarray(getattr(skimage.data, SAMPLES[i % len(SAMPLES)])()).convert("RGB")
        photo = photo.resize(SOURCE_SIZES[i % len(SOURCE_SIZES)], Image.Resampling.BICUBIC)
        photo.save(directory / f"{i:04d}.jpg", quality=95)
        lines.append(json.dumps({"file_name": f"{i:04d}.jpg", "text": f"photo {i}"}))
    (directory / "metadata.jsonl").write_text("\n".join(lines) + "\n")


class TorchBucketDataset(torch.utils.data.Dataset):
    """The same work with PIL in a torch Dataset: decode, orient, RGB, cover-resize to the bucket."""

    def __init__(self, paths: list[str], bucket_of: list[tuple[int, int]]):
        self.paths, self.bucket_of = paths, bucket_of

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.paths[index]) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            bucket = self.bucket_of[index]
            resized = image.resize(bucket, Image.Resampling.LANCZOS, box=cover_box(*image.size, bucket, (0.5, 0.5)))
        return torch.from_numpy(np.asarray(resized, np.float32) * (2.0 / 255.0) - 1.0)


def _two_epochs(epochs, count) -> tuple[float, float, int]:
    """(seconds for the first epoch, start-up included; seconds for the second; images in the second)."""
    start = time.perf_counter()
    for _ in next(epochs):
        pass
    first = time.perf_counter()
    images = sum(count(batch) for batch in next(epochs))
    return first - start, time.perf_counter() - first, images


def time_grain(config, workers: int) -> tuple[float, float, int]:
    config.worker_count, config.num_epochs = workers, 2
    pipeline = make_pipeline(config, seed=0)
    per_epoch = pipeline.plan.batches_per_epoch
    epochs = ((next(pipeline) for _ in range(per_epoch)) for _ in range(2))
    result = _two_epochs(epochs, lambda batch: int(batch["valid"].sum()))
    pipeline.close()
    return result


def time_torch(batches: list[list[int]], paths, buckets, workers: int) -> tuple[float, float, int]:
    loader = torch.utils.data.DataLoader(TorchBucketDataset(paths, buckets), batch_sampler=batches, num_workers=workers,
                                         prefetch_factor=2 if workers else None, persistent_workers=workers > 0)
    return _two_epochs((iter(loader) for _ in range(2)), lambda batch: batch.shape[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    flags.FLAGS.mark_as_parsed()
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        write_dataset(directory, args.images)
        config = default_data_config()
        config.path = str(directory)
        config.buckets.max_long_edge, config.buckets.pixel_budget, config.buckets.multiple = 2048, 2048 * 2048, 64
        config.global_batch_size, config.num_epochs, config.shuffle, config.remainder = 4, 1, False, "pad"
        start = time.perf_counter()
        probe_pipeline = make_pipeline(config, seed=0)
        index_s = time.perf_counter() - start
        plan, index = probe_pipeline.plan, probe_pipeline.index
        source_paths = [str(directory / f"{i:04d}.jpg") for i in range(args.images)]
        buckets = [index.bucket_sizes[b] for b in index.record_bucket]
        batches = [[int(i) for i, v in zip(indices, valid) if v] for _, indices, valid in plan.epoch_batches(0)]
        rows, record = [], {"images": args.images, "index_s": index_s, "buckets": index.histogram(), "runs": []}
        for workers in (0, 1, 2):
            runs = {"grain": [], "torch": []}
            for _ in range(args.repeats):
                runs["grain"].append(time_grain(config, workers))
                runs["torch"].append(time_torch(batches, source_paths, buckets, workers))
            assert all(n == args.images for r in runs.values() for _, _, n in r), runs
            first = {k: float(np.median([r[0] for r in v])) for k, v in runs.items()}
            rate = {k: args.images / float(np.median([r[1] for r in v])) for k, v in runs.items()}
            rows.append({"workers": workers, "sga-jax Grain images/s": rate["grain"],
                         "torch DataLoader images/s": rate["torch"], "ratio": rate["grain"] / rate["torch"],
                         "Grain epoch 1 s": first["grain"], "torch epoch 1 s": first["torch"]})
            record["runs"].append({"workers": workers, **{f"{k}_s": v for k, v in runs.items()}})
            print(rows[-1], flush=True)
    body = (
        f"{args.images} JPEGs (quality 95, 2730 to 4096 px long edge, 6 aspect ratios) decoded with PIL and "
        f"cover-resized (Lanczos) into 2K aspect-ratio buckets (long edge <= 2048, 4 MPix budget, multiple 64), "
        f"batches of 4 of one bucket, as float32 in [-1, 1]. Both loaders do the same PIL work on the same batches. "
        f"Images/s is measured over a second epoch (steady state); the first epoch's time, worker start-up "
        f"included, is listed apart (Grain workers are spawned and import jax; torch forks). Medians of "
        f"{args.repeats} passes; header indexing took {index_s:.2f} s. 1-minute load average at the start: "
        f"{load:.1f} on {os.cpu_count()} cores (compare the side-by-side ratios, not absolute rates).\n\n"
        + markdown_table(rows)
    )
    write_section("data", "Input pipeline: decode + 2K bucket resize", body, record)


if __name__ == "__main__":
    main()
