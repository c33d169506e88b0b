"""Ahead-of-time planning of a training run for its target hardware (`python -m sga_jax.plan`).

    from sga_jax import plan
    target = plan.get_target("h100x8")
    result = plan.plan(config, target, plan.choose_buckets(config, ["2048x2048"], False))
    print(plan.render(result))

The run is built exactly as training builds it, over the target's devices (a TPU or GPU topology
described without the hardware, or simulated CPU devices), and its real train step is compiled
for each bucket with nothing allocated. See `planner` (the search), `step` (one compile and what it
needs), `targets` (names, devices, memory limits), `levers` (overrides), `flops` (work counted
from the program) and `report` (text and JSON).
"""

from sga_jax.plan.planner import BucketResult, Plan, Trial, choose_buckets, config_buckets, parse_bucket, plan
from sga_jax.plan.report import as_dict, render
from sga_jax.plan.step import Memory, StepPlan, StepTime, plan_step
from sga_jax.plan.targets import BackendMissing, Target, devices, get_target, usable_memory

__all__ = [
    "BackendMissing", "BucketResult", "Memory", "Plan", "StepPlan", "StepTime", "Target", "Trial", "as_dict",
    "choose_buckets", "config_buckets", "devices", "get_target", "parse_bucket", "plan", "plan_step", "render",
    "usable_memory",
]
