"""Optimizer and learning-rate schedules from `config.optimizer`: AdamW with a weight-decay mask,
warmup then constant or cosine decay, global-norm gradient clipping, and parameter groups.

Parameter groups let one train state hold several players (stage 1's VAE and its discriminator):
a task with the hook `param_groups(params) -> labels` (a tree like `params` whose leaves are group
names; the engine calls it once on the abstract parameters) gets an `optax.multi_transform` with
one AdamW per group. Group "default" is
`config.optimizer` itself; every other name is a section `config.optimizer.groups.<name>` whose
keys override `config.optimizer`'s (learning rate, schedule, betas, weight decay, clipping,
`start_step`, ...); label "frozen" means no update at all (no optimizer state either). Clipping is
per group, so one player's gradient norm never scales the other's. Without the hook the optimizer
is one AdamW over everything, as before.

Gradient accumulation and the EMA live in the train step (`sga_jax.train.step`), not here, so the
optimizer's step count is the number of applied updates.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import optax

from sga_jax.errors import ConfigError

SCHEDULES = ("constant", "cosine")
DEFAULT_GROUP = "default"
FROZEN_GROUP = "frozen"
GROUP_FIELDS = ("learning_rate", "schedule", "warmup_steps", "decay_steps", "min_lr_ratio", "start_step", "b1", "b2",
                "eps", "weight_decay", "no_decay", "grad_clip_norm")


def make_schedule(cfg: Any, total_steps: int) -> optax.Schedule:
    """Learning rate per applied update: 0 before `start_step`, then linear warmup from 0 over
    `warmup_steps`, then `constant` or `cosine` decay to `learning_rate * min_lr_ratio` at
    `decay_steps` (0: total_steps) updates after the start."""
    peak = float(cfg.learning_rate)
    warmup = int(cfg.warmup_steps)
    start = int(cfg.get("start_step", 0))
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.schedule == "cosine":
        decay_steps = int(cfg.decay_steps) or int(total_steps) - start
        after = optax.cosine_decay_schedule(peak, max(decay_steps - warmup, 1), alpha=float(cfg.min_lr_ratio))
    else:
        raise ConfigError(f"config.optimizer.schedule={cfg.schedule!r}: expected one of {SCHEDULES}")
    if warmup > 0:
        after = optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])
    if start > 0:
        after = optax.join_schedules([optax.constant_schedule(0.0), after], [start])
    return after


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


def group_config(cfg: Any, name: str) -> ml_collections.ConfigDict:
    """The optimizer settings of group `name`: `cfg` with `cfg.groups[name]`'s keys overriding it
    (a ConfigError names any key that is not a group setting)."""
    merged = ml_collections.ConfigDict({k: cfg[k] for k in GROUP_FIELDS if k in cfg})
    if name == DEFAULT_GROUP:
        return merged
    overrides = cfg.groups[name]
    unknown = sorted(set(overrides) - set(GROUP_FIELDS))
    if unknown:
        raise ConfigError(f"config.optimizer.groups.{name}: unknown keys {unknown}; a group sets {GROUP_FIELDS}")
    merged.update(overrides.to_dict())
    return merged


def adamw(cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(AdamW with the decay mask, preceded by global-norm clipping when grad_clip_norm > 0, its schedule)."""
    schedule = make_schedule(cfg, total_steps)
    no_decay = tuple(cfg.no_decay)
    tx = optax.adamw(
        schedule,
        b1=float(cfg.b1),
        b2=float(cfg.b2),
        eps=float(cfg.eps),
        weight_decay=float(cfg.weight_decay),
        mask=lambda params: decay_mask(params, no_decay),
    )
    if float(cfg.grad_clip_norm) > 0:
        tx = optax.chain(optax.clip_by_global_norm(float(cfg.grad_clip_norm)), tx)
    return tx, schedule


def group_names(cfg: Any) -> list[str]:
    """The groups a task's labels may name: "default", those under `cfg.groups`, and "frozen"."""
    return [DEFAULT_GROUP, *cfg.get("groups", {}).keys(), FROZEN_GROUP]


def check_labels(labels: Any, names: Sequence[str]) -> None:
    """Raise a ConfigError naming the first parameter whose group label is not one of `names`."""
    for path, label in jax.tree_util.tree_leaves_with_path(labels):
        if label not in names:
            raise ConfigError(f"task.param_groups: parameter {path_name(path)!r} has label {label!r}; "
                              f"groups are {list(names)} (add config.optimizer.groups.{label})")


def make_optimizer(
    cfg: Any, total_steps: int, labels: Any = None
) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
    """(optimizer, {group: schedule}) for `config.optimizer`; one AdamW (group "default") without
    `labels`, else an `optax.multi_transform` of one AdamW per group plus "frozen", routed by
    `labels` (a tree like the parameters whose leaves are group names, from a task's
    `param_groups`)."""
    if labels is None:
        tx, schedule = adamw(cfg, total_steps)
        return tx, {DEFAULT_GROUP: schedule}
    names = group_names(cfg)
    check_labels(labels, names)
    transforms, schedules = {FROZEN_GROUP: optax.set_to_zero()}, {}
    for name in names[:-1]:
        transforms[name], schedules[name] = adamw(group_config(cfg, name), total_steps)
    return optax.multi_transform(transforms, labels), schedules
