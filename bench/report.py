"""Shared by every bench script: machine description, timing with medians, and writing one section
of docs/benchmarks.md (each script owns the section between its markers) plus a JSON record."""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import platform
import re
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
JSON_DIR = ROOT / "docs" / "bench"

HEADER = """# Benchmarks

Each section is written by the script named in it (`python bench/NAME.py`), with the machine and
date it ran on. CPU numbers on the 2-core development machine are noisy: every time is the median
of several repeats, and comparisons are given as ratios measured side by side in one run.
"""


def machine() -> str:
    """One line naming the CPU, core count, memory and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = []
    for name in ("jax", "flax", "torch"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            pass
    return f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB; " + ", ".join(versions)


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds; `fn` must block until its result is ready."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(runs: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Warm every run up (and compile), then time `repeats` rounds of all of them in turn, so that
    the shared CPU's load changes hit them alike: (times, medians) by name."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times, {name: statistics.median(t) for name, t in times.items()}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB.

    Linux's VmHWM when available: `ru_maxrss` survives `exec`, so a subprocess would report its
    parent's peak if the parent was bigger. Elsewhere ru_maxrss (KiB on Linux, bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 1024


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows of equal keys -> a markdown table."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_section(name: str, title: str, body: str, record: dict[str, Any], *, command: str | None = None) -> None:
    """Replace (or append) section `name` of docs/benchmarks.md and write docs/bench/NAME.json.

    `command` is what produced it (default `python bench/NAME.py`), for a script with several sections."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = command or f"python bench/{name}.py"
    section = (
        f"<!-- bench:{name} -->\n## {title}\n\n`{command}` on {stamp}; {machine()}.\n\n"
        f"{body.strip()}\n<!-- /bench:{name} -->"
    )
    DOC.parent.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    with open(DOC.with_suffix(".lock"), "w") as lock:  # bench scripts may finish at the same time
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = DOC.read_text() if DOC.exists() else HEADER
        text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
        DOC.write_text(text)
    JSON_DIR.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine(), "date": stamp, **record}
    (JSON_DIR / f"{name}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote section '{name}' of {DOC.relative_to(ROOT)}")
