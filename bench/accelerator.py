"""The stage-2 train step on one accelerator: step time and model FLOP utilisation (MFU) of the
flux_sga task through the engine's jitted step, for the platform's fused attention kernel against
`chunked` and `xla`, and diffusers' Flux transformer with torch SDPA on the same GPU.

Rows: a mid Flux (real width, 4 + 8 blocks) and the deepest Flux that fits the device (19 + 38
blocks scaled down until the compiled step's peak fits), at 1024 and 2048 px (F16 VAE: 1024 and
4096 image tokens, 512 text tokens), bf16 compute, fp32 master weights, AdamW, remat "full", the
batch sized to 4096 image tokens. The frozen VAE, prior and text encoders are the demo's tiny random
ones (their cost is small next to Flux's). Attention: `cudnn` on NVIDIA GPUs, `splash` on TPUs,
always against `chunked` and `xla`.

MFU = model FLOPs / step time / the device's dense bf16 peak (`PEAK_BF16`). Model FLOPs are the
matrix work of the step's program traced with `xla` attention and no remat (so recomputation does
not count), each scanned block counted once per layer; XLA's own cost analysis of the compiled step
is shown beside it (it counts a scanned block once, whatever the depth). Rows are run most important
first (the mid step with the fused kernel) and skipped once `--budget_s` is spent, so one device
call of 8 minutes always returns a table.

    python bench/accelerator.py                # GPU / TPU: writes its docs/benchmarks.md section
    python bench/accelerator.py --smallest     # tiny shapes, any backend (this CPU): checks it runs
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # one process owns the device

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.extend import core as jex_core  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import markdown_table, median_time, write_section  # noqa: E402
from sga_jax import parallel  # noqa: E402
from sga_jax.models import flux  # noqa: E402
from sga_jax.train import loop, state as state_lib  # noqa: E402

# Dense bf16 matrix FLOP/s per device (vendor figures), matched as substrings of `device_kind` in
# this order (the first match wins: "TPU v5 lite" is v5e, "TPU v5" v5p).
PEAK_BF16 = {
    "H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12, "H800": 989.4e12, "B200": 2250e12,
    "A100": 312e12, "L40S": 362.05e12, "L4": 121e12, "A10G": 125e12,
    "TPU v6 lite": 918e12, "TPU v5 lite": 197e12, "TPU v5": 459e12, "TPU v4": 275e12,
}
# The platform's attention implementations, its fused kernel first (none on a CPU, where splash would
# only run in Pallas interpret mode, minutes per compile).
ATTENTION = {"gpu": ("cudnn", "chunked", "xla"), "tpu": ("splash", "chunked", "xla"), "cpu": ("chunked", "xla")}
IMAGE_TOKENS_PER_STEP = 4096
TORCH_RESERVE_S = 90.0  # of the time budget, kept for the PyTorch rows that run after JAX's


@dataclasses.dataclass(frozen=True)
class Scale:
    """The shapes of one run of the benchmark."""

    width: int
    heads: int
    axes_dim: tuple[int, int, int]
    mid: tuple[int, int]  # (double, single) blocks of the mid config
    deepest: int  # double blocks (with twice as many single blocks) to search downwards from
    sizes: tuple[int, ...]  # image side, px
    text_tokens: int
    long_edge: int  # SGA's aligned grid
    repeats: int


FULL = Scale(3072, 24, (16, 56, 56), mid=(4, 8), deepest=19, sizes=(1024, 2048), text_tokens=512, long_edge=32,
             repeats=5)
SMALLEST = Scale(128, 2, (16, 24, 24), mid=(1, 1), deepest=2, sizes=(128, 256), text_tokens=32, long_edge=4, repeats=2)


def peak_flops(device: jax.Device) -> float | None:
    """The device's dense bf16 peak from `PEAK_BF16`, None when unknown (CPUs)."""
    return next((peak for name, peak in PEAK_BF16.items() if name in device.device_kind), None)


