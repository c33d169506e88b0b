"""python -m sga_jax.data DATASET [--config configs/X.py] [--data.a.b=v ...] [--quick] [--json]

Validates a dataset before a long run: lists its records, decodes every image (header only with
--quick) and prints the records found, readable, skipped (path and reason each) and the histogram of
aspect-ratio buckets. DATASET is a folder (metadata.jsonl, images with .txt captions, or an array
cache) or tfds:NAME[/SPLIT]. Buckets and limits come from the data config: `--config` takes a
training config's `data` field, otherwise `default_data_config()` with `--data.*` overrides.
--json prints one JSON object with the keys records, readable, skipped and buckets.
Exit status 0 when something is readable, 1 when nothing is.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import app, flags
from ml_collections import config_flags

from sga_jax.data.cache import open_cache
from sga_jax.data.pipeline import default_data_config, index_dataset
from sga_jax.data.sources import open_source

_CONFIG = config_flags.DEFINE_config_file("config", None, "A training config file whose `data` field is used.")
_DATA = config_flags.DEFINE_config_dict("data", default_data_config(), "The data config (without --config).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of a report.")
_QUICK = flags.DEFINE_bool("quick", False, "Read image headers only instead of decoding every image.")


def validate(config, *, quick: bool = False) -> dict:
    """{"records", "readable", "skipped": [{"path", "reason"}], "buckets": {"WxH": count}} of `config`'s dataset."""
    config = config.copy_and_resolve_references()
    config.verify = not quick
    caption_cache = None
    if config.caption_cache:
        caption_cache = open_cache(config.caption_cache, config.caption_cache_fingerprint or None)
    index = index_dataset(open_source(config), config, caption_cache)
    return {"records": index.listed, "readable": index.readable, "skipped": index.skipped, "buckets": index.histogram()}


def _format(report: dict, where: str) -> str:
    lines = [f"{where}: {report['records']} records, {report['readable']} readable, {len(report['skipped'])} skipped"]
    lines += [f"  skipped {entry['path']}: {entry['reason']}" for entry in report["skipped"]]
    if report["buckets"]:
        width = max(len(name) for name in report["buckets"])
        lines.append("buckets:")
        lines += [f"  {name:>{width}}  {count}" for name, count in report["buckets"].items()]
    return "\n".join(lines)


def _main(argv: Sequence[str]) -> None:
    if len(argv) != 2:
        raise app.UsageError("give exactly one DATASET (a folder or tfds:NAME[/SPLIT])")
    config = _CONFIG.value.data if _CONFIG.value is not None else _DATA.value
    dataset = argv[1]
    with config.unlocked():
        if dataset.startswith("tfds:"):
            name, _, split = dataset[len("tfds:"):].partition("/")
            config.source, config.tfds.name = "tfds", name
            config.tfds.split = split or config.tfds.split
        else:
            config.path = dataset
            if config.source == "tfds":
                config.source = "auto"
    try:
        report = validate(config, quick=_QUICK.value)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(report) if _JSON.value else _format(report, dataset), flush=True)
    sys.exit(0 if report["readable"] else 1)


def main() -> None:
    """Console entry point."""
    app.run(_main)


if __name__ == "__main__":
    main()
