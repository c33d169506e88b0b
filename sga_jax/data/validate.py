"""Checking a dataset before a long run: every record listed, decoded (or its header read) and
sorted into its aspect-ratio bucket; what cannot be read is listed with its reason."""

from __future__ import annotations

import ml_collections

from sga_jax.data.cache import open_cache
from sga_jax.data.pipeline import index_dataset
from sga_jax.data.sources import open_source


def with_dataset(config: ml_collections.ConfigDict, dataset: str) -> ml_collections.ConfigDict:
    """A copy of data config `config` reading `dataset`: a folder, or tfds:NAME[/SPLIT]."""
    config = config.copy_and_resolve_references()
    if dataset.startswith("tfds:"):
        name, _, split = dataset[len("tfds:"):].partition("/")
        config.source, config.tfds.name = "tfds", name
        config.tfds.split = split or config.tfds.split
    else:
        config.path = dataset
        if config.source == "tfds":
            config.source = "auto"
    return config


def validate(config: ml_collections.ConfigDict, *, quick: bool = False) -> dict:
    """{"records", "readable", "skipped": [{"path", "reason"}], "buckets": {"WxH": count}} of the
    dataset of data config `config`; `quick` reads image headers only instead of decoding."""
    config = config.copy_and_resolve_references()
    config.verify = not quick
    caption_cache = None
    if config.caption_cache:
        caption_cache = open_cache(config.caption_cache, config.caption_cache_fingerprint or None)
    index = index_dataset(open_source(config), config, caption_cache)
    return {"records": index.listed, "readable": index.readable, "skipped": index.skipped, "buckets": index.histogram()}


def format_report(report: dict, where: str) -> str:
    """The text report of `validate`'s result for dataset `where`."""
    lines = [f"{where}: {report['records']} records, {report['readable']} readable, {len(report['skipped'])} skipped"]
    lines += [f"  skipped {entry['path']}: {entry['reason']}" for entry in report["skipped"]]
    if report["buckets"]:
        width = max(len(name) for name in report["buckets"])
        lines.append("buckets:")
        lines += [f"  {name:>{width}}  {count}" for name, count in report["buckets"].items()]
    return "\n".join(lines)
