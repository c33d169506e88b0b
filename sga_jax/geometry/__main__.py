"""`python -m sga_jax.geometry --out DIR`: the synthetic report on the geometry of the SGA loss
(the paper's Propositions 1-3, checked numerically; see `sga_jax.geometry.synthetic`).

`python -m sga_jax.geometry compare RUN_DIR [RUN_DIR ...] --out DIR`: the feature-drift curves of
training runs side by side (see `sga_jax.geometry.compare`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sga_jax.geometry import compare
from sga_jax.geometry.synthetic import Settings, build_report


def compare_main(argv: list[str]) -> None:
    """`compare`: parse its flags and write the report of the runs."""
    parser = argparse.ArgumentParser(prog="python -m sga_jax.geometry compare",
                                     description=compare.__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="training work directories (metrics.jsonl, config.json)")
    parser.add_argument("--out", type=Path, required=True, help="directory for report.md and the plots")
    parser.add_argument("--note", default="", help="a sentence printed in bold at the top of the report")
    args = parser.parse_args(argv)
    try:
        report = compare.build_report(args.runs, args.out, note=args.note)
    except ValueError as error:
        parser.error(str(error))
    print(f"wrote {report} ({len(args.runs)} runs)")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: the synthetic report, or `compare` when it is the first argument."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compare"]:
        return compare_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m sga_jax.geometry", description=__doc__.split("\n\n")[0],
                                     epilog="python -m sga_jax.geometry compare -h: the runs' feature-drift report")
    parser.add_argument("--out", type=Path, required=True, help="directory for report.md and the plots")
    parser.add_argument("--grid", type=int, default=Settings.grid, help="token grid side (N = grid^2)")
    parser.add_argument("--channels", type=int, default=Settings.channels, help="feature width C (even)")
    parser.add_argument("--steps", type=int, default=Settings.steps, help="gradient-descent steps")
    parser.add_argument("--pairs", type=int, default=Settings.pairs, help="pairs in the containment cloud")
    parser.add_argument("--seed", type=int, default=Settings.seed)
    args = parser.parse_args(argv)
    if args.grid < 3 or args.channels < 6 or args.channels % 2:
        parser.error(f"need --grid >= 3 and an even --channels >= 6, got {args.grid} and {args.channels}")
    settings = Settings(grid=args.grid, channels=args.channels, steps=args.steps, pairs=args.pairs, seed=args.seed)
    report = build_report(args.out, settings)
    print(f"wrote {report} and {len(list(args.out.glob('*.png')))} plots")


if __name__ == "__main__":
    main()
