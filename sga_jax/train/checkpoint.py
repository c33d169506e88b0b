"""Checkpoints: orbax CheckpointManager holding the train state, the data iterator's state, the
resolved config and metadata; asynchronous saves; restore straight into the target shardings.

Layout: WORKDIR/checkpoints/<step>/{state, data, config, meta}. orbax writes each checkpoint into a
temporary directory and renames it only once every item (and every host) has finished, so a
checkpoint interrupted by a crash or SIGKILL is never listed as a step; its leftover temporary
directory is removed when the manager next opens the directory.
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from sga_jax.errors import CheckpointError
from sga_jax.train.state import TrainState


class Checkpointer:
    """Save and restore (state, data iterator state, config, metadata) by step.

    `keep_period` > 0 also keeps every checkpoint whose step is a multiple of it, beyond the last
    `max_to_keep`.
    """

    def __init__(self, directory: str | Path, *, max_to_keep: int | None = 3, keep_period: int = 0,
                 async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            keep_period=keep_period or None,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "data", "config", "meta"), options=options
        )

    def latest_step(self) -> int | None:
        """The newest finalised step, or None when there is none."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every finalised step, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: TrainState, data_state: dict, config: dict, metadata: dict | None = None) -> None:
        """Start saving step `step` (asynchronously when enabled); returns once the arrays are
        copied off the devices, so the caller may donate `state` to the next step."""
        meta = {
            "step": int(step),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "process_count": jax.process_count(),
            "device_count": jax.device_count(),
            "jax_version": jax.__version__,
            **(metadata or {}),
        }
        self.manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def restore(self, step: int, target: TrainState) -> tuple[TrainState, dict, dict, dict]:
        """(state, data state, config, metadata) of `step`; `target` is a tree of ShapeDtypeStructs
        with shardings (`sga_jax.train.state.with_shardings`) that the arrays are loaded into."""
        if step not in self.manager.all_steps():
            raise CheckpointError(f"{self.directory}: no finalised checkpoint for step {step}; have {self.all_steps()}")
        out = self.manager.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out.state, out.data, out.config, out.meta

    def wait(self) -> float:
        """Block until pending asynchronous saves are finalised; returns the seconds waited."""
        start = time.perf_counter()
        self.manager.wait_until_finished()
        return time.perf_counter() - start

    def close(self) -> None:
        """Finish pending saves and release the manager's threads."""
        self.manager.wait_until_finished()
        self.manager.close()
