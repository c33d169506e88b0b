"""Stage-2 train-step time on this CPU: SGA against no alignment (overhead in %), and against
iREPA and REPA at the same place, in one run; and the feature-drift probe's cost per evaluation
against one SGA train step, at the demo's network and at a mid-sized one.

A small Flux (width 256, 2 + 2 blocks; the demo's is width 64), the F16 VAE, a small DINOv2 prior
and tiny text encoders (all random; the cost structure is what is measured), 512 x 512 images,
batch 2. The step is the jitted value-and-gradient of the task's loss plus an AdamW update, as in
training; the probe's evaluation is `FeatureProbe.measure` (one Flux forward on the probe batch,
the host-to-device copy of its reference, and the jitted drift metrics).

`--probe`: only the probe's section (its own section of docs/benchmarks.md).

`--lora`: instead, LoRA rank 16 against full fine-tuning through the engine's own jitted step (one
device, the same network at 512 x 512) with its compiled memory; and the per-device memory of
Flux.1-dev + SGA with LoRA rank 64 at a 1024 px bucket on one device from the dry run's state
estimate plus an ahead-of-time compile of the real step for this CPU (no parameter is allocated),
against one 80 GB GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report import interleaved_medians, markdown_table, median_time, write_section  # noqa: E402

METHODS = ("none", "sga", "irepa", "repa")
GIB = 2**30
GPU_BYTES = 80 * 10**9  # one 80 GB H100 / A100
NETWORKS = {"demo": {}, "mid": {"hidden_size": 256, "num_heads": 4, "axes_dim": (16, 24, 24)}}


def stage_config(method: str, network: str, image: int, assets: str):
    """The demo config with `method`, the Flux overrides of `network` and one image size."""
    os.environ["SGA_DEMO_ASSETS"] = assets
    from configs.demo import get_config

    config = get_config()
    config.align.method = method
    config.align.long_edge = 8
    config.model.flux.overrides = {**config.model.flux.overrides, **NETWORKS[network]}
    config.data.buckets.fixed = f"{image}x{image}"
    return config


def step_for(config, image: int):
    """A jitted train step (a function that runs it once), its trainable parameter count, the task
    and its (trainable, frozen) modules."""
    from sga_jax.stages.flux.task import _tokenizers, tokenize_captions
    from sga_jax.train.task import get_task

    task = get_task(config.task, config)
    trainable, frozen = nnx.eval_shape(lambda: task.build(config, nnx.Rngs(0)))
    graph, _, _ = nnx.split(trainable, nnx.Param, ...)
    f_graph = nnx.graphdef(frozen)
    params, rest = jax.jit(lambda: nnx.split(task.build(config, nnx.Rngs(0))[0], nnx.Param, ...)[1:])()
    frozen_state = jax.jit(lambda: nnx.state(task.build(config, nnx.Rngs(0))[1]))()
    optimizer = optax.adamw(1e-4)
    opt_state = optimizer.init(params)
    tokens = tokenize_captions(_tokenizers(task.text_paths), config.text, ["a cat", "a rocket"])
    batch = {"image": jax.random.uniform(jax.random.key(0), (2, image, image, 3), minval=-1, maxval=1),
             **{k: jax.numpy.asarray(v) for k, v in tokens.items()}}

    @jax.jit
    def step(params, opt_state, rest, frozen_state, batch, rng):
        def loss(params):
            return task.loss(nnx.merge(graph, params, rest), nnx.merge(f_graph, frozen_state), batch, rng)[0]

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    args = (params, opt_state, rest, frozen_state, batch, jax.random.key(1))
    modules = (nnx.merge(graph, params, rest), nnx.merge(f_graph, frozen_state))
    return lambda: jax.block_until_ready(step(*args)), sum(x.size for x in jax.tree.leaves(params)), task, modules


def probe_for(task, modules, workdir: str):
    """One probe evaluation (the probe started at step 0 in `workdir`, as a fresh run does)."""
    trainable, frozen = modules
    task.probe.start(trainable, frozen, 0, workdir, jax.random.key(0))
    return lambda: task.probe.measure(trainable)


def engine_step(config):
    """The engine's own train step for `config` on one device: (run it once, compiled memory
    analysis, the run, the state's per-device memory estimate)."""
    from sga_jax import parallel
    from sga_jax.train import loop, state as state_lib

    run = loop.build_run(config, jax.devices()[:1])
    with parallel.activation_sharding(run.mesh, run.rules):
        state = state_lib.init_state(run.task, config, run.optimizer, run.setup)
        frozen = state_lib.init_frozen(run.task, config, run.setup)
        batch = next(run.task.batches(config, run.mesh, seed=0))
        arrays = {k: v for k, v in batch.items() if isinstance(v, jax.Array)}
        compiled = loop.jitted_step(run).lower(state, frozen, arrays).compile()
    holder = {"state": state}

    def one() -> None:
        with parallel.activation_sharding(run.mesh, run.rules):
            holder["state"], metrics = compiled(holder["state"], frozen, arrays)
        jax.block_until_ready(metrics)

    return one, compiled.memory_analysis(), run, state_lib.memory_estimate(run.setup)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def lora_vs_full(image: int, repeats: int, assets: str) -> tuple[list[dict], dict]:
    """LoRA rank 16 against full fine-tuning of the width-256 Flux (SGA at block 1), side by side."""
    os.environ["SGA_DEMO_ASSETS"] = assets
    from configs.demo import get_config

    rows, numbers = [], {}
    for name, rank in (("full fine-tuning", 0), ("LoRA rank 16", 16)):
        config = get_config()
        config.align.long_edge = 8
        config.model.flux.overrides = {**config.model.flux.overrides, **NETWORKS["mid"]}
        config.data.buckets.fixed = f"{image}x{image}"
        config.mesh.data = 1
        config.lora.rank = rank
        config.lora.base_dtype = "float32"  # same base dtype as the full run: the difference is what trains
        fn, memory, run, estimate = engine_step(config)
        seconds = median_time(fn, repeats=repeats, warmup=1)
        count = sum(int(x.size) for x in jax.tree.leaves(run.setup.abstract_state.params))
        numbers[name] = {"step_s": seconds, "trainable": count, "argument_bytes": memory.argument_size_in_bytes,
                         "temp_bytes": memory.temp_size_in_bytes, "params_bytes": estimate["params"],
                         "optimizer_bytes": estimate["optimizer"], "frozen_bytes": estimate["frozen"]}
        rows.append({"run": name, "trainable params": f"{count:,}", "step s (median)": seconds,
                     "params + AdamW MiB": _mib(estimate["params"] + estimate["optimizer"]),
                     "frozen MiB": _mib(estimate["frozen"]), "step arguments MiB": _mib(memory.argument_size_in_bytes),
                     "step temporaries MiB": _mib(memory.temp_size_in_bytes)})
        print(rows[-1], flush=True)
    return rows, numbers


