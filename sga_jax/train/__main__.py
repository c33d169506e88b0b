"""python -m sga_jax.train --config configs/X.py[:arg] --workdir DIR [--config.a.b=v ...] [--dry_run]

Trains (or resumes) the run in DIR. --dry_run validates the config, builds the mesh and the
abstract sharded state, prints the per-device memory estimate and exits without compiling.
Exit status: 0 when done or stopped by SIGTERM/SIGINT after saving; 1 when training diverged
(NaN guard); 2 for a config that cannot run.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from sga_jax import parallel

if TYPE_CHECKING:
    from sga_jax.train.loop import Run

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/X.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory: checkpoints, metrics, TensorBoard, samples.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Validate the config and print the memory estimate; do not train.")


def dry_run_report(run: Run) -> str:
    """Mesh, parameter count and per-device memory of a run, as printed by --dry_run."""
    from sga_jax.train.loop import describe_memory
    from sga_jax.train.state import memory_estimate

    params = run.setup.abstract_state.params
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    lines = [
        f"task {run.config.task}: {count:,} trainable parameters",
        f"mesh {dict(run.mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
        f"{jax.process_count()} process(es)",
        "memory per device (parameters, optimizer state, EMA, frozen incl. a LoRA's base; activations not included):",
        describe_memory(memory_estimate(run.setup)),
    ]
    return "\n".join(lines)


def _main(argv: Sequence[str]) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save step at INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    engine_log = logging.getLogger("sga_jax")
    engine_log.addHandler(handler)
    engine_log.setLevel(logging.INFO)
    engine_log.propagate = False
    parallel.initialize_distributed()
    from sga_jax.train.loop import TrainingDiverged, build_run, train

    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required")
    if not _DRY_RUN.value and not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    try:
        run = build_run(config)
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if _DRY_RUN.value:
        print(dry_run_report(run), flush=True)
        return
    try:
        result = train(config, _WORKDIR.value, run=run)
    except TrainingDiverged as e:
        print(f"training diverged: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    state = "stopped by signal" if result.preempted else "finished"
    print(f"{state} at step {result.step}; loss {result.last_metrics.get('loss', float('nan')):.6g}", flush=True)


def main() -> None:
    """Entry point of `python -m sga_jax.train` and the `sga-train` console script."""
    app.run(_main)


if __name__ == "__main__":
    main()
