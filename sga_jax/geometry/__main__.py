"""python -m sga_jax.geometry --out DIR [--grid G] [--channels C] [--steps S] [--pairs P] [--seed N]

The synthetic report on the geometry of the SGA loss: the paper's Propositions 1-3 checked
numerically (see `sga_jax.geometry.synthetic`), written as DIR/report.md with its plots.

Examples:
  python -m sga_jax.geometry --out out/geometry
  python -m sga_jax.geometry --out out/geometry_big --grid 16 --channels 64 --steps 400
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from sga_jax import cli
from sga_jax.errors import UsageError
from sga_jax.geometry.synthetic import Settings, build_report


def parser() -> cli.ArgumentParser:
    """The command line's arguments."""
    p = cli.ArgumentParser("python -m sga_jax.geometry", __doc__)
    p.add_argument("--out", type=Path, required=True, help="directory for report.md and the plots")
    p.add_argument("--grid", type=int, default=Settings.grid, help="token grid side (N = grid^2)")
    p.add_argument("--channels", type=int, default=Settings.channels, help="feature width C (even)")
    p.add_argument("--steps", type=int, default=Settings.steps, help="gradient-descent steps")
    p.add_argument("--pairs", type=int, default=Settings.pairs, help="pairs in the containment cloud")
    p.add_argument("--seed", type=int, default=Settings.seed, help="random seed")
    return p


def _main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.grid < 3 or args.channels < 6 or args.channels % 2:
        raise UsageError(f"need --grid >= 3 and an even --channels >= 6, got {args.grid} and {args.channels}")
    settings = Settings(grid=args.grid, channels=args.channels, steps=args.steps, pairs=args.pairs, seed=args.seed)
    report = build_report(args.out, settings)
    print(f"wrote {report} and {len(list(args.out.glob('*.png')))} plots")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
