"""The engine's part of every training config, and its validation before anything compiles.

A stage's `configs/<name>.py` starts from `base_config()` and adds its task section:

    config = base_config()
    config.task = "toy"
    config.toy = ml_collections.ConfigDict({...})
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections

from sga_jax.errors import ConfigError
from sga_jax.parallel import DEFAULT_RULES, MESH_AXES
from sga_jax.train import compile_cache
from sga_jax.train.optim import DEFAULT_GROUP, FROZEN_GROUP, GROUP_FIELDS, SCHEDULES

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def base_config() -> ml_collections.ConfigDict:
    """Engine defaults: run length and intervals, mesh, sharding rules, optimizer, precision,
    NaN guard, checkpointing and logging. Intervals of 0 switch the event off."""
    c = ml_collections.ConfigDict()
    c.task = ""
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 32  # global, over all devices and hosts
    c.checkpoint_every = 500
    c.log_every = 10
    c.sample_every = 0
    c.eval_every = 0
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.sharding_rules = ml_collections.ConfigDict(
        dict(DEFAULT_RULES)
    )
    c.optimizer = ml_collections.ConfigDict(
        {
            "learning_rate": 1e-4,
            "schedule": "constant",
            "warmup_steps": 0,
            "decay_steps": 0,  # cosine: 0 means total_steps
            "min_lr_ratio": 0.0,
            "start_step": 0,  # updates before it have learning rate 0
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "weight_decay": 1e-4,
            "no_decay": ("norm", "embedding"),  # regexes on 'a/b/c' parameter paths
            "grad_clip_norm": 1.0,  # 0: no clipping
            "grad_accum_steps": 1,
            "ema_decay": 0.0,  # 0: no EMA
            # parameter groups of tasks with a `param_groups` hook: {name: {key: value}} overriding
            # the keys above (sga_jax.train.optim.GROUP_FIELDS) for the parameters labelled `name`
            "groups": {},
        }
    )
    c.precision = ml_collections.ConfigDict({"compute_dtype": "float32", "param_dtype": "float32"})
    c.nan_guard = ml_collections.ConfigDict({"max_consecutive": 10})
    c.checkpoint = ml_collections.ConfigDict({"max_to_keep": 3, "keep_period": 0, "async_save": True})
    c.logging = ml_collections.ConfigDict({"tensorboard": True, "progress_bar": True})
    c.compilation_cache = compile_cache.default_config()  # on, in WORKDIR/compilation_cache
    return c


def _fail(key: str, value: Any, expected: str) -> None:
    raise ConfigError(f"config.{key}={value!r}: expected {expected}")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise a ValueError naming the key, its value and what was expected, for any setting the
    engine cannot run with. Checks that need the device count live in `validate_for_mesh`."""
    required = ("task", "seed", "total_steps", "batch_size", "checkpoint_every", "log_every", "sample_every",
                "mesh", "optimizer", "precision", "checkpoint", "logging", "nan_guard")
    missing = [k for k in required if k not in config]
    if missing:
        raise ConfigError(f"config lacks {missing}; start from sga_jax.train.config.base_config()")
    if not config.task:
        _fail("task", config.task, "a registered task name or 'package.module:ClassName'")
    for key in ("total_steps", "batch_size"):
        if not isinstance(config[key], int) or config[key] < 1:
            _fail(key, config[key], "a positive integer")
    for key in ("checkpoint_every", "log_every", "sample_every", "eval_every"):
        if not isinstance(config.get(key, 0), int) or config.get(key, 0) < 0:
            _fail(key, config.get(key), "an integer >= 0 (0 switches it off)")
    if config.log_every < 1:
        _fail("log_every", config.log_every, "an integer >= 1")
    for axis, size in config.mesh.items():
        if axis not in MESH_AXES:
            _fail(f"mesh.{axis}", size, f"only the axes {MESH_AXES}")
        if not isinstance(size, int) or (size < 1 and size != -1):
            _fail(f"mesh.{axis}", size, "a positive integer or -1")
    opt = config.optimizer
    _validate_group("optimizer", opt)
    for name, group in opt.get("groups", {}).items():
        if name in (DEFAULT_GROUP, FROZEN_GROUP):
            _fail(f"optimizer.groups.{name}", group, f"a group name other than {DEFAULT_GROUP!r} and {FROZEN_GROUP!r}")
        _validate_group(f"optimizer.groups.{name}", {**{k: opt[k] for k in GROUP_FIELDS if k in opt}, **group})
    if not 0 <= opt.ema_decay < 1:
        _fail("optimizer.ema_decay", opt.ema_decay, "in [0, 1)")
    if not isinstance(opt.grad_accum_steps, int) or opt.grad_accum_steps < 1:
        _fail("optimizer.grad_accum_steps", opt.grad_accum_steps, "a positive integer")
    if config.batch_size % opt.grad_accum_steps:
        _fail("batch_size", config.batch_size, f"a multiple of optimizer.grad_accum_steps={opt.grad_accum_steps}")
    if config.precision.compute_dtype not in COMPUTE_DTYPES:
        _fail("precision.compute_dtype", config.precision.compute_dtype, f"one of {COMPUTE_DTYPES}")
    if config.precision.param_dtype != "float32":
        _fail("precision.param_dtype", config.precision.param_dtype, "'float32' (fp32 master parameters)")
    if not isinstance(config.nan_guard.max_consecutive, int) or config.nan_guard.max_consecutive < 1:
        _fail("nan_guard.max_consecutive", config.nan_guard.max_consecutive, "a positive integer")
    if config.checkpoint.max_to_keep is not None and config.checkpoint.max_to_keep < 1:
        _fail("checkpoint.max_to_keep", config.checkpoint.max_to_keep, "a positive integer or None (keep all)")
    try:
        json.dumps(config.to_dict())
    except TypeError as e:
        raise ConfigError(f"config is not JSON-serialisable (it is saved with every checkpoint): {e}") from e


def _validate_group(prefix: str, opt: Any) -> None:
    """Checks of one parameter group's optimizer settings (`config.optimizer` or one of its groups)."""
    if opt["schedule"] not in SCHEDULES:
        _fail(f"{prefix}.schedule", opt["schedule"], f"one of {SCHEDULES}")
    if not opt["learning_rate"] > 0:
        _fail(f"{prefix}.learning_rate", opt["learning_rate"], "> 0")
    for key in ("warmup_steps", "start_step"):
        if not isinstance(opt.get(key, 0), int) or opt.get(key, 0) < 0:
            _fail(f"{prefix}.{key}", opt.get(key), "an integer >= 0")


def validate_for_mesh(config: ml_collections.ConfigDict, batch_shards: int, num_processes: int) -> None:
    """Checks that need the mesh: the global batch must split over the batch shards (per
    micro-batch when accumulating) and over the processes."""
    k = config.optimizer.grad_accum_steps
    if config.batch_size % (batch_shards * k):
        _fail("batch_size", config.batch_size,
              f"a multiple of {batch_shards * k} ({batch_shards} batch shards x grad_accum_steps={k})")
    if config.batch_size % num_processes:
        _fail("batch_size", config.batch_size, f"a multiple of the process count {num_processes}")
