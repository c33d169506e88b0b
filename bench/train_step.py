"""Stage-2 train-step time on this CPU: SGA against no alignment (overhead in %), and against
iREPA and REPA at the same place, in one run; and the feature-drift probe's cost per evaluation
against one SGA train step, at the demo's network and at a mid-sized one.

A small Flux (width 256, 2 + 2 blocks; the demo's is width 64), the F16 VAE, a small DINOv2 prior
and tiny text encoders (all random; the cost structure is what is measured), 512 x 512 images,
batch 2. The step is the jitted value-and-gradient of the task's loss plus an AdamW update, as in
training; the probe's evaluation is `FeatureProbe.measure` (one Flux forward on the probe batch,
the host-to-device copies of its inputs and reference, and the jitted drift metrics).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report import markdown_table, median_time, write_section  # noqa: E402

METHODS = ("none", "sga", "irepa", "repa")
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


def interleaved_medians(a, b, rounds: int) -> tuple[float, float]:
    """Median times of `a()` and `b()` timed alternately after one warm-up each, so that the
    shared CPU's load changes hit both alike."""
    a(), b()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for fn, out in ((a, times[0]), (b, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    assets = tempfile.mkdtemp(prefix="sga_bench_assets_")
    rows, times = [], {}
    for method in METHODS:
        fn, count, _, _ = step_for(stage_config(method, "mid", args.image, assets), args.image)
        times[method] = median_time(fn, repeats=args.repeats, warmup=1)
        rows.append({"alignment": method, "trainable params": count, "step s (median)": times[method]})
        print(rows[-1], flush=True)
    for row in rows:
        method = row["alignment"]
        row["vs none"] = f"{100 * (times[method] / times['none'] - 1):+.1f}%"
        row["vs SGA"] = f"{times[method] / times['sga']:.2f}x"
    probe_rows, probe_times = [], {}
    for network in NETWORKS:
        config = stage_config("sga", network, args.image, assets)
        fn, count, task, modules = step_for(config, args.image)
        evaluate = probe_for(task, modules, tempfile.mkdtemp(prefix="sga_bench_probe_"))
        step_s, probe_s = interleaved_medians(fn, evaluate, rounds=2 * args.repeats)
        probe_times[network] = {"step_s": step_s, "probe_s": probe_s}
        width = config.model.flux.overrides["hidden_size"]
        probe_rows.append({"network": f"{network} (width {width})", "trainable params": count,
                           "SGA step s": step_s, "probe eval s": probe_s, "probe / step": f"{100 * probe_s / step_s:.1f}%"})
        print(probe_rows[-1], flush=True)
    body = (
        f"Train step (value + gradient + AdamW) of the flux_sga task at {args.image} x {args.image}, batch 2, "
        "F16 VAE, DINOv2-style prior, Flux width 256 with 2 + 2 blocks, random weights, fp32, median of "
        f"{args.repeats}. SGA: conv 3x3 stride 2 head, pooled to the prior's 8-token long edge; iREPA: conv 1x1 "
        "stride 1, same pooling; REPA: 3-layer MLP (2048 wide) per token, same pooling.\n\n" + markdown_table(rows)
        + f"\n\nSGA overhead over no alignment: {100 * (times['sga'] / times['none'] - 1):+.1f}%; "
        f"SGA / iREPA = {times['sga'] / times['irepa']:.2f}, SGA / REPA = {times['sga'] / times['repa']:.2f}.\n\n"
        "### Feature-drift probe: cost per evaluation\n\n"
        f"One probe evaluation (`FeatureProbe.measure`: Flux forward with the hidden tap on the probe batch of 2 "
        f"at {args.image} x {args.image}, inputs and reference copied from the host, jitted drift metrics: "
        "Procrustes SVD, Grams, spectra, principal angles) against one SGA train step of the same network at "
        f"batch 2, timed alternately (median of {2 * args.repeats} rounds each). The frozen inputs (VAE latents, "
        "text embeddings, prior tokens) are computed once per start, not per evaluation. Goal: under 25% of a "
        "step.\n\n" + markdown_table(probe_rows)
    )
    write_section("train_step", "Stage-2 train step: alignment overhead and the feature-drift probe", body,
                  {"times_s": times, "image": args.image, "probe": probe_times})


if __name__ == "__main__":
    main()
