"""The training input pipeline: index a source, plan bucketed global batches, load them with Grain.

1. **Index.** Every record's image header is read once (threads) to learn its oriented size, so
   its bucket is known before anything is decoded; unreadable, empty, non-image and over-large
   files are skipped here with a reason.
2. **Plan.** For each epoch the readable records are shuffled with (seed, epoch), grouped by
   bucket and cut into *global* batches of one bucket each; the batch order is shuffled too. The
   plan is a pure function of (seed, epoch, step), identical on every process, and process p
   takes the p-th equal slice of each global batch: all processes agree on the bucket, shards
   are disjoint, and the iterator state is just a position (exact resume).
3. **Load.** A Grain `MapDataset` over the plan maps each element to a decoded batch (worker
   processes and prefetch configurable). A file that passed the header check but fails to decode
   becomes a filler slot of its batch, counted in `stats` and logged once: nothing crashes and
   batch shapes never change. Filler slots (also used to pad a bucket's last batch) have
   `valid=False`, a zero image and the caption, key and cached arrays of a good row of the batch;
   weight the loss by `valid`.

Batches are dicts of per-process numpy arrays: "image" float32 (b, H, W, 3) in [-1, 1], "caption"
and "key" (object arrays of str), "valid" (bool, False for filler slots), plus the
arrays of a joined caption cache. `sga_jax.parallel.host_to_global` makes global jax.Arrays of them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import grain
import jax
import ml_collections
import numpy as np

from sga_jax.data.buckets import Bucket, bucket_name, make_buckets, nearest_bucket
from sga_jax.data.cache import ArrayCacheSource, open_cache
from sga_jax.data.sources import open_source
from sga_jax.data.transforms import BadRecord, load_image, open_image, probe, to_rgb
from sga_jax.errors import ConfigError

log = logging.getLogger(__name__)

_STATE_VERSION = 1


def default_data_config() -> ml_collections.ConfigDict:
    """The data config and its defaults; `make_pipeline(config.data, seed=...)` reads these fields.

    source: "auto" (from `path`), "metadata_jsonl" (folder with metadata.jsonl), "captions_txt"
      (images with same-name .txt captions), "tfds" (ArrayRecord tfds dataset), "cache" (an
      ArrayCacheWriter directory: batches of its arrays, bucketed by shape).
    path: the dataset folder (all kinds but tfds).
    caption_field: the caption key of metadata.jsonl lines.
    tfds.{name, split, data_dir, image_feature, caption_feature}: the tfds dataset to read.
    caption_cache: optional cache directory joined by record key (e.g. "txt", "vec" arrays);
      records missing from it are skipped. caption_cache_fingerprint: checked when set.
    global_batch_size: images per step over all processes; split evenly across processes.
    buckets.fixed: "WxH" for one fixed resolution; otherwise buckets from max_long_edge,
      pixel_budget, multiple (edges are multiples of it) and max_aspect.
    random_crop: random crop offset (else center); flip: random horizontal flip.
    num_epochs: None repeats forever. shuffle: shuffle records and batch order every epoch.
    remainder: "pad" fills each bucket's last batch with filler slots (valid=False), so every
      image is seen once per epoch; "drop" drops it.
    worker_count: Grain worker processes (0: load in this process). worker_buffer_size: batches
      each worker prepares ahead. read_threads / read_buffer_size: threads and buffer per process.
    index_threads: threads reading image headers when indexing.
    index_cache: optional JSON file keeping the indexing results (image sizes, skip reasons) for
      later starts with the same records and settings; every process indexes the whole dataset.
    max_image_pixels: larger images are refused per record (decompression bombs).
    verify: fully decode every image while indexing (slower start; no replacements later).
    """
    config = ml_collections.ConfigDict()
    config.source = "auto"
    config.path = ""
    config.caption_field = "text"
    config.tfds = ml_collections.ConfigDict(
        {"name": "", "split": "train", "data_dir": "", "image_feature": "image", "caption_feature": "caption"}
    )
    config.caption_cache = ""
    config.caption_cache_fingerprint = ""
    config.global_batch_size = 8
    config.buckets = ml_collections.ConfigDict(
        {"fixed": "", "max_long_edge": 1024, "pixel_budget": 1024 * 1024, "multiple": 64, "max_aspect": 4.0}
    )
    config.random_crop = False
    config.flip = False
    config.num_epochs = ml_collections.config_dict.placeholder(int)
    config.shuffle = True
    config.remainder = "pad"
    config.worker_count = 0
    config.worker_buffer_size = 2
    config.read_threads = 0
    config.read_buffer_size = 2
    config.index_threads = 8
    config.index_cache = ""
    config.max_image_pixels = 8192 * 8192
    config.verify = False
    return config


def buckets_from_config(config: Any) -> list[Bucket]:
    """The bucket list of `config.buckets`: one fixed "WxH" size, or `make_buckets(...)`."""
    spec = config.buckets
    if spec.fixed:
        try:
            width, height = (int(v) for v in spec.fixed.lower().split("x"))
        except ValueError as error:
            raise ConfigError(f"data.buckets.fixed must look like '1024x768', got {spec.fixed!r}") from error
        return [(width, height)]
    return make_buckets(spec.max_long_edge, spec.pixel_budget, spec.multiple, max_aspect=spec.max_aspect)


# ----------------------------------------------------------------------------------------------
# Index


@dataclasses.dataclass
class DatasetIndex:
    """What indexing found: each record's bucket (-1: skipped), the bucket names, skipped records."""

    record_bucket: np.ndarray  # (records,) int32
    bucket_names: list[str]
    bucket_sizes: list[Bucket | None]  # (w, h) for image buckets, None for array-shape buckets
    skipped: list[dict[str, str]]
    listed: int  # records the source lists, plus entries it could not list

    @property
    def readable(self) -> int:
        return int((self.record_bucket >= 0).sum())

    def histogram(self) -> dict[str, int]:
        counts = np.bincount(self.record_bucket[self.record_bucket >= 0], minlength=len(self.bucket_names))
        return {name: int(n) for name, n in zip(self.bucket_names, counts) if n}


