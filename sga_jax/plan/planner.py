"""Plan a training config on a target: compile its step for each chosen bucket, judge the fit and,
where a bucket does not fit, find the first overrides that make it fit."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import ml_collections

from sga_jax.data.buckets import Bucket, bucket_name
from sga_jax.data.pipeline import buckets_from_config
from sga_jax.errors import ConfigError
from sga_jax.plan import levers as levers_lib
from sga_jax.plan import targets as targets_lib
from sga_jax.plan.step import Progress, StepPlan, plan_step
from sga_jax.train.task import get_task


@dataclasses.dataclass(frozen=True)
class Trial:
    """One lever setting the search compiled: its overrides and its plan, or why it was skipped."""

    lever: str
    overrides: levers_lib.Overrides
    plan: StepPlan | None
    skipped: str | None = None


@dataclasses.dataclass(frozen=True)
class BucketResult:
    """A bucket's plan under the config as given and, when it does not fit, the search's trials;
    `suggestion` is the first trial that fits (None when none did or no search ran)."""

    plan: StepPlan
    trials: tuple[Trial, ...] = ()

    @property
    def suggestion(self) -> Trial | None:
        """The first trial whose step fits."""
        return next((t for t in self.trials if t.plan is not None and t.plan.fits), None)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything the planner found for one config on one target."""

    target: targets_lib.Target
    num_devices: int
    num_processes: int
    mesh: dict[str, int]
    trainable_parameters: int
    compute_dtype: str
    usable: int | None
    usable_source: str
    buckets: tuple[BucketResult, ...]
    wall_s: float


def parse_bucket(text: str) -> Bucket:
    """'4096x2304' -> (4096, 2304) as (width, height); a ConfigError shows the expected form."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"bucket {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 2048x2048") from None
    if width < 1 or height < 1:
        raise ConfigError(f"bucket {text!r}: width and height must be positive")
    return width, height


def config_buckets(config: ml_collections.ConfigDict) -> list[Bucket | None]:
    """The aspect buckets training uses (`config.data.buckets`), or [None] for a task without."""
    if "data" in config and "buckets" in config.data:
        return buckets_from_config(config.data)
    return [None]


def choose_buckets(config: ml_collections.ConfigDict, requested: list[str], all_buckets: bool) -> list[Bucket | None]:
    """The buckets to plan: all of the config's, the requested ones, or by default the one with
    the most pixels (the most demanding)."""
    available = config_buckets(config)
    if all_buckets:
        return available
    if requested:
        if available == [None]:
            raise ConfigError(f"task {config.task!r} has no aspect buckets (config.data.buckets); drop --bucket")
        return [parse_bucket(text) for text in requested]
    if available == [None]:
        return available
    return [max(available, key=lambda b: b[0] * b[1])]


def _search(config: ml_collections.ConfigDict, target: targets_lib.Target, bucket: Bucket | None,
            device_list: list[Any], first: StepPlan, max_compiles: int, progress: Progress) -> tuple[Trial, ...]:
    platform = device_list[0].platform if target.platform == "local" else target.platform
    lever_list = levers_lib.levers(config, get_task(config.task, config), first.mesh, len(device_list), platform)
    found: list[Trial] = []
    base, base_peak = {}, first.memory.peak
    for lever, values in lever_list:
        best, best_peak = base, base_peak
        for value in values:
            if sum(t.plan is not None for t in found) >= max_compiles:
                progress(f"stopping the search after {max_compiles} compiles (--max_compiles)")
                return tuple(found)
            overrides = {**base, **value}
            progress(f"trying {levers_lib.as_flags(overrides)}")
            try:
                plan = plan_step(levers_lib.with_overrides(config, overrides), target, bucket, device_list,
                                 usable=first.usable, progress=progress)
            except (ValueError, KeyError, RuntimeError) as error:  # a combination the config cannot run with
                found.append(Trial(lever, overrides, None, skipped=str(error).splitlines()[0]))
                continue
            found.append(Trial(lever, overrides, plan))
            if plan.fits:
                return tuple(found)
            if plan.memory.peak is not None and (best_peak is None or plan.memory.peak < best_peak):
                best, best_peak = overrides, plan.memory.peak
        base, base_peak = best, best_peak  # the lever's best setting stays while the next is tried
    return tuple(found)


def plan(config: ml_collections.ConfigDict, target: targets_lib.Target, buckets: list[Bucket | None], *,
         mem_fraction: float = 0.75, memory_bytes: int | None = None, suggest: bool = True, max_compiles: int = 6,
         progress: Progress = lambda message: None) -> Plan:
    """Compile `config`'s train step for each of `buckets` on `target` and judge each against the
    usable memory per device (`memory_bytes` replaces the target's figure); with `suggest`, search
    the levers for buckets that do not fit, compiling at most `max_compiles` more steps each."""
    started = time.perf_counter()
    progress(f"target {target.name}: {target.description}")
    device_list = targets_lib.devices(target)
    usable, source = targets_lib.usable_memory(target, device_list, mem_fraction=mem_fraction)
    if memory_bytes is not None:
        usable, source = memory_bytes, "--memory_gib"
    results = []
    for bucket in buckets:
        if bucket not in config_buckets(config):
            progress(f"note: {bucket_name(bucket)} is not one of config.data's buckets: training would not use it "
                     "(see config.data.buckets.max_long_edge / pixel_budget / fixed)")
        first = plan_step(config, target, bucket, device_list, usable=usable, progress=progress)
        trials: tuple[Trial, ...] = ()
        if suggest and first.fits is False:
            trials = _search(config, target, bucket, device_list, first, max_compiles, progress)
        results.append(BucketResult(first, trials))
    processes = len({d.process_index for d in device_list})
    return Plan(target, len(device_list), processes, results[0].plan.mesh, results[0].plan.trainable_parameters,
                config.precision.compute_dtype, usable, source, tuple(results), time.perf_counter() - started)