def flux_dev_lora_memory(rank: int = 64, image: int = 1024) -> dict:
    """Flux.1-dev + SGA (DINOv2-B, block 12) + LoRA `rank`, batch 1 at `image` x `image`, captions from
    a cache, on one device: the state estimate of --dry_run and the compiled step's memory analysis
    on this CPU (abstract arguments: nothing is allocated)."""
    from configs.flux_sga import get_config
    from sga_jax import parallel
    from sga_jax.train import loop, state as state_lib

    config = get_config(f"dinov2,lora={rank}")
    config.batch_size = 1
    config.mesh.data = config.mesh.fsdp = 1
    config.data.caption_cache = "captions/"  # the one-GPU recipe: T5-XXL and CLIP encode once, beforehand
    run = loop.build_run(config, jax.devices()[:1])
    estimate = state_lib.memory_estimate(run.setup)
    setup = run.setup
    state = state_lib.with_shardings(setup.abstract_state, setup.state_shardings)
    frozen = state_lib.with_shardings(setup.abstract_frozen, setup.frozen_shardings)
    batch_sharding = parallel.batch_sharding(run.mesh, run.rules)
    nets = run.task.networks
    shapes = {"image": ((1, image, image, 3), jnp.float32), "txt": ((1, config.text.t5_length, nets.flux.context_in_dim),
              jnp.bfloat16), "vec": ((1, nets.flux.vec_in_dim), jnp.bfloat16), "valid": ((1,), jnp.bool_)}
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding) for k, (shape, dtype) in shapes.items()}
    start = time.perf_counter()
    with parallel.activation_sharding(run.mesh, run.rules):
        compiled = loop.jitted_step(run).lower(state, frozen, batch).compile()
    memory = compiled.memory_analysis()
    count = sum(int(x.size) for x in jax.tree.leaves(setup.abstract_state.params))
    base = sum(int(x.size) for x in jax.tree.leaves(setup.abstract_frozen.trainable))
    return {"rank": rank, "image": image, "trainable": count, "base_params": base, "estimate": estimate,
            "argument_bytes": memory.argument_size_in_bytes, "output_bytes": memory.output_size_in_bytes,
            "alias_bytes": memory.alias_size_in_bytes, "temp_bytes": memory.temp_size_in_bytes,
            "compile_s": time.perf_counter() - start}


