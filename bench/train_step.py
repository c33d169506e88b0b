"""Stage-2 train-step time on this CPU: SGA against no alignment (overhead in %), and against
iREPA and REPA at the same place, in one run.

A small Flux (width 256, 2 + 2 blocks), the F16 VAE, a small DINOv2 prior and tiny text encoders
(all random; the cost structure is what is measured), 512 x 512 images, batch 2. The step is the
jitted value-and-gradient of the task's loss plus an AdamW update, as in training.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import jax
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report import markdown_table, median_time, write_section  # noqa: E402

METHODS = ("none", "sga", "irepa", "repa")


def step_for(method: str, image: int, assets: str):
    """A jitted train step and its arguments for one alignment method."""
    os.environ["SGA_DEMO_ASSETS"] = assets
    from configs.demo import get_config
    from sga_jax.stages.flux.task import _tokenizers, tokenize_captions
    from sga_jax.train.task import get_task

    config = get_config()
    config.align.method = method
    config.align.long_edge = 8
    config.model.flux.overrides = {**config.model.flux.overrides, "hidden_size": 256, "num_heads": 4,
                                   "axes_dim": (16, 24, 24)}
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
    return lambda: jax.block_until_ready(step(*args)), sum(x.size for x in jax.tree.leaves(params))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    assets = tempfile.mkdtemp(prefix="sga_bench_assets_")
    rows, times = [], {}
    for method in METHODS:
        fn, count = step_for(method, args.image, assets)
        times[method] = median_time(fn, repeats=args.repeats, warmup=1)
        rows.append({"alignment": method, "trainable params": count, "step s (median)": times[method]})
        print(rows[-1], flush=True)
    for row in rows:
        method = row["alignment"]
        row["vs none"] = f"{100 * (times[method] / times['none'] - 1):+.1f}%"
        row["vs SGA"] = f"{times[method] / times['sga']:.2f}x"
    body = (
        f"Train step (value + gradient + AdamW) of the flux_sga task at {args.image} x {args.image}, batch 2, "
        "F16 VAE, DINOv2-style prior, Flux width 256 with 2 + 2 blocks, random weights, fp32, median of "
        f"{args.repeats}. SGA: conv 3x3 stride 2 head, pooled to the prior's 8-token long edge; iREPA: conv 1x1 "
        "stride 1, same pooling; REPA: 3-layer MLP (2048 wide) per token, same pooling.\n\n" + markdown_table(rows)
        + f"\n\nSGA overhead over no alignment: {100 * (times['sga'] / times['none'] - 1):+.1f}%; "
        f"SGA / iREPA = {times['sga'] / times['irepa']:.2f}, SGA / REPA = {times['sga'] / times['repa']:.2f}."
    )
    write_section("train_step", "Stage-2 train step: alignment overhead", body, {"times_s": times, "image": args.image})


if __name__ == "__main__":
    main()
