"""python -m sga_jax.train --config configs/X.py[:arg] --workdir DIR [--config.a.b=v ...] [--dry_run]

Trains (or resumes) the run in DIR. --dry_run validates the config, builds the mesh and the
abstract sharded state, prints the state's per-device memory and exits without compiling
(`python -m sga_jax.plan` compiles the step for a target and adds activations and the peak).
Weight paths in the config (config.model.*.weights, config.text.root, ...) may be hub ids.
Exit status: 0 when done or stopped by SIGTERM/SIGINT after saving; 1 when training diverged
(NaN guard); 2 for a config that cannot run, a bad path or checkpoint, or bad arguments
(one `error:` line; --debug adds the traceback); 130 for a second Ctrl-C.

Examples:
  python -m sga_jax.train --config configs/demo.py --workdir out/demo
  python -m sga_jax.train --config configs/flux_sga.py:sam2 --workdir runs/sga_sam2 \\
      --config.model.flux.weights=black-forest-labs/FLUX.1-dev \\
      --config.model.vae.weights=black-forest-labs/FLUX.1-dev \\
      --config.model.prior.weights=ckpt/sam2 --config.text.root=black-forest-labs/FLUX.1-dev \\
      --config.data.path=my_images/ --config.model.attention=cudnn
  python -m sga_jax.train --config configs/flux_sga.py:dinov2 --dry_run --config.mesh.fsdp=-1
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from sga_jax import cli, parallel
from sga_jax.errors import UsageError


def define_flags() -> flags.FlagValues:
    """The command's flags (defined afresh for every run)."""
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Training config file (configs/X.py[:arg]).", lock_config=True,
                                    flag_values=flag_values)
    flags.DEFINE_string("workdir", None, "Work directory: checkpoints, metrics, TensorBoard, samples.",
                        flag_values=flag_values)
    flags.DEFINE_bool("dry_run", False, "Validate the config and print the memory estimate; do not train.",
                      flag_values=flag_values)
    flags.mark_flag_as_required("config", flag_values=flag_values)
    return flag_values


def _main(flag_values: flags.FlagValues, args: list[str]) -> int:
    config, workdir, dry_run = flag_values.config, flag_values.workdir, flag_values.dry_run
    if not dry_run and not workdir:
        raise UsageError("--workdir is required (or --dry_run); see --help")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save step at INFO
    cli.log_to_stderr()
    parallel.initialize_distributed()
    from sga_jax.train.loop import TrainingDiverged, build_run, dry_run_report, train

    run = build_run(config)
    if dry_run:
        print(dry_run_report(run, config_flags.get_config_filename(flag_values["config"])), flush=True)
        return 0
    try:
        result = train(config, workdir, run=run)
    except TrainingDiverged as error:
        print(cli.error_message(error).replace("error: ", "error: training diverged: ", 1), file=sys.stderr, flush=True)
        return 1
    state = "stopped by signal" if result.preempted else "finished"
    print(f"{state} at step {result.step}; loss {result.last_metrics.get('loss', float('nan')):.6g}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m sga_jax.train` and the `sga-train` console script; returns the exit status."""
    return cli.run_with_flags(_main, argv, define=define_flags, doc=__doc__, configs=("config",))


if __name__ == "__main__":
    sys.exit(main())