def batch_size(scale: Scale, image: int) -> int:
    """Examples per step: `IMAGE_TOKENS_PER_STEP` image tokens (F16 VAE, 2 x 2 packing: 32 px a token
    side) at full scale, one example with `--smallest`."""
    return max(1, IMAGE_TOKENS_PER_STEP // (image // 32) ** 2) if scale is FULL else 1


def stage_config(scale: Scale, depth: tuple[int, int], image: int, attention: str, remat: str = "full"):
    """The demo's stage-2 config (tiny frozen networks) with a Flux of `scale`'s width and `depth`."""
    from configs.demo import get_config

    config = get_config()
    config.batch_size = batch_size(scale, image)
    config.mesh.data, config.mesh.fsdp = 1, 1
    config.precision.compute_dtype = "bfloat16"
    config.align.long_edge = scale.long_edge
    config.align.block = depth[0] * 12 // 19  # where the paper taps Flux.1's 19 double blocks
    config.text.t5_length = scale.text_tokens
    config.text.dtype = "bfloat16"
    model = config.model
    model.attention = attention
    model.frozen_dtype = "bfloat16"
    model.flux.remat = remat
    model.flux.overrides = {**model.flux.overrides, "hidden_size": scale.width, "num_heads": scale.heads,
                            "axes_dim": scale.axes_dim, "depth": depth[0], "depth_single_blocks": depth[1]}
    return config


def example_batch(run: loop.Run, image: int) -> dict[str, jax.Array]:
    """Random images and the demo tokenizers' ids for demo captions, on the run's batch sharding."""
    from sga_jax.stages.flux.task import _tokenizers, tokenize_captions

    size = run.config.batch_size
    tokens = tokenize_captions(_tokenizers(run.task.text_paths), run.config.text, ["a cup of coffee"] * size)
    images = np.random.default_rng(0).uniform(-1, 1, (size, image, image, 3)).astype(np.float32)
    return parallel.host_to_global({"image": images, **tokens}, run.mesh, run.rules)


def abstract_args(run: loop.Run, batch: dict) -> tuple:
    """ShapeDtypeStructs of (state, frozen, batch) with their shardings: lower without allocating."""
    state = state_lib.with_shardings(run.setup.abstract_state, run.setup.state_shardings)
    frozen = state_lib.with_shardings(run.setup.abstract_frozen, run.setup.frozen_shardings)
    return state, frozen, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), batch)


def matmul_flops(jaxpr: Any) -> float:
    """FLOPs of the matrix products and convolutions of a (closed) jaxpr, scan bodies times their
    length, the costliest branch of a cond, every other sub-program once."""
    total = 0.0
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        name, params = eqn.primitive.name, eqn.params
        out = eqn.outvars[0].aval.shape if eqn.outvars else ()
        if name == "dot_general":
            (contract, _), _ = params["dimension_numbers"]
            total += 2.0 * np.prod(out) * np.prod([eqn.invars[0].aval.shape[d] for d in contract])
        elif name == "conv_general_dilated":
            spec, kernel = params["dimension_numbers"].rhs_spec, eqn.invars[1].aval.shape
            total += 2.0 * np.prod(out) * kernel[spec[1]] * np.prod([kernel[d] for d in spec[2:]])
        elif name == "scan":
            total += params["length"] * matmul_flops(params["jaxpr"])
        elif name == "cond":
            total += max(matmul_flops(branch) for branch in params["branches"])
        else:
            total += sum(matmul_flops(sub) for sub in jex_core.jaxprs_in_params(params))
    return total


def model_flops(scale: Scale, depth: tuple[int, int], image: int) -> float:
    """Matrix FLOPs of one train step with `xla` attention and no remat (traced, not compiled)."""
    run = loop.build_run(stage_config(scale, depth, image, "xla", remat="none"), jax.devices()[:1])
    with parallel.activation_sharding(run.mesh, run.rules):
        traced = loop.jitted_step(run).trace(*abstract_args(run, example_batch(run, image)))
    return float(matmul_flops(traced.jaxpr))


@dataclasses.dataclass
class Compiled:
    run: loop.Run
    batch: dict
    executable: Any
    compile_s: float
    peak_bytes: int
    xla_flops: float