def _record_location(record: Mapping[str, Any]) -> str:
    return record.get("path") or record["key"]


def _check_image(record: Mapping[str, Any], max_pixels: int, verify: bool) -> tuple[int, int]:
    image_source = record["path"] if "path" in record else record["data"]
    if not verify:
        return probe(image_source, max_pixels)
    with open_image(image_source, max_pixels) as image:
        return to_rgb(image).size


def index_dataset(source: Any, config: Any, caption_cache: ArrayCacheSource | None = None) -> DatasetIndex:
    """Find every record's bucket: from image headers (threads) or, for a cache source, from the
    stored array shapes. Records that fail are listed in `skipped` with their reason."""
    skipped = list(getattr(source, "listing_errors", []))
    n = len(source)
    listed = n + len(skipped)
    record_bucket = np.full(n, -1, np.int32)
    if isinstance(source, ArrayCacheSource):
        names: dict[str, int] = {}
        for i, shapes in enumerate(source.shapes):
            name = ",".join(f"{k}={'x'.join(map(str, s))}" for k, s in sorted(shapes.items()))
            record_bucket[i] = names.setdefault(name, len(names))
        return DatasetIndex(record_bucket, list(names), [None] * len(names), skipped, listed)

    buckets = buckets_from_config(config)
    for i, result in enumerate(_probe_cached(source, config, caption_cache)):
        if isinstance(result, str):
            skipped.append({"path": _record_location(source[i]), "reason": result})
        else:
            record_bucket[i] = nearest_bucket(buckets, *result)
    return DatasetIndex(record_bucket, [bucket_name(b) for b in buckets], list(buckets), skipped, listed)


def _probe_all(source: Any, config: Any, caption_cache: ArrayCacheSource | None) -> list[tuple[int, int] | str]:
    """Each record's oriented (width, height), or the reason it cannot be used; header reads in threads."""

    def check(i: int) -> tuple[int, int] | str:
        record = source[i]
        if caption_cache is not None and record["key"] not in caption_cache:
            return f"key {record['key']!r} not in caption cache {caption_cache.directory}"
        try:
            return _check_image(record, config.max_image_pixels, config.verify)
        except BadRecord as error:
            return str(error)

    with concurrent.futures.ThreadPoolExecutor(max(1, config.index_threads)) as pool:
        return list(pool.map(check, range(len(source))))


