"""Trained weights back out (`python -m sga_jax.train.export`, see its `__main__`).

`export_run` reads a training checkpoint of a run (the latest, or `--step`; the EMA parameters with `--ema`)
and hands the parameters to the run's task, which writes them in one of its `export_formats`
(stage 2: Flux in diffusers' layout, loaded by `FluxTransformer2DModel.from_pretrained`, or BFL's
`flux1-dev.safetensors` names). Only the parameters the task asks for are read from the checkpoint
(an orbax partial restore onto one device): the optimizer state, training-only heads and other
players are never loaded.

A task that can export has the attribute `export_formats` (a tuple, the first is the default) and
the hook ``export(read, out, *, format, dtype)``, where ``read(name, abstract)`` returns the pure
dict of parameters `params[name]` (or `ema[name]`) of the checkpoint, shaped like `abstract`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import orbax.checkpoint as ocp

from sga_jax.errors import CheckpointError, ConfigError
from sga_jax.train.checkpoint import Checkpointer
from sga_jax.train.task import get_task

ParamReader = Callable[[str, Any], dict]


def checkpoint_reader(workdir: str | Path, step: int, *, ema: bool = False) -> ParamReader:
    """`read(name, abstract)`: the parameters under `name` of checkpoint `step` of run `workdir`
    (`params` or, with `ema`, the EMA), restored onto the first local device."""
    path = (Path(workdir) / "checkpoints" / str(step) / "state").absolute()
    branch = "ema" if ema else "params"
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def read(name: str, abstract: Any) -> dict:
        item = {branch: {name: abstract}}
        restore_args = {branch: {name: jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), abstract)}}
        try:
            restored = ocp.PyTreeCheckpointer().restore(
                path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
        except (KeyError, ValueError) as err:
            hint = " (the run keeps no EMA: optimizer.ema_decay = 0)" if ema else ""
            raise CheckpointError(f"{path}: cannot read {branch}/{name}{hint}: {err}") from err
        return restored[branch][name]

    return read


def run_task(workdir: str | Path) -> tuple[ml_collections.ConfigDict, Any]:
    """(resolved config, configured task) of the run in `workdir`, from its config.json."""
    workdir = Path(workdir)
    config_file = workdir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: not a training work directory")
    config = ml_collections.ConfigDict(json.loads(config_file.read_text()))
    return config, get_task(config.task, config)


def export_run(workdir: str | Path, out: str | Path, *, step: int | None = None, ema: bool = False,
               format: str | None = None, dtype: str | None = None) -> int:
    """Export checkpoint `step` (default: latest) of run `workdir` to `out` in `format` (default:
    the task's first export format); returns the step exported."""
    config, task = run_task(workdir)
    formats = tuple(getattr(task, "export_formats", ()))
    if not formats:
        raise ConfigError(f"{workdir}: task {config.task!r} has nothing to export")
    format = format or formats[0]
    if format not in formats:
        raise ConfigError(f"--format {format!r}: task {config.task!r} exports {formats}")
    checkpointer = Checkpointer(Path(workdir) / "checkpoints")
    step = checkpointer.latest_step() if step is None else step
    checkpointer.close()
    if step is None:
        raise CheckpointError(f"{Path(workdir) / 'checkpoints'}: no finalised checkpoint")
    task.export(checkpoint_reader(workdir, step, ema=ema), out, format=format, dtype=dtype)
    return step