def compile_step(scale: Scale, depth: tuple[int, int], image: int, attention: str) -> Compiled:
    """Build the run and compile its jitted step from abstract arguments (nothing allocated yet)."""
    run = loop.build_run(stage_config(scale, depth, image, attention), jax.devices()[:1])
    batch = example_batch(run, image)
    start = time.perf_counter()
    with parallel.activation_sharding(run.mesh, run.rules):
        executable = loop.jitted_step(run).lower(*abstract_args(run, batch)).compile()
    compile_s = time.perf_counter() - start
    memory = executable.memory_analysis()
    peak = getattr(memory, "peak_memory_in_bytes", 0) or (
        memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes)
    cost = executable.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    return Compiled(run, batch, executable, compile_s, int(peak), float(cost.get("flops", 0.0)))


def usable_bytes(device: jax.Device) -> int | None:
    """What the allocator may hand out on `device` (None when the backend does not say: CPUs)."""
    stats = device.memory_stats()
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def time_step(compiled: Compiled, repeats: int) -> float:
    """Median seconds of the compiled step on freshly initialised state (the state is donated)."""
    run = compiled.run
    with parallel.activation_sharding(run.mesh, run.rules):
        holder = {"state": state_lib.init_state(run.task, run.config, run.optimizer, run.setup)}
        frozen = state_lib.init_frozen(run.task, run.config, run.setup)

    def one() -> None:
        holder["state"], metrics = compiled.executable(holder["state"], frozen, compiled.batch)
        jax.block_until_ready(metrics)

    return median_time(one, repeats=repeats, warmup=2)


def deepest_fitting(scale: Scale, image: int, attention: str, limit: int | None) -> tuple[tuple[int, int], Compiled]:
    """The deepest (double, single) Flux, 2 singles per double as Flux.1's 19 + 38, whose compiled
    step's peak fits `limit`; a first guess from the parameter count (about 20 bytes per parameter:
    fp32 weights, AdamW moments, gradients, a bf16 copy) saves compiles."""
    def params(double: int) -> int:
        return flux.param_count(flux.FluxConfig.dev(hidden_size=scale.width, num_heads=scale.heads, axes_dim=scale.axes_dim,
                                                    depth=double, depth_single_blocks=2 * double))

    double = scale.deepest
    while limit is not None and double > scale.mid[0] and 20 * params(double) > 0.9 * limit:
        double -= 1
    while True:
        compiled = compile_step(scale, (double, 2 * double), image, attention)
        print(f"deepest at {image}px: {double}+{2 * double} needs {compiled.peak_bytes / 2**30:.1f} GiB", flush=True)
        if limit is None or compiled.peak_bytes <= limit or double <= scale.mid[0]:
            return (double, 2 * double), compiled
        double -= 1


