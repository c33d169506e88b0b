"""Optimizer and learning-rate schedules from `config.optimizer`: AdamW with a weight-decay mask,
warmup then constant or cosine decay, and global-norm gradient clipping.

Gradient accumulation and the EMA live in the train step (`sga_jax.train.step`), not here, so the
optimizer's step count is the number of applied updates.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import optax

from sga_jax.errors import ConfigError

SCHEDULES = ("constant", "cosine")


def make_schedule(cfg: Any, total_steps: int) -> optax.Schedule:
    """Learning rate per applied update: linear warmup from 0 over `warmup_steps`, then
    `constant` or `cosine` decay to `learning_rate * min_lr_ratio` at `decay_steps` (0: total_steps)."""
    peak = float(cfg.learning_rate)
    warmup = int(cfg.warmup_steps)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.schedule == "cosine":
        decay_steps = int(cfg.decay_steps) or int(total_steps)
        after = optax.cosine_decay_schedule(peak, max(decay_steps - warmup, 1), alpha=float(cfg.min_lr_ratio))
    else:
        raise ConfigError(f"config.optimizer.schedule={cfg.schedule!r}: expected one of {SCHEDULES}")
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def path_name(path: Sequence[Any]) -> str:
    """'a/b/c' for a pytree key path (dict keys, attributes and indices)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def decay_mask(params: Any, no_decay: Sequence[str] = ()) -> Any:
    """True for parameters that get weight decay: matrices and larger (ndim >= 2) whose 'a/b/c'
    path matches none of the regular expressions in `no_decay`. Biases and norm scales are 1-D."""
    patterns = [re.compile(p) for p in no_decay]

    def decays(path: Sequence[Any], leaf: Any) -> bool:
        name = path_name(path)
        return leaf.ndim >= 2 and not any(p.search(name) for p in patterns)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule) for `config.optimizer`; clipping precedes AdamW when grad_clip_norm > 0."""
    schedule = make_schedule(cfg, total_steps)
    no_decay = tuple(cfg.no_decay)
    adamw = optax.adamw(
        schedule,
        b1=float(cfg.b1),
        b2=float(cfg.b2),
        eps=float(cfg.eps),
        weight_decay=float(cfg.weight_decay),
        mask=lambda params: decay_mask(params, no_decay),
    )
    if float(cfg.grad_clip_norm) > 0:
        return optax.chain(optax.clip_by_global_norm(float(cfg.grad_clip_norm)), adamw), schedule
    return adamw, schedule
