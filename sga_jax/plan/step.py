"""Compile a run's real train step for one batch shape on a target's devices, with nothing
allocated, and read what one device needs.

The run is built exactly as training builds it (`sga_jax.train.loop.build_run` over the target's
devices: same task, mesh, logical rules, shardings, remat, attention, gradient accumulation); the
step is the one training runs (`sga_jax.train.loop.jitted_step`), traced on abstract arrays that
carry the shardings training's arrays have, then lowered and compiled for the target.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from sga_jax import parallel
from sga_jax.data.buckets import Bucket, bucket_name
from sga_jax.errors import ConfigError
from sga_jax.plan.flops import jaxpr_cost
from sga_jax.plan.targets import Target, parse_hbm_error
from sga_jax.train import state as state_lib
from sga_jax.train.loop import Run, build_run, jitted_step

Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per device. The state parts and the batch follow from the shardings (exact); the rest
    comes from the compiled program (None when a TPU compile ran out of memory). `gradients` are
    the fp32 gradients in the parameters' layout, held within `temporaries`."""

    params: int
    optimizer: int
    ema: int
    model_state: int
    counters: int  # step, RNG key and NaN counters
    frozen: int
    batch: int
    gradients: int
    unused_arguments: int = 0  # arguments the step never reads: dropped from the executable, still on the device
    temporaries: int | None = None
    outputs: int | None = None  # outputs not written in place of a donated argument
    code: int | None = None
    peak: int | None = None
    compiled_arguments: int | None = None

    @property
    def arguments(self) -> int:
        """What the step's arguments occupy: the state, the frozen models and the batch."""
        return self.params + self.optimizer + self.ema + self.model_state + self.counters + self.frozen + self.batch


