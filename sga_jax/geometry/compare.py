"""The feature-drift report of several training runs side by side
(`python -m sga_jax.geometry compare RUN_DIR [RUN_DIR ...] --out DIR`).

Reads each run's metrics.jsonl (the probe's `eval_*` curves, `sga_jax.stages.probe.METRICS`) and
config.json (for the labels: alignment method, tapped layer, weight, prior, and whether any
pre-trained weights were loaded), and writes DIR/report.md with a final-values table and two PNG
plots: drift.png (how far the features move from the pre-trained model) and prior.png (how close
their spatial structure comes to the prior's). docs/geometry.md explains every curve.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import matplotlib
import numpy as np

from sga_jax.errors import ConfigError
from sga_jax.stages.probe import IMAGE_METRICS, METRICS
from sga_jax.train.plots import read_metrics

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

ALL_METRICS = {**METRICS, **IMAGE_METRICS}
FIGURES = {
    "drift.png": ("Feature drift from the pre-trained model", ("drift_coord", "drift_unit", "drift_orbit",
                                                               "drift_structure", "drift_angle", "drift_output",
                                                               "output_psnr")),
    "prior.png": ("Toward the prior's spatial structure", ("prior_gram", "prior_eig_gap", "prior_angle")),
}
FINAL_COLUMNS = ("drift_coord", "drift_orbit", "drift_structure", "drift_unit", "drift_angle", "prior_gram",
                 "prior_eig_gap", "prior_angle", "drift_output", "output_psnr")


@dataclasses.dataclass
class RunCurves:
    """One run's probe curves: {metric: (steps, values)} and what its config says about it."""

    directory: Path
    label: str
    settings: dict[str, str]
    curves: dict[str, tuple[np.ndarray, np.ndarray]]

    def final(self, name: str) -> tuple[int, float] | None:
        """(step, value) of the metric's last evaluation, None when the run does not log it."""
        if name not in self.curves:
            return None
        steps, values = self.curves[name]
        return int(steps[-1]), float(values[-1])


def _settings(config: dict) -> dict[str, str]:
    """The labels of a run from its resolved config (stages without some field show '-')."""
    align = config.get("align", {})
    method = align.get("method", config.get("task", "-"))
    method = "vanilla" if method == "none" else str(method)
    models = config.get("model", {})
    loaded = sorted(name for name, part in models.items() if isinstance(part, dict) and part.get("weights"))
    return {
        "method": method,
        "layer": str(align.get("block", "-")),
        "weight": "-" if method == "vanilla" else str(align.get("weight", "-")),
        "prior": str(models.get("prior", {}).get("kind", "-")),
        "steps": str(config.get("total_steps", "-")),
        "pre-trained weights": ", ".join(loaded) if loaded else "none (random init)",
    }


def read_run(directory: str | Path) -> RunCurves:
    """A run's probe curves from DIRECTORY/metrics.jsonl and labels from DIRECTORY/config.json;
    a ConfigError naming the file when there is nothing to compare."""
    directory = Path(directory)
    path = directory / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path} not found: {directory} is not a training work directory")
    rows = read_metrics(path)
    curves = {}
    for name in ALL_METRICS:
        points = [(r["step"], r[f"eval_{name}"]) for r in rows if r.get(f"eval_{name}") is not None]
        if points:
            steps, values = zip(*points)
            curves[name] = (np.asarray(steps, np.int64), np.asarray(values, np.float64))
    if not curves:
        raise ConfigError(f"{path} has no probe records (eval_drift_*): the run did not probe "
                          "(config.probe.enabled with eval_every > 0)")
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    settings = _settings(config)
    label = f"{directory.name} ({settings['method']}"
    label += f", layer {settings['layer']}" if settings["layer"] != "-" else ""
    label += f", weight {settings['weight']})" if settings["weight"] != "-" else ")"
    return RunCurves(directory, label, settings, curves)


def _plot(runs: list[RunCurves], title: str, names: tuple[str, ...], path: Path) -> bool:
    """One panel per metric any run logs, one line per run; False when no run logs any of them."""
    names = tuple(n for n in names if any(n in run.curves for run in runs))
    if not names:
        return False
    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for run in runs:
            if name in run.curves:
                ax.plot(*run.curves[name], marker=".", label=run.label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return f"{value:.4g}" if np.isfinite(value) else str(value)


def final_values(runs: list[RunCurves]) -> str:
    """Markdown table of each run's last evaluation of every probe metric."""
    columns = [n for n in FINAL_COLUMNS if any(n in run.curves for run in runs)]
    rows = []
    for run in runs:
        finals = {name: run.final(name) for name in columns}
        step = max((f[0] for f in finals.values() if f is not None), default=0)
        rows.append([run.label, str(step)] + [_fmt(f[1]) if f is not None else "-" for f in finals.values()])
    return _table(["run", "step"] + columns, rows)


def build_report(run_dirs: list[str | Path], out: str | Path, *, note: str = "") -> Path:
    """Write OUT/report.md, OUT/drift.png and OUT/prior.png for the runs; returns the report's path."""
    runs = [read_run(d) for d in run_dirs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = [(title, name) for name, (title, metrics) in FIGURES.items() if _plot(runs, title, metrics, out / name)]
    random = [run.label for run in runs if run.settings["pre-trained weights"].startswith("none")]
    keys = list(runs[0].settings)
    lines = [f"# Feature drift of {len(runs)} run{'s' if len(runs) > 1 else ''}", ""]
    if note:
        lines += [f"**{note}**", ""]
    if random:
        lines += [f"Started from random weights (no pre-trained model to drift from): {', '.join(random)}. "
                  "Their curves show the probe's machinery, not the paper's result.", ""]
    lines += [
        "Written by `python -m sga_jax.geometry compare`. The probe (`sga_jax.stages.probe`) compares the tapped "
        "features X_t of each evaluation with the pre-trained model's X_0 and the prior's Y on one fixed batch; "
        "docs/geometry.md explains each curve and the proposition it tests.", "",
        "## Runs", "",
        _table(["run", "directory"] + keys, [[run.label, str(run.directory)] + [run.settings[k] for k in keys]
                                             for run in runs]), "",
        "## Final values (last evaluation)", "",
        final_values(runs), "",
        "## Curves", "",
    ]
    lines += [f"![{title}]({name})" for title, name in figures]
    lines += ["", "## What each curve measures", ""]
    lines += [f"- `{name}`: {meaning}" for name, meaning in ALL_METRICS.items()
              if any(name in run.curves for run in runs)]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
