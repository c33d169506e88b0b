"""Trained weights back out: `python -m sga_jax.train.export --workdir RUN --out DIR [--format diffusers]`.

Reads the Flux parameters (the EMA ones with `--ema`) of a training checkpoint of a `flux_sga` run
(the latest, or `--step`), and writes them with `flux.save` in diffusers' layout (loads
in `FluxTransformer2DModel.from_pretrained`) or BFL's (`flux1-dev.safetensors` names). The head is
training-only and is not exported.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from sga_jax.models import flux
from sga_jax.train.checkpoint import Checkpointer
from sga_jax.train.task import get_task


def export_flux(workdir: str | Path, out: str | Path, *, step: int | None = None, ema: bool = False,
                format: str = "diffusers", dtype: str | None = None) -> int:
    """Write the Flux weights of checkpoint `step` (default: latest) of run `workdir`; returns the step.

    Only the Flux parameters are read from the checkpoint (an orbax partial restore), one device's
    worth: the optimizer state and the head are never loaded.
    """
    workdir = Path(workdir)
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    task = get_task(config.task, config)
    networks = getattr(task, "networks", None)
    if networks is None or not hasattr(networks, "flux"):
        raise ValueError(f"{workdir}: task {config.task!r} has no Flux model to export")
    checkpointer = Checkpointer(workdir / "checkpoints")
    step = checkpointer.latest_step() if step is None else step
    checkpointer.close()
    if step is None:
        raise ValueError(f"{workdir / 'checkpoints'}: no finalised checkpoint")
    graphdef, weights = nnx.split(flux.abstract_model(networks.flux), nnx.Param)
    abstract = nnx.to_pure_dict(weights)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    branch = "ema" if ema else "params"
    item = {branch: {"flux": abstract}}
    restore_args = {branch: {"flux": jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), abstract)}}
    path = (workdir / "checkpoints" / str(step) / "state").absolute()
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
    except (KeyError, ValueError) as err:
        hint = " (the run keeps no EMA: optimizer.ema_decay = 0)" if ema else ""
        raise ValueError(f"{path}: cannot read {branch}/flux{hint}: {err}") from err
    nnx.replace_by_pure_dict(weights, restored[branch]["flux"])
    flux.save(nnx.merge(graphdef, weights), out, format=format, dtype=dtype)
    return step


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m sga_jax.train.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True, help="output directory (diffusers) or .safetensors file (bfl)")
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--ema", action="store_true", help="export the EMA parameters")
    parser.add_argument("--format", default="diffusers", choices=flux.FORMATS)
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: as trained)")
    args = parser.parse_args(argv)
    step = export_flux(args.workdir, args.out, step=args.step, ema=args.ema, format=args.format, dtype=args.dtype)
    print(f"exported Flux of {args.workdir} step {step} ({args.format}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