def torch_step_time(depth: tuple[int, int], image: int, scale: Scale, batch: int, repeats: int) -> float | str:
    """diffusers' FluxTransformer2DModel fwd + bwd + AdamW on CUDA: fp32 weights, bf16 autocast, SDPA
    attention, gradient checkpointing (remat "full"), the same token counts. Transformer only."""
    try:
        import torch
    except ImportError:
        return "n/a (no torch)"
    if not torch.cuda.is_available():
        return "n/a (no CUDA torch)"
    from diffusers import FluxTransformer2DModel

    torch.cuda.empty_cache()  # the previous row's model is gone; hand its blocks back
    with torch.device("cuda"):
        model = FluxTransformer2DModel(
            in_channels=64, num_layers=depth[0], num_single_layers=depth[1], attention_head_dim=scale.width // scale.heads,
            num_attention_heads=scale.heads, joint_attention_dim=32, pooled_projection_dim=32,
            guidance_embeds=True, axes_dims_rope=scale.axes_dim)
    model.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    side = image // 32  # F16 latent, 2 x 2 packing
    gen = torch.Generator("cuda").manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(batch, side * side, 64, device="cuda", generator=gen),
        encoder_hidden_states=torch.randn(batch, scale.text_tokens, 32, device="cuda", generator=gen),
        pooled_projections=torch.randn(batch, 32, device="cuda", generator=gen),
        timestep=torch.full((batch,), 0.5, device="cuda"), guidance=torch.full((batch,), 3.5, device="cuda"),
        img_ids=torch.zeros(side * side, 3, device="cuda"), txt_ids=torch.zeros(scale.text_tokens, 3, device="cuda"))

    def one() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**inputs).sample.float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    return median_time(one, repeats=repeats, warmup=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smallest", action="store_true", help="tiny shapes that run on any backend (this CPU)")
    parser.add_argument("--budget_s", type=float, default=330.0, help="start no new row after this many seconds")
    parser.add_argument("--part", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    scale = SMALLEST if args.smallest else FULL
    if args.part:
        Bench(scale, Path(args.state), args.deadline).run(args.part)
        return
    # JAX and PyTorch each take the whole device in a process of their own (JAX's allocator keeps
    # what it reserved), JAX first; the rows come back through a JSON state file.
    started = time.time()
    os.environ["SGA_DEMO_ASSETS"] = tempfile.mkdtemp(prefix="sga_bench_assets_")
    state = Path(tempfile.mkdtemp(prefix="sga_bench_accelerator_")) / "state.json"
    for part, deadline in (("jax", started + args.budget_s - TORCH_RESERVE_S), ("torch", started + args.budget_s)):
        command = [sys.executable, __file__, "--part", part, "--state", str(state), "--deadline", str(deadline)]
        subprocess.run(command + (["--smallest"] if args.smallest else []), check=False)
    write(json.loads(state.read_text()), scale, args.smallest, time.time() - started)


class Bench:
    """One part's rows, the depths found and the FLOPs counted, kept in the state file after every row."""

    def __init__(self, scale: Scale, state: Path, deadline: float):
        self.scale, self.path, self.deadline = scale, state, deadline
        self.device = jax.devices()[0]
        self.peak, self.limit = peak_flops(self.device), usable_bytes(self.device)
        self.started = time.perf_counter()
        saved = json.loads(state.read_text()) if state.exists() else {}
        self.rows: list[dict[str, Any]] = saved.get("rows", [])
        self.skipped: list[str] = saved.get("skipped", [])
        self.depths = {tuple(k.split("@")): tuple(v) for k, v in saved.get("depths", {}).items()}
        self.depths = {(name, int(image)): depth for (name, image), depth in self.depths.items()}
        self.depths.update({("mid", image): scale.mid for image in scale.sizes})
        self.flops: dict[str, float] = saved.get("flops", {})

    def run(self, part: str) -> None:
        sizes, (first, *others) = self.scale.sizes, ATTENTION[self.device.platform]
        if part == "jax":  # most important first: the mid step with the platform's fused kernel
            plan = [("mid", image, attention) for attention in (first, *others) for image in sizes]
            plan += [("deepest", image, attention) for attention in (first, *others) for image in sizes]
        else:
            plan = [(name, image, "torch") for name in ("mid", "deepest") for image in sizes]
        for config_name, image, attention in plan:
            if time.time() > self.deadline:
                self.skipped.append(f"{config_name} {image}px {attention}: time budget")
            else:
                try:
                    self.rows.append(self.torch_row(config_name, image) if attention == "torch"
                                     else self.jax_row(config_name, image, attention))
                    print(f"[{time.perf_counter() - self.started:6.1f}s] {self.rows[-1]}", flush=True)
                except Exception:  # one row failing (a kernel's limits, memory) must not lose the others
                    error = traceback.format_exc().strip().splitlines()[-1]
                    self.skipped.append(f"{config_name} {image}px {attention}: {error}")
                    traceback.print_exc()
            self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps({
            "rows": self.rows, "skipped": self.skipped, "flops": self.flops,
            "depths": {f"{name}@{image}": depth for (name, image), depth in self.depths.items()},
            "device": {"kind": self.device.device_kind, "platform": self.device.platform, "peak": self.peak},
        }, default=float))

    def mfu(self, key: str, seconds: Any) -> str:
        if not self.peak or not isinstance(seconds, float) or key not in self.flops:
            return "n/a"
        return f"{100 * self.flops[key] / seconds / self.peak:.1f}%"

    def jax_row(self, config_name: str, image: int, attention: str) -> dict[str, Any]:
        if (config_name, image) in self.depths:
            compiled = compile_step(self.scale, self.depths[config_name, image], image, attention)
        else:
            self.depths[config_name, image], compiled = deepest_fitting(self.scale, image, attention, self.limit)
        depth = self.depths[config_name, image]
        key = f"{depth[0]}+{depth[1]}@{image}"
        if key not in self.flops:
            self.flops[key] = model_flops(self.scale, depth, image)
        fits = self.limit is None or compiled.peak_bytes <= self.limit
        seconds = time_step(compiled, self.scale.repeats) if fits else "does not fit"
        params = flux.param_count(compiled.run.task.networks.flux)
        return {"config": f"{config_name} {depth[0]}+{depth[1]} ({params / 1e9:.3g}B params)",
                "batch": f"{compiled.run.config.batch_size}x{image}px", "attention": attention,
                "compile s": compiled.compile_s, "peak GiB": compiled.peak_bytes / 2**30, "step s": seconds,
                "model TFLOP": self.flops[key] / 1e12, "XLA cost TFLOP": compiled.xla_flops / 1e12,
                "MFU": self.mfu(key, seconds)}

    def torch_row(self, config_name: str, image: int) -> dict[str, Any]:
        if (config_name, image) not in self.depths:
            raise RuntimeError("the deepest fitting depth was not found (its JAX row did not run)")
        depth, batch = self.depths[config_name, image], batch_size(self.scale, image)
        seconds = torch_step_time(depth, image, self.scale, batch, self.scale.repeats)
        return {"config": f"{config_name} {depth[0]}+{depth[1]}", "batch": f"{batch}x{image}px",
                "attention": "diffusers + torch SDPA", "compile s": "", "peak GiB": "", "step s": seconds,
                "model TFLOP": "", "XLA cost TFLOP": "", "MFU": self.mfu(f"{depth[0]}+{depth[1]}@{image}", seconds)}


def write(state: dict[str, Any], scale: Scale, smallest: bool, seconds: float) -> None:
    """The run's section of docs/benchmarks.md."""
    device, rows, skipped = state["device"], state["rows"], state["skipped"]
    peak = device["peak"]
    where = (f"One {device['kind']} ({peak / 1e12:.0f} TFLOP/s dense bf16 peak)" if peak else
             f"One {device['platform']} device ({device['kind']}; no peak FLOP/s known, so no MFU)")
    note = (" Run with `--smallest` (tiny widths and images, so that it runs on this CPU and is known to work; "
            "no fused kernel on a CPU): the times say nothing about an accelerator." if smallest else "")
    body = (
        f"{where}, jax {jax.__version__}; {seconds:.0f} s end to end.{note} The stage-2 train step (flux_sga "
        "through the engine's jitted step: VAE encode, text encoders, Flux with the hidden tap, SGA head and "
        f"loss, AdamW) in bf16 with fp32 master weights and remat \"full\"; Flux width {scale.width} "
        f"({scale.heads} heads), {scale.text_tokens} text tokens; the frozen networks are the demo's tiny random "
        "ones. `model TFLOP`: matrix FLOPs of the step with `xla` attention and no remat, scanned blocks counted "
        "per layer; `XLA cost TFLOP`: the compiled step's cost analysis, which counts each scanned block once. "
        f"MFU = model FLOPs / step time / peak. Median of {scale.repeats} steps after 2 warm-ups. diffusers rows: "
        "the Flux transformer alone (fwd + bwd + fused AdamW, bf16 autocast, gradient checkpointing), its MFU "
        "with the JAX step's FLOPs.\n\n"
        + (markdown_table(rows) if rows else "No row finished.")
        + ("\n\nSkipped: " + "; ".join(skipped) if skipped else "")
    )
    write_section("accelerator", "Stage-2 step on one accelerator: fused attention and MFU", body,
                  {**state, "smallest": smallest, "seconds": seconds})


if __name__ == "__main__":
    main()