def lora_main(image: int, repeats: int, assets: str) -> None:
    """The --lora sections: LoRA vs full fine-tuning, and Flux.1-dev + SGA + LoRA 64 on one 80 GB GPU."""
    rows, numbers = lora_vs_full(image, repeats, assets)
    full, lora = numbers["full fine-tuning"], numbers["LoRA rank 16"]
    dev = flux_dev_lora_memory()
    est = dev["estimate"]
    peak = dev["argument_bytes"] + dev["temp_bytes"] + dev["output_bytes"] - dev["alias_bytes"]
    verdict = "fits" if peak <= 0.9 * GPU_BYTES else "does not fit"
    dev_rows = [
        {"part": f"LoRA adapters + SGA head ({dev['trainable']:,} params, fp32)", "GiB": est["params"] / GIB},
        {"part": "AdamW moments", "GiB": est["optimizer"] / GIB},
        {"part": f"frozen: Flux.1-dev base ({dev['base_params'] / 1e9:.2f} B, bf16) + F16 VAE + DINOv2-B (bf16)",
         "GiB": est["frozen"] / GIB},
        {"part": "state total (the --dry_run estimate)", "GiB": est["total"] / GIB},
        {"part": "compiled step: arguments (CPU compile, exact: follows from the shardings)",
         "GiB": dev["argument_bytes"] / GIB},
        {"part": "compiled step: temporaries (CPU compile; see the caveat)", "GiB": dev["temp_bytes"] / GIB},
        {"part": "peak estimate = arguments + temporaries + outputs - aliased", "GiB": peak / GIB},
    ]
    body = (
        f"The engine's jitted train step (value + gradient + AdamW, state donated) of flux_sga, SGA at block 1, "
        f"Flux width 256 with 2 + 2 blocks, F16 VAE, DINOv2-style prior, tiny text encoders, {image} x {image}, "
        f"batch 2, fp32, one CPU device, median of {repeats}; LoRA on diffusers' default targets (both streams' "
        "attention q/k/v/out and MLPs, the single blocks' q/k/v), base in fp32 like the full run. Memory: the "
        "state's per-device estimate and XLA's compiled memory analysis of the same step.\n\n" + markdown_table(rows)
        + f"\n\nLoRA / full step time = {lora['step_s'] / full['step_s']:.2f}; trainable parameters "
        f"{lora['trainable'] / full['trainable']:.1%} of full; parameters + AdamW "
        f"{(lora['params_bytes'] + lora['optimizer_bytes']) / (full['params_bytes'] + full['optimizer_bytes']):.1%}. "
        "The step still runs the whole network forward and backward (activations' gradients flow through the "
        "frozen base to the adapters and the tapped block), so the time saved is the weight gradients of the "
        "base and the optimizer update over it, not the forward.\n\n"
        f"### Flux.1-dev + SGA + LoRA rank {dev['rank']} on one 80 GB GPU at {dev['image']} px\n\n"
        f"`configs/flux_sga.py:dinov2,lora={dev['rank']}` with `batch_size=1`, one device, captions from a cache "
        "(no T5-XXL / CLIP in memory), `remat=full`, chunked attention, bf16 compute. The state from "
        "`--dry_run`'s estimate, the activations from an ahead-of-time compile of the real step "
        f"for this CPU (compiled in {dev['compile_s']:.0f} s, abstract arguments). LABELLED CPU ESTIMATE: XLA:CPU "
        "upcasts bf16 matmuls to f32 and has no rematerialisation pass or GPU scheduler, so its temporaries are a "
        "rough proxy (reference/PLANNER.md measured CPU 1.3x GPU on a 12B DiT step); `python -m sga_jax.plan` "
        "compiles the same step for a GPU target.\n\n"
        + markdown_table(dev_rows)
        + f"\n\nVerdict from the CPU estimate: {verdict} on one 80 GB GPU (peak estimate {peak / GIB:.1f} GiB against "
        f"{0.9 * GPU_BYTES / GIB:.1f} GiB usable: 90% of {GPU_BYTES / GIB:.1f} GiB with `XLA_PYTHON_CLIENT_MEM_FRACTION=0.9`)."
    )
    write_section("train_step_lora", "Stage-2 train step: LoRA against full fine-tuning, Flux.1-dev LoRA memory", body,
                  {"mid": numbers, "flux_dev_lora": dev})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lora", action="store_true", help="LoRA against full fine-tuning, and Flux.1-dev LoRA memory")
    parser.add_argument("--probe", action="store_true", help="only the feature-drift probe's cost per evaluation")
    args = parser.parse_args()
    assets = tempfile.mkdtemp(prefix="sga_bench_assets_")
    if args.lora:
        lora_main(args.image, args.repeats, assets)
        return
    if not args.probe:
        alignment_main(args.image, args.repeats, assets)
    probe_main(args.image, args.repeats, assets)


