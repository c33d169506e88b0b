"""A plan as text for people and as a JSON-ready dict for scripts."""

from __future__ import annotations

import dataclasses
from typing import Any

from sga_jax.plan.levers import as_flags
from sga_jax.plan.planner import BucketResult, Plan, Trial
from sga_jax.plan.step import StepPlan
from sga_jax.train.loop import format_bytes

CPU_CAVEAT = ("cpu is a weak proxy: the argument sizes (state, frozen models, batch) are exact, the temporaries are "
              "not (XLA:CPU upcasts bf16 matmuls, has no rematerialisation pass and no asynchronous collectives); "
              "plan for a GPU or TPU target to judge a fit")


def _verdict(plan: StepPlan) -> str:
    if plan.fits is None:
        return "no memory limit to judge by"
    if plan.short_by is None:
        return "DOES NOT FIT" if not plan.fits else "fits"
    if plan.fits:
        return f"fits, {format_bytes(-plan.short_by)} to spare"
    return f"DOES NOT FIT by {format_bytes(plan.short_by)}"


def _flops(value: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} FLOP"


def _count(value: int) -> str:
    return f"{value / 1e9:.2f} B" if value >= 1e9 else f"{value:,}"


def _seconds(value: float) -> str:
    return f"{value * 1e3:.3g} ms" if value < 1 else f"{value:.3g} s"


def _memory_lines(plan: StepPlan) -> list[str]:
    m = plan.memory
    rows = [("parameters (fp32)", m.params), ("optimizer state", m.optimizer), ("EMA", m.ema),
            ("other model state", m.model_state), ("step counters, RNG", m.counters), ("frozen models", m.frozen),
            ("batch", m.batch),
            ("gradients (fp32)", m.gradients), ("temporaries", m.temporaries), ("outputs (not in place)", m.outputs),
            ("code", m.code), ("peak", m.peak)]
    lines = []
    for label, value in rows:
        if value is None or (value == 0 and label in ("EMA", "other model state", "code", "step counters, RNG")):
            continue
        note = ""
        if label.startswith("gradients"):
            note = "  (within the temporaries)"
        elif label == "peak" and plan.usable is not None:
            note = f"  of {format_bytes(plan.usable)} usable"
            if plan.memory.temporaries is None:
                note += " (the TPU compiler's figure: it ran out of memory)"
        lines.append(f"    {label:<24}{format_bytes(value):>12}{note}")
    if m.unused_arguments:
        lines.append(f"    (peak includes {format_bytes(m.unused_arguments)} of arguments the step never reads, "
                     "e.g. a frozen decoder: training holds them all the same)")
    if m.compiled_arguments is not None and m.compiled_arguments != m.arguments - m.unused_arguments:
        lines.append(f"    (the compiled program's arguments take {format_bytes(m.compiled_arguments)}: "
                     "the target pads small arrays)")
    return lines


def _work_lines(plan: StepPlan) -> list[str]:
    lines = [f"    {'FLOPs per step':<24}{_flops(plan.flops):>12}  ({_flops(plan.flops_per_device)} per device; "
             "matmuls, convolutions and attention as traced)"]
    if plan.unknown_loops:
        lines.append(f"    ({plan.unknown_loops} while loop(s) of unknown trip count counted once)")
    if plan.step_time is not None:
        t = plan.step_time
        lines.append(f"    {'step time (estimate)':<24}{_seconds(t.estimate_s):>12}  ({t.bound}-bound roofline at "
                     f"{t.peak_flops / 1e12:.0f} TFLOP/s and {t.bandwidth / 1e12:.2f} TB/s per device; "
                     "communication and kernel efficiency not included)")
    return lines


def _trial_line(trial: Trial) -> str:
    flags = as_flags(trial.overrides)
    if trial.plan is None:
        return f"    {flags}: skipped ({trial.skipped})"
    return f"    {flags}: {_verdict(trial.plan)}"


def _bucket_lines(result: BucketResult) -> list[str]:
    plan = result.plan
    lines = [f"bucket {plan.bucket} ({plan.examples_per_device:g} examples per device): {_verdict(plan)}"]
    if plan.compiler_error:
        lines.append(f"    compiler: {plan.compiler_error}")
    if plan.note:
        lines.append(f"    note: {plan.note}")
    lines += _memory_lines(plan) + _work_lines(plan)
    lines.append(f"    compiled in {plan.compile_s:.1f} s (built and traced in {plan.trace_s:.1f} s)")
    if result.trials:
        suggestion = result.suggestion
        if suggestion is not None:
            lines.append(f"  first overrides that fit (peak {format_bytes(suggestion.plan.memory.peak)}):")
            lines.append(f"    {as_flags(suggestion.overrides)}")
        else:
            lines.append("  no lever setting tried fits; tried:")
            lines += [_trial_line(t) for t in result.trials]
    return lines


def render(plan: Plan, label: str = "") -> str:
    """The plan as the text `python -m sga_jax.plan` prints."""
    mesh = " ".join(f"{axis}={size}" for axis, size in plan.mesh.items())
    head = [f"plan{' of ' + label if label else ''} on {plan.target.name}: {plan.target.description}",
            f"  mesh {mesh} over {plan.num_devices} devices, {plan.num_processes} process(es); "
            f"{_count(plan.trainable_parameters)} trainable parameters; {plan.compute_dtype} compute",
            "  usable memory per device: "
            + (f"{format_bytes(plan.usable)} ({plan.usable_source})" if plan.usable is not None else plan.usable_source)]
    if plan.target.proxy:
        head.append(f"  note: {CPU_CAVEAT}")
    body = [line for result in plan.buckets for line in ["", *_bucket_lines(result)]]
    return "\n".join(head + body + ["", f"planned in {plan.wall_s:.1f} s"])


def _step_dict(plan: StepPlan) -> dict[str, Any]:
    out = dataclasses.asdict(plan)
    out["memory"]["arguments"] = plan.memory.arguments
    out["short_by"] = plan.short_by
    if plan.step_time is not None:
        out["step_time"].update(estimate_s=plan.step_time.estimate_s, bound=plan.step_time.bound)
    return out


def as_dict(plan: Plan) -> dict[str, Any]:
    """The plan as plain JSON-ready values (bytes per device, seconds, FLOPs per step)."""
    target = plan.target
    return {
        "target": {"name": target.name, "platform": target.platform, "description": target.description,
                   "topology": target.topology, "slices": target.slices, "proxy": target.proxy},
        "num_devices": plan.num_devices, "num_processes": plan.num_processes, "mesh": plan.mesh,
        "trainable_parameters": plan.trainable_parameters, "compute_dtype": plan.compute_dtype,
        "usable": plan.usable, "usable_source": plan.usable_source, "wall_s": plan.wall_s,
        "buckets": [
            {**_step_dict(r.plan),
             "suggestion": None if r.suggestion is None else {"overrides": r.suggestion.overrides,
                                                              "flags": as_flags(r.suggestion.overrides),
                                                              "peak": r.suggestion.plan.memory.peak},
             "trials": [{"lever": t.lever, "overrides": t.overrides, "skipped": t.skipped,
                         "fits": None if t.plan is None else t.plan.fits,
                         "peak": None if t.plan is None else t.plan.memory.peak} for t in r.trials]}
            for r in plan.buckets
        ],
    }
