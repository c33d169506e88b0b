"""python -m sga_jax.train.export --workdir RUN --out OUT [--format F] [--step N] [--ema] [--dtype D]

Trained weights back out: reads a training checkpoint of run RUN (the latest, or --step; the EMA
parameters with --ema) and writes what the run's task exports, in one of its formats (stage 2:
Flux in diffusers' layout, loaded by `FluxTransformer2DModel.from_pretrained`, or BFL's
`flux1-dev.safetensors` names). Only those parameters are read from the checkpoint.

Examples:
  python -m sga_jax.train.export --workdir runs/sga_sam2 --out flux_sga --format diffusers
  python -m sga_jax.train.export --workdir runs/sga_sam2 --out flux_sga.safetensors --format bfl --ema \\
      --dtype bfloat16
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from sga_jax import cli
from sga_jax.train.export import export_run


def parser() -> cli.ArgumentParser:
    """The command line's arguments."""
    p = cli.ArgumentParser("python -m sga_jax.train.export", __doc__)
    p.add_argument("--workdir", required=True, help="the run's work directory (config.json, checkpoints/)")
    p.add_argument("--out", required=True, help="output directory (diffusers) or .safetensors file (bfl)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--ema", action="store_true", help="export the EMA parameters")
    p.add_argument("--format", help="one of the task's export formats (default: its first)")
    p.add_argument("--dtype", help="e.g. bfloat16 (default: as trained)")
    return p


def _main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    step = export_run(args.workdir, args.out, step=args.step, ema=args.ema, format=args.format, dtype=args.dtype)
    print(f"exported {args.workdir} step {step} ({args.format or 'default format'}) to {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
