"""Input pipeline throughput: decode + bucket resize to 2K, sga-jax's Grain pipeline against a torch
DataLoader doing the same PIL work, with 0, 1 and 2 worker processes, side by side in one run.

python bench/data.py [--images 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import json
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


def time_grain(config, workers: int) -> tuple[float, int]:
    config.worker_count = workers
    pipeline = make_pipeline(config, seed=0)
    start = time.perf_counter()
    images = sum(int(batch["valid"].sum()) for batch in pipeline)
    elapsed = time.perf_counter() - start
    pipeline.close()
    return elapsed, images


def time_torch(pipeline_plan, paths, buckets, workers: int, batch_size: int) -> tuple[float, int]:
    dataset = TorchBucketDataset(paths, buckets)
    batches = [[int(i) for i, v in zip(indices, valid) if v] for _, indices, valid in pipeline_plan.epoch_batches(0)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                         prefetch_factor=2 if workers else None)
    start = time.perf_counter()
    images = sum(batch.shape[0] for batch in loader)
    return time.perf_counter() - start, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    flags.FLAGS.mark_as_parsed()
    torch.set_num_threads(1)
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
        rows, record = [], {"images": args.images, "index_s": index_s, "buckets": index.histogram(), "runs": []}
        for workers in (0, 1, 2):
            grain_times, torch_times = [], []
            for _ in range(args.repeats):
                seconds, n_grain = time_grain(config, workers)
                grain_times.append(seconds)
                seconds, n_torch = time_torch(plan, source_paths, buckets, workers, config.global_batch_size)
                torch_times.append(seconds)
            assert n_grain == n_torch == args.images, (n_grain, n_torch)
            grain_rate = args.images / float(np.median(grain_times))
            torch_rate = args.images / float(np.median(torch_times))
            rows.append({"workers": workers, "sga-jax Grain images/s": grain_rate, "torch DataLoader images/s": torch_rate,
                         "ratio": grain_rate / torch_rate})
            record["runs"].append({"workers": workers, "grain_s": grain_times, "torch_s": torch_times})
            print(rows[-1], flush=True)
    body = (
        f"{args.images} JPEGs (quality 95, 2730 to 4096 px long edge, 6 aspect ratios) decoded with PIL and "
        f"cover-resized (Lanczos) into 2K aspect-ratio buckets (long edge <= 2048, 4 MPix budget, multiple 64), "
        f"batches of 4 of one bucket, as float32 in [-1, 1]. Both loaders do the same PIL work on the same batches; "
        f"median of {args.repeats} full passes each, worker start-up included; header indexing took {index_s:.2f} s.\n\n"
        + markdown_table(rows)
    )
    write_section("data", "Input pipeline: decode + 2K bucket resize", body, record)


if __name__ == "__main__":
    main()
