"""Restart-to-first-step of the demo config (`make demo`'s stage-2 run on this CPU) with and
without the persistent compilation cache.

Each trial is two processes of `python -m sga_jax.train --config configs/demo.py` in a fresh work
directory: a first start that trains one step and saves it, and a restart that resumes from that
checkpoint and trains one more. The demo's images come in several aspect buckets, and a step of
a bucket no earlier start compiled is compiled on restart, cache or not (`python -m sga_jax.plan
--warm_cache` compiles them all ahead); the trials therefore use one bucket (BUCKET) so that the
restart's step is one the first start compiled, as it is for a run that has seen its buckets.
Time to first step = from launching the process to the first step's line in metrics.jsonl (its
modification time). With the cache on (the default) the first
start compiles and writes WORKDIR/compilation_cache and the restart loads from it; with
`--config.compilation_cache.enabled=False` both compile.

python bench/compile_cache.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import markdown_table, write_section  # noqa: E402


BUCKET = "512x384"


def start(workdir: Path, steps: int, cache: bool, assets: Path) -> float:
    """Seconds from launching one training process to its first logged step."""
    cmd = [sys.executable, "-m", "sga_jax.train", "--config", "configs/demo.py", "--workdir", str(workdir),
           f"--config.total_steps={steps}", "--config.checkpoint_every=1", "--config.log_every=1",
           "--config.sample_every=0", "--config.logging.progress_bar=False", f"--config.data.buckets.fixed={BUCKET}",
           f"--config.compilation_cache.enabled={cache}"]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    env.update(SGA_DEMO_ASSETS=str(assets), JAX_PLATFORMS="cpu")
    launched = time.time()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return (workdir / "metrics.jsonl").stat().st_mtime - launched


def trial(cache: bool, assets: Path) -> tuple[float, float]:
    """(first start, restart) times to first step in a fresh work directory."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "run"
        first = start(workdir, 1, cache, assets)
        again = start(workdir, 2, cache, assets)
        if cache:
            assert any((workdir / "compilation_cache").iterdir()), "the cache was not written"
        return first, again


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="trials per setting")
    args = parser.parse_args()
    assets = Path(tempfile.mkdtemp(prefix="demo_assets_"))
    try:
        times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for repeat in range(args.repeats):
            for cache in ((True, False) if repeat % 2 == 0 else (False, True)):  # alternate: load drifts
                times[cache].append(trial(cache, assets))
                print(f"cache={cache}: first start {times[cache][-1][0]:.1f} s, restart {times[cache][-1][1]:.1f} s",
                      flush=True)
    finally:
        shutil.rmtree(assets, ignore_errors=True)
    med = {cache: (statistics.median(t[0] for t in runs), statistics.median(t[1] for t in runs))
           for cache, runs in times.items()}
    rows = [{"compilation cache": "off (compiles every start)", "first start (s)": med[False][0],
             "restart (s)": med[False][1]},
            {"compilation cache": "on (default)", "first start (s)": med[True][0], "restart (s)": med[True][1]}]
    restart_speedup = med[False][1] / med[True][1]
    second_vs_first = med[True][0] / med[True][1]
    body = (
        "Time from launching `python -m sga_jax.train --config configs/demo.py` (one CPU device, as `make demo`; "
        f"one aspect bucket, {BUCKET}) to its first step in metrics.jsonl: a first start in an empty work "
        "directory, then a restart that resumes from its checkpoint; median of "
        f"{args.repeats} trial(s) per setting, settings alternated.\n\n"
        f"{markdown_table(rows)}\n\n"
        f"With the cache the restart reaches its first step **{second_vs_first:.2f}x** sooner than the first start, "
        f"and **{restart_speedup:.2f}x** sooner than a restart without the cache (goal: >= 2x). The first start "
        f"with the cache took {med[True][0] / med[False][0]:.2f}x as long as without: it also serialises and writes "
        "every executable it compiles, and the trials share the CPU with other jobs (their spread is in "
        "docs/bench/compile_cache.json), so this ratio is the least certain. What is left is "
        "start-up that no cache removes: importing JAX / Flax / transformers, building the demo's tokenizers and "
        "data index, restoring the checkpoint, tracing the step (the cache skips XLA's compile, not JAX's trace) "
        "and loading the executables."
    )
    write_section("compile_cache", "Persistent compilation cache: restart to first step (demo config, CPU)", body,
                  {"median_s": {"cache_off": med[False], "cache_on": med[True]}, "trials": {str(k): v for k, v in times.items()},
                   "restart_speedup": restart_speedup, "second_vs_first": second_vs_first})


if __name__ == "__main__":
    main()
