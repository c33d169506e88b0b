"""python -m sga_jax.data DATASET [--config configs/X.py] [--data.a.b=v ...] [--quick] [--json]

Validates a dataset before a long run: lists its records, decodes every image (header only with
--quick) and prints the records found, readable, skipped (path and reason each) and the histogram of
aspect-ratio buckets. DATASET is a folder (metadata.jsonl, images with .txt captions, or an array
cache) or tfds:NAME[/SPLIT]. Buckets and limits come from the data config: `--config` takes a
training config's `data` field, otherwise `default_data_config()` with `--data.*` overrides.
--json prints one JSON object with the keys records, readable, skipped and buckets.
Exit status 0 when something is readable, 1 when nothing is, 2 for an error.

Examples:
  python -m sga_jax.data my_images/ --quick
  python -m sga_jax.data my_images/ --config configs/flux_sga.py:sam2 --json
  python -m sga_jax.data tfds:imagenette/full-size-v2/train --data.buckets.max_long_edge=1024
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import flags
from ml_collections import config_flags

from sga_jax import cli
from sga_jax.data.pipeline import default_data_config
from sga_jax.data.validate import format_report, validate, with_dataset

def define_flags() -> flags.FlagValues:
    """The command's flags (defined afresh for every run)."""
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "A training config file whose `data` field is used.",
                                    flag_values=flag_values)
    config_flags.DEFINE_config_dict("data", default_data_config(), "The data config (without --config).",
                                    flag_values=flag_values)
    flags.DEFINE_bool("json", False, "Print one JSON object instead of a report.", flag_values=flag_values)
    flags.DEFINE_bool("quick", False, "Read image headers only instead of decoding every image.",
                      flag_values=flag_values)
    return flag_values


def _main(flag_values: flags.FlagValues, args: list[str]) -> int:
    base = flag_values.config.data if flag_values.config is not None else flag_values.data
    report = validate(with_dataset(base, args[0]), quick=flag_values.quick)
    print(json.dumps(report) if flag_values.json else format_report(report, args[0]), flush=True)
    return 0 if report["readable"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    return cli.run_with_flags(_main, argv, define=define_flags, doc=__doc__, configs=("config", "data"),
                              positional="DATASET")


if __name__ == "__main__":
    sys.exit(main())