@dataclasses.dataclass(frozen=True)
class StepTime:
    """A roofline estimate of one step on one device: the time its matrix work takes at peak
    FLOP/s and the time its counted bytes take at peak bandwidth; communication is not included."""

    compute_s: float
    memory_s: float
    peak_flops: float
    bandwidth: float

    @property
    def estimate_s(self) -> float:
        """The larger of the two terms."""
        return max(self.compute_s, self.memory_s)

    @property
    def bound(self) -> str:
        """Which term bounds the step: "compute" or "memory"."""
        return "compute" if self.compute_s >= self.memory_s else "memory"


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What compiling the step for one batch shape on one target found."""

    bucket: str
    mesh: dict[str, int]
    trainable_parameters: int
    examples_per_device: float
    memory: Memory
    usable: int | None
    fits: bool | None  # None when the target has no memory limit to judge by (cpu without --memory_gib)
    flops: float  # per step, all devices
    flops_per_device: float
    unknown_loops: int
    step_time: StepTime | None
    trace_s: float
    compile_s: float
    compiler_error: str | None = None  # a TPU compile that ran out of memory
    note: str | None = None  # how the compile departed from the defaults, when it had to

    @property
    def short_by(self) -> int | None:
        """Bytes per device over the usable memory (negative: to spare)."""
        if self.usable is None or self.memory.peak is None:
            return None
        return self.memory.peak - self.usable


def _shaped(abstract: Any, shardings: Any) -> Any:
    return state_lib.with_shardings(abstract, shardings) if abstract is not None else None


def abstract_batch(run: Run, bucket: Bucket | None) -> dict[str, jax.ShapeDtypeStruct]:
    """The task's batch shapes for `bucket`, carrying the batch sharding training's arrays get
    (`sga_jax.parallel.host_to_global`)."""
    shapes = getattr(run.task, "batch_shapes", None)
    if shapes is None:
        raise ConfigError(f"task {run.config.task!r} has no batch_shapes(config, bucket) hook, which the planner "
                         "needs (see sga_jax/train/task.py)")
    sharding = parallel.batch_sharding(run.mesh, run.rules)
    return {name: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
            for name, s in shapes(run.config, bucket).items()}


def compiled_peak(memory: Any, platform: str) -> int:
    """Peak bytes per device of a compiled program: the compiler's own figure on TPU and GPU; on
    CPU (whose figure is about its arguments only) arguments + temporaries + outputs not aliased."""
    if platform == "cpu":
        return (memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes
                - memory.alias_size_in_bytes + memory.generated_code_size_in_bytes)
    return memory.peak_memory_in_bytes


def unused_argument_bytes(lowered: Any, arguments: Any) -> int:
    """Per-device bytes of the arguments JAX dropped from the executable because the step never
    reads them (e.g. a frozen VAE's decoder). Training still holds those arrays on the devices."""
    kept = lowered._lowering.compile_args.get("kept_var_idx")  # JAX's record of the arguments it kept
    if kept is None:
        return 0
    dropped = [x for i, x in enumerate(jax.tree.leaves(arguments)) if i not in kept]
    return parallel.per_device_bytes(dropped, [x.sharding for x in dropped])


def _step_time(target: Target, config: ml_collections.ConfigDict, flops: float, nbytes: float) -> StepTime | None:
    peak = target.peak_flops(config.precision.compute_dtype)
    if peak is None:
        return None
    return StepTime(flops / peak, nbytes / target.chip.bandwidth, peak, target.chip.bandwidth)


def is_out_of_memory(error: BaseException) -> bool:
    """True for a compiler error that says the program does not fit in device memory."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text and "memory" in text.lower()


@dataclasses.dataclass(frozen=True)
class TracedStep:
    """A run's train step traced and lowered on abstract arguments (state, frozen, batch)."""

    run: Run
    arguments: tuple[Any, Any, dict[str, jax.ShapeDtypeStruct]]
    traced: Any  # jax.stages.Traced
    lowered: Any  # jax.stages.Lowered


def trace_step(config: ml_collections.ConfigDict, bucket: Bucket | None, devices: list[Any]) -> TracedStep:
    """Build the run of `config` on `devices` and trace and lower its jitted train step on abstract
    arguments of `bucket` (nothing is allocated or compiled)."""
    run = build_run(config, devices)
    state = _shaped(run.setup.abstract_state, run.setup.state_shardings)
    frozen = _shaped(run.setup.abstract_frozen, run.setup.frozen_shardings)
    batch = abstract_batch(run, bucket)
    with parallel.activation_sharding(run.mesh, run.rules):
        traced = jitted_step(run).trace(state, frozen, batch)
        lowered = traced.lower()
    return TracedStep(run, (state, frozen, batch), traced, lowered)


def argument_memory(step: TracedStep) -> Memory:
    """The parts of a step's per-device memory that follow from the shardings alone."""
    setup = step.run.setup
    parts = state_lib.memory_estimate(setup)
    whole_state = parallel.per_device_bytes(setup.abstract_state, setup.state_shardings)
    batch = step.arguments[2]
    return Memory(params=parts["params"], optimizer=parts["optimizer"], ema=parts["ema"],
                  model_state=parts["model_state"], counters=whole_state - (parts["total"] - parts["frozen"]),
                  frozen=parts["frozen"],
                  batch=parallel.per_device_bytes(batch, {k: x.sharding for k, x in batch.items()}),
                  gradients=parts["params"],  # fp32 like the fp32 master parameters, in their layout
                  unused_arguments=unused_argument_bytes(step.lowered, step.arguments))


def with_compiled(memory: Memory, stats: Any, platform: str) -> Memory:
    """`memory` completed with a compiled program's `memory_analysis()`."""
    return dataclasses.replace(
        memory, temporaries=stats.temp_size_in_bytes, outputs=stats.output_size_in_bytes - stats.alias_size_in_bytes,
        code=stats.generated_code_size_in_bytes, peak=compiled_peak(stats, platform) + memory.unused_arguments,
        compiled_arguments=stats.argument_size_in_bytes)


# XLA's GPU compiler without a device cannot autotune; at some shapes its Triton GEMM emitter then
# finds no tiling and fails. cuBLAS GEMMs (Triton GEMMs off) compile; the plan says so.
_NO_TILING = "Couldn't find output tile sizes"
_NO_TRITON_GEMM = {"xla_gpu_enable_triton_gemm": False}


def compile_step(lowered: Any, platform: str) -> tuple[Any, str | None, str | None]:
    """(compiled program or None, out-of-memory message or None, note or None) for a lowered step:
    a TPU compile that runs out of memory is an answer, as is a GPU compile retried without Triton
    GEMMs; anything else is raised."""
    try:
        return lowered.compile(), None, None
    except Exception as exc:  # noqa: BLE001 - sorted below; the rest is raised
        text = str(exc)
        if is_out_of_memory(exc):
            return None, text.strip().splitlines()[0], None
        if platform != "gpu" or _NO_TILING not in text:
            raise
    note = ("the deviceless GPU compiler found no Triton tiling for a matmul, so this plan uses cuBLAS GEMMs; if the "
            "real run fails the same way, run it with XLA_FLAGS=--xla_gpu_enable_triton_gemm=false")
    return lowered.compile(compiler_options=_NO_TRITON_GEMM), None, note


def plan_step(config: ml_collections.ConfigDict, target: Target, bucket: Bucket | None, devices: list[Any], *,
              usable: int | None, progress: Progress = lambda message: None) -> StepPlan:
    """Build the run of `config` on `devices`, compile its train step for `bucket` and judge the
    per-device memory against `usable` bytes. A TPU compile that runs out of memory is a plan that
    does not fit (the compiler's required and available bytes are read from its message)."""
    name = bucket_name(bucket) if bucket is not None else "batch"
    started = time.perf_counter()
    progress(f"{name}: building the run and tracing its train step")
    step = trace_step(config, bucket, devices)
    trace_s = time.perf_counter() - started
    cost = jaxpr_cost(step.traced.jaxpr)
    memory = argument_memory(step)
    progress(f"{name}: compiling for {target.name} ({len(devices)} devices)")
    compile_started = time.perf_counter()
    compiled, error, note = compile_step(step.lowered, target.platform)
    compile_s = time.perf_counter() - compile_started
    if compiled is not None:
        memory = with_compiled(memory, compiled.memory_analysis(), devices[0].platform)
        fits = None if usable is None else memory.peak <= usable
    else:
        parsed = parse_hbm_error(error)
        if parsed is not None:
            memory = dataclasses.replace(memory, peak=parsed[0])
            usable = parsed[1] if usable is None else usable
        fits = False
    n, run = len(devices), step.run
    state_traffic = 2.0 * (memory.arguments - memory.batch)  # the donated state read and written once
    step_time = _step_time(target, config, cost.flops / n, cost.bytes / n + state_traffic)
    progress(f"{name}: done in {time.perf_counter() - started:.1f} s (compile {compile_s:.1f} s)")
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(run.setup.abstract_state.params))
    return StepPlan(bucket=name, mesh=dict(run.mesh.shape), trainable_parameters=count,
                    examples_per_device=int(config.batch_size) / parallel.batch_shards(run.mesh, run.rules),
                    memory=memory, usable=usable, fits=fits, flops=cost.flops, flops_per_device=cost.flops / n,
                    unknown_loops=cost.unknown_loops, step_time=step_time, trace_s=trace_s, compile_s=compile_s,
                    compiler_error=error, note=note)
