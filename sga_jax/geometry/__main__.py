"""python -m sga_jax.geometry --out DIR [--grid G] [--channels C] [--steps S] [--pairs P] [--seed N]
python -m sga_jax.geometry compare RUN_DIR [RUN_DIR ...] --out DIR [--note TEXT]

The synthetic report on the geometry of the SGA loss: the paper's Propositions 1-3 checked
numerically (see `sga_jax.geometry.synthetic`), written as DIR/report.md with its plots.
`compare`: the feature-drift curves of training runs (their `config.probe` records in
metrics.jsonl) side by side, with the table of final drifts (see `sga_jax.geometry.compare`).

Examples:
  python -m sga_jax.geometry --out out/geometry
  python -m sga_jax.geometry --out out/geometry_big --grid 16 --channels 64 --steps 400
  python -m sga_jax.geometry compare runs/sga runs/irepa --out out/drift
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from sga_jax import cli
from sga_jax.errors import UsageError
from sga_jax.geometry import compare
from sga_jax.geometry.synthetic import Settings, build_report


def parser() -> cli.ArgumentParser:
    """The synthetic report's arguments."""
    p = cli.ArgumentParser("python -m sga_jax.geometry", __doc__)
    p.add_argument("--out", type=Path, required=True, help="directory for report.md and the plots")
    p.add_argument("--grid", type=int, default=Settings.grid, help="token grid side (N = grid^2)")
    p.add_argument("--channels", type=int, default=Settings.channels, help="feature width C (even)")
    p.add_argument("--steps", type=int, default=Settings.steps, help="gradient-descent steps")
    p.add_argument("--pairs", type=int, default=Settings.pairs, help="pairs in the containment cloud")
    p.add_argument("--seed", type=int, default=Settings.seed, help="random seed")
    return p


def compare_parser() -> cli.ArgumentParser:
    """The `compare` subcommand's arguments."""
    p = cli.ArgumentParser("python -m sga_jax.geometry compare", compare.__doc__)
    p.add_argument("runs", nargs="+", type=Path, help="training work directories (metrics.jsonl, config.json)")
    p.add_argument("--out", type=Path, required=True, help="directory for report.md and the plots")
    p.add_argument("--note", default="", help="a sentence printed in bold at the top of the report")
    return p


def _compare(argv: list[str]) -> int:
    args = compare_parser().parse_args(argv)
    report = compare.build_report(args.runs, args.out, note=args.note)
    print(f"wrote {report} ({len(args.runs)} runs)")
    return 0


def _main(argv: list[str]) -> int:
    if argv[:1] == ["compare"]:
        return _compare(argv[1:])
    args = parser().parse_args(argv)
    if args.grid < 3 or args.channels < 6 or args.channels % 2:
        raise UsageError(f"need --grid >= 3 and an even --channels >= 6, got {args.grid} and {args.channels}")
    settings = Settings(grid=args.grid, channels=args.channels, steps=args.steps, pairs=args.pairs, seed=args.seed)
    report = build_report(args.out, settings)
    print(f"wrote {report} and {len(list(args.out.glob('*.png')))} plots")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: the synthetic report, or `compare` when it is the first argument;
    returns the exit status."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
