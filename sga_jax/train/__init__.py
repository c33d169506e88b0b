"""The sharded training engine shared by both SGA stages (see docs/training.md).

A stage is a `Task` (sga_jax.train.task); `train(config, workdir)` runs it with checkpoints,
exact resume and logging. Command line: `python -m sga_jax.train --config ... --workdir ...`.
"""

from sga_jax.train.config import base_config, validate_config
from sga_jax.train.loop import RunResult, TrainingDiverged, build_run, train
from sga_jax.train.task import TASKS, Task, get_task

__all__ = [
    "TASKS",
    "RunResult",
    "Task",
    "TrainingDiverged",
    "base_config",
    "build_run",
    "get_task",
    "train",
    "validate_config",
]