def _probe_cached(source: Any, config: Any, caption_cache: ArrayCacheSource | None) -> list[tuple[int, int] | str]:
    """`_probe_all`, reusing `config.index_cache` (a JSON file) when it was written for the same
    records and settings: restarts of a large run skip re-reading every image header."""
    if not config.index_cache:
        return _probe_all(source, config, caption_cache)
    identity = {
        "source": source.identity(), "records": len(source), "max_image_pixels": config.max_image_pixels,
        "verify": config.verify,
        "caption_cache": None if caption_cache is None else [caption_cache.fingerprint, len(caption_cache)],
    }
    path = Path(config.index_cache)
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("identity") == identity:
            return [tuple(r) if isinstance(r, list) else r for r in stored["results"]]
        log.warning("index cache %s was written for other records or settings; indexing again", path)
    results = _probe_all(source, config, caption_cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"identity": identity, "results": results}))
    os.replace(tmp, path)
    return results


# ----------------------------------------------------------------------------------------------
# Plan


class BatchPlan:
    """Random-access plan of this process's share of every global batch, over all epochs.

    `plan[step]` -> {"epoch", "step", "bucket", "indices" (local record indices), "valid",
    "slots" (the records' positions in the global batch)}. Pure in (seed, epoch, step).
    """

    def __init__(self, record_bucket: np.ndarray, *, global_batch_size: int, process_index: int,
                 process_count: int, seed: int, shuffle: bool, remainder: str, num_epochs: int | None):
        if global_batch_size % process_count:
            raise ConfigError(f"global_batch_size {global_batch_size} is not divisible by {process_count} processes")
        if remainder not in ("pad", "drop"):
            raise ConfigError(f"data.remainder must be 'pad' or 'drop', got {remainder!r}")
        self.record_bucket = np.asarray(record_bucket, np.int32)
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index, self.process_count = process_index, process_count
        self.seed, self.shuffle, self.remainder, self.num_epochs = seed, shuffle, remainder, num_epochs
        counts = np.bincount(self.record_bucket[self.record_bucket >= 0])
        per_bucket = -(-counts // global_batch_size) if remainder == "pad" else counts // global_batch_size
        self.batches_per_epoch = int(per_bucket.sum())
        self._epoch_cache: tuple[int, list[tuple[int, np.ndarray, np.ndarray]]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_epoch_cache": None}

    def __len__(self) -> int:
        return sys.maxsize if self.num_epochs is None else self.batches_per_epoch * self.num_epochs

    def epoch_batches(self, epoch: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Global batches of `epoch` as (bucket, record indices (G,), valid (G,))."""
        cached = self._epoch_cache
        if cached is not None and cached[0] == epoch:
            return cached[1]
        rng = np.random.default_rng([self.seed, epoch])
        order = np.flatnonzero(self.record_bucket >= 0)
        if self.shuffle:
            order = rng.permutation(order)
        size = self.global_batch_size
        batches = []
        grouped = order[np.argsort(self.record_bucket[order], kind="stable")]  # shuffled within buckets
        buckets, starts = np.unique(self.record_bucket[grouped], return_index=True)
        for bucket, members in zip(buckets, np.split(grouped, starts[1:])):
            full = len(members) // size * size
            for start in range(0, full, size):
                batches.append((int(bucket), members[start : start + size], np.ones(size, bool)))
            rest = members[full:]
            if len(rest) and self.remainder == "pad":
                padded = np.resize(members, full + size)[full:]  # the rest, then repeats from the start
                batches.append((int(bucket), padded, np.arange(size) < len(rest)))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._epoch_cache = (epoch, batches)
        return batches

    def __getitem__(self, step: int) -> dict[str, Any]:
        if not 0 <= step < len(self):
            raise IndexError(f"step {step} out of range for a plan of {len(self)} batches")
        epoch, within = divmod(step, self.batches_per_epoch)
        bucket, indices, valid = self.epoch_batches(epoch)[within]
        lo = self.process_index * self.local_batch_size
        sl = slice(lo, lo + self.local_batch_size)
        return {"epoch": epoch, "step": step, "bucket": bucket, "indices": indices[sl], "valid": valid[sl],
                "slots": np.arange(lo, lo + self.local_batch_size)}


# ----------------------------------------------------------------------------------------------
# Load


class BatchLoader:
    """Maps a plan element to a batch dict; picklable, so Grain workers can run it. With
    `shared_memory` (set when it runs in worker processes) images are written into a new shared
    memory block (zero-filled, like np.zeros) that Grain passes to the main process without a copy."""

    def __init__(self, source: Any, caption_cache: ArrayCacheSource | None, bucket_sizes: Sequence[Bucket | None],
                 *, seed: int, max_image_pixels: int, random_crop: bool, flip: bool, shared_memory: bool = False):
        self.source, self.caption_cache = source, caption_cache
        self.shared_memory = shared_memory
        self.bucket_sizes = list(bucket_sizes)
        self.seed, self.max_image_pixels = seed, max_image_pixels
        self.random_crop, self.flip = random_crop, flip

    def _image(self, record: Mapping[str, Any], bucket: Bucket, rng: np.random.Generator, out: np.ndarray) -> None:
        offset = (float(rng.random()), float(rng.random())) if self.random_crop else (0.5, 0.5)
        flip = bool(rng.random() < 0.5) if self.flip else False
        image_source = record["path"] if "path" in record else record["data"]
        load_image(image_source, bucket, max_pixels=self.max_image_pixels, offset=offset, flip=flip, out=out)

    def __call__(self, element: Mapping[str, Any]) -> dict[str, Any]:
        bucket = self.bucket_sizes[element["bucket"]]
        size = len(element["indices"])
        images = None
        if bucket is not None:
            shape = (size, bucket[1], bucket[0], 3)
            # in a worker process, decode straight into shared memory: Grain hands it over uncopied
            if self.shared_memory:
                images = grain.multiprocessing.SharedMemoryArray(shape, np.float32)
            else:
                images = np.zeros(shape, np.float32)
        rows: list[dict[str, Any] | None] = []
        errors = []
        for i, (index, slot, planned) in enumerate(zip(element["indices"], element["slots"], element["valid"])):
            if not planned:  # padding of a bucket's last batch: filled in below, never decoded
                rows.append(None)
                continue
            record = self.source[int(index)]
            if images is None:  # a cache source: its arrays are the example
                row = dict(record)
                caption = row.pop("caption", None)
                row["caption"] = str(caption) if caption is not None else ""
                rows.append(row)
                continue
            rng = np.random.default_rng([self.seed, element["epoch"], element["step"], int(slot)])
            try:
                self._image(record, bucket, rng, out=images[i])
            except BadRecord as error:
                errors.append({"path": _record_location(record), "reason": str(error)})
                images[i] = 0.0
                rows.append(None)
                continue
            row = {"caption": record["caption"], "key": record["key"]}
            if self.caption_cache is not None:
                row.update({k: v for k, v in self.caption_cache.get(record["key"]).items() if k != "key"})
            rows.append(row)
        valid = np.array(element["valid"], bool)
        good = next((i for i, row in enumerate(rows) if row is not None), None)
        if good is None:  # every record of the batch failed to decode: a blank, all-invalid batch
            blank = {"caption": "", "key": ""}
            if self.caption_cache is not None:
                cached = self.caption_cache.get(self.source[int(element["indices"][0])]["key"])
                blank.update({k: np.zeros_like(v) for k, v in cached.items() if k != "key"})
        for i, row in enumerate(rows):
            if row is None:
                valid[i] = False
                rows[i] = blank if good is None else rows[good]
        batch: dict[str, Any] = {} if images is None else {"image": images}
        for name in rows[0]:
            values = [row[name] for row in rows]
            batch[name] = np.array(values, dtype=object) if name in ("caption", "key") else np.stack(values)
        batch["valid"] = valid
        batch["_errors"] = errors
        return batch


# ----------------------------------------------------------------------------------------------
# Pipeline


class Pipeline:
    """Iterable over this process's batches; `get_state()` / `set_state()` give exact resume.

    Attributes:
      stats: {"records", "readable", "skipped": [{"path", "reason"}], "buckets": {name: count}};
        records that fail to decode during iteration are added to "skipped" as they are met.
      plan: the `BatchPlan` (batches_per_epoch, local_batch_size, ...).
      index: the `DatasetIndex`.
    """

    def __init__(self, dataset: grain.IterDataset, plan: BatchPlan, index: DatasetIndex):
        self._dataset, self.plan, self.index = dataset, plan, index
        self._iterator: grain.DatasetIterator | None = None
        self._seen_errors = {(e["path"], e["reason"]) for e in index.skipped}
        self.stats: dict[str, Any] = {
            "records": index.listed,
            "readable": index.readable,
            "skipped": list(index.skipped),
            "buckets": index.histogram(),
        }

    def _iter(self) -> grain.DatasetIterator:
        if self._iterator is None:
            self._iterator = iter(self._dataset)
        return self._iterator

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        batch = next(self._iter())
        for error in batch.pop("_errors"):
            if (error["path"], error["reason"]) not in self._seen_errors:
                self._seen_errors.add((error["path"], error["reason"]))
                self.stats["skipped"].append(error)
                log.warning("skipping %s: %s", error["path"], error["reason"])
        return batch

    def _fingerprint(self) -> dict[str, Any]:
        plan = self.plan
        return {"seed": plan.seed, "readable": self.index.readable, "batches_per_epoch": plan.batches_per_epoch,
                "global_batch_size": plan.global_batch_size, "process_count": plan.process_count}

    def get_state(self) -> dict[str, Any]:
        """A JSON-serialisable position: restoring it continues with exactly the next batch."""
        return {"version": _STATE_VERSION, "plan": self._fingerprint(), "iterator": self._iter().get_state()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continue from a `get_state()` taken on a pipeline of the same data, seed and batch size."""
        if state.get("version") != _STATE_VERSION:
            raise ConfigError(f"data iterator state version {state.get('version')!r}, expected {_STATE_VERSION}")
        if dict(state["plan"]) != self._fingerprint():
            raise ConfigError(
                f"data iterator state was saved for {dict(state['plan'])}, this pipeline is {self._fingerprint()}: "
                "the dataset, seed or batch size changed"
            )
        self._iter().set_state(state["iterator"])

    def close(self) -> None:
        """Stop worker processes, if any."""
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None


def make_pipeline(config: ml_collections.ConfigDict, *, seed: int, process_index: int | None = None,
                  process_count: int | None = None) -> Pipeline:
    """Build the pipeline for `config` (see `default_data_config`) on this process.

    process_index / process_count default to jax.process_index() / jax.process_count().
    Raises ValueError when nothing is readable, naming the first reasons.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    source = open_source(config)
    caption_cache = None
    if config.caption_cache:
        caption_cache = open_cache(config.caption_cache, config.caption_cache_fingerprint or None)
    index = index_dataset(source, config, caption_cache)
    where = config.path or f"tfds:{config.tfds.name}/{config.tfds.split}"
    if index.readable == 0:
        reasons = "; ".join(f"{e['path']}: {e['reason']}" for e in index.skipped[:5])
        raise ConfigError(
            f"no readable records in {where} ({index.listed} listed). First problems: {reasons or 'none listed'}")
    plan = BatchPlan(index.record_bucket, global_batch_size=config.global_batch_size, process_index=process_index,
                     process_count=process_count, seed=seed, shuffle=config.shuffle, remainder=config.remainder,
                     num_epochs=config.num_epochs)
    if plan.batches_per_epoch == 0:
        raise ConfigError(
            f"{where}: no bucket holds global_batch_size={config.global_batch_size} images and remainder='drop' "
            f"(buckets: {index.histogram()}); use remainder='pad' or a smaller batch"
        )
    loader = BatchLoader(source, caption_cache, index.bucket_sizes, seed=seed, max_image_pixels=config.max_image_pixels,
                         random_crop=config.random_crop, flip=config.flip, shared_memory=config.worker_count > 0)
    dataset = grain.MapDataset.source(plan).map(loader).to_iter_dataset(
        grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.read_buffer_size)
    )
    if config.worker_count > 0:
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size))
    return Pipeline(dataset, plan, index)