def alignment_main(image: int, repeats: int, assets: str) -> None:
    """SGA against no alignment, iREPA and REPA: section "train_step"."""
    rows, times = [], {}
    for method in METHODS:
        fn, count, _, _ = step_for(stage_config(method, "mid", image, assets), image)
        times[method] = median_time(fn, repeats=repeats, warmup=1)
        rows.append({"alignment": method, "trainable params": count, "step s (median)": times[method]})
        print(rows[-1], flush=True)
    for row in rows:
        method = row["alignment"]
        row["vs none"] = f"{100 * (times[method] / times['none'] - 1):+.1f}%"
        row["vs SGA"] = f"{times[method] / times['sga']:.2f}x"
    body = (
        f"Train step (value + gradient + AdamW) of the flux_sga task at {image} x {image}, batch 2, "
        "F16 VAE, DINOv2-style prior, Flux width 256 with 2 + 2 blocks, random weights, fp32, median of "
        f"{repeats}. SGA: conv 3x3 stride 2 head, pooled to the prior's 8-token long edge; iREPA: conv 1x1 "
        "stride 1, same pooling; REPA: 3-layer MLP (2048 wide) per token, same pooling.\n\n" + markdown_table(rows)
        + f"\n\nSGA overhead over no alignment: {100 * (times['sga'] / times['none'] - 1):+.1f}%; "
        f"SGA / iREPA = {times['sga'] / times['irepa']:.2f}, SGA / REPA = {times['sga'] / times['repa']:.2f}."
    )
    write_section("train_step", "Stage-2 train step: alignment overhead", body, {"times_s": times, "image": image})


def probe_main(image: int, repeats: int, assets: str) -> None:
    """The feature-drift probe's evaluation against one SGA step: section "train_step_probe"."""
    probe_rows, probe_times = [], {}
    for network in NETWORKS:
        config = stage_config("sga", network, image, assets)
        fn, count, task, modules = step_for(config, image)
        evaluate = probe_for(task, modules, tempfile.mkdtemp(prefix="sga_bench_probe_"))
        _, medians = interleaved_medians({"step": fn, "probe": evaluate}, repeats=2 * repeats)
        step_s, probe_s = medians["step"], medians["probe"]
        probe_times[network] = {"step_s": step_s, "probe_s": probe_s}
        width = config.model.flux.overrides["hidden_size"]
        probe_rows.append({"network": f"{network} (width {width})", "trainable params": count,
                           "SGA step s": step_s, "probe eval s": probe_s, "probe / step": f"{100 * probe_s / step_s:.1f}%"})
        print(probe_rows[-1], flush=True)
    body = (
        f"One probe evaluation (`FeatureProbe.measure`: Flux forward with the hidden tap on the probe batch of 2 "
        f"at {image} x {image}, the reference copied from the host, jitted drift metrics: "
        "Procrustes SVD, Grams, spectra, principal angles) against one SGA train step of the same network at "
        f"batch 2, timed alternately (median of {2 * repeats} rounds each). The frozen inputs (VAE latents, "
        "text embeddings, prior tokens) are computed once per start, not per evaluation. Goal: under 25% of a "
        "step.\n\n" + markdown_table(probe_rows)
    )
    write_section("train_step_probe", "Stage-2 train step: the feature-drift probe's cost per evaluation", body,
                  {"image": image, "probe": probe_times}, command="python bench/train_step.py [--probe]")


if __name__ == "__main__":
    main()
