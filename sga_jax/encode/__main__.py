"""python -m sga_jax.encode --config CONFIG [--config.a.b=v ...]

Encodes a dataset's captions once into a caption cache (ArrayRecord), so that training never runs
T5-XXL and CLIP; a rerun resumes. CONFIG needs `data` (the dataset and `data.caption_cache`, the
directory to write) and `text` (the encoders: `text.root` a Flux.1 folder or hub id), as a
training config has them; see `sga_jax.encode`.

Examples:
  python -m sga_jax.encode --config configs/flux_sga.py --config.data.path=my_images/ \\
      --config.data.caption_cache=cache/captions --config.text.root=FLUX.1-dev
  python -m sga_jax.encode --config configs/flux_sga.py --config.data.path=my_images/ \\
      --config.data.caption_cache=cache/captions --config.text.root=black-forest-labs/FLUX.1-dev
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags
from ml_collections import config_flags

from sga_jax import cli, encode

def define_flags() -> flags.FlagValues:
    """The command's flags (defined afresh for every run)."""
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Config file with `data` and `text` sections.",
                                    flag_values=flag_values)
    flags.mark_flag_as_required("config", flag_values=flag_values)
    return flag_values


def _main(flag_values: flags.FlagValues, args: list[str]) -> int:
    config = flag_values.config
    cli.log_to_stderr()
    fingerprint = encode.run(config)
    print(f"caption cache: {config.data.caption_cache}")
    print(f"fingerprint: {fingerprint}  (set data.caption_cache_fingerprint to check it when training)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    return cli.run_with_flags(_main, argv, define=define_flags, doc=__doc__, configs=("config",))


if __name__ == "__main__":
    sys.exit(main())
