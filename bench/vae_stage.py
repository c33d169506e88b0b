"""Stage-1 train step on this CPU: the JAX step (engine's jitted step: every loss term, both
players, both optimizers) against the same step in PyTorch (diffusers AutoencoderKL in the F16
form + lpips' LPIPS-VGG16 + taming's PatchGAN + a transformers DINOv2 prior, the same losses and
adaptive weights by autograd, AdamW for the VAE and head, Adam-style for the discriminator), at
512 px for a tiny and a mid VAE width; SGA's overhead over the vanilla step; what the GAN costs in
one step against taming's alternating steps (PyTorch); and the compiled memory of the step at the
Flux VAE's full width at 512 and 1024 px.

All networks are random (the cost structure is what is measured). Both frameworks use every core.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT), str(ROOT / "tests")]
runpy.run_path(str(ROOT / "tests" / "stubs" / "sitecustomize.py"))  # lpips' torchvision beside the CPU torch wheel

from report import markdown_table, median_time, write_section  # noqa: E402

WIDTHS = {"tiny": {"ch": 32, "ch_mult": (1, 1, 2, 2), "num_res_blocks": 1},
          "mid": {"ch": 64, "ch_mult": (1, 2, 4, 4), "num_res_blocks": 2}}
PRIOR = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128, "patch_size": 16}
DISC = {"ndf": 64, "n_layers": 3}


def stage_config(width: dict, image: int, batch: int, **overrides):
    """The demo stage-1 config at `width`, `image` px, with the bench's prior and discriminator."""
    from configs.demo_vae import get_config

    config = get_config("dinov2")
    config.model.vae.overrides = width
    ours = {k: v for k, v in PRIOR.items() if k != "intermediate_size"}  # transformers' name -> our mlp_ratio
    config.model.prior.overrides = {**ours, "mlp_ratio": PRIOR["intermediate_size"] / PRIOR["hidden_size"],
                                    "image_size": image}
    config.model.disc.ndf, config.model.disc.n_layers = DISC["ndf"], DISC["n_layers"]
    config.data.buckets.fixed = f"{image}x{image}"
    config.align.long_edge = image // 16
    config.batch_size = batch
    config.loss.gan.start = 0
    config.loss.decode_latent = "mean"  # as the PyTorch step
    config.update_from_flattened_dict(overrides)
    return config


def jax_step(config):
    """(step thunk, compiled step) of the engine's jitted step on one batch of random images."""
    from sga_jax import parallel
    from sga_jax.train import loop, state as state_lib

    run = loop.build_run(config, jax.devices()[:1])
    with parallel.activation_sharding(run.mesh, run.rules):
        state = state_lib.init_state(run.task, config, run.optimizer, run.setup)
        frozen = state_lib.init_frozen(run.task, config, run.setup)
        compiled = loop.jitted_step(run).lower(state, frozen, _batch(config)).compile()
    batch = {k: jnp.asarray(v) for k, v in _batch(config).items()}
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], frozen, batch)
        jax.block_until_ready(metrics)

    return step, compiled


def _batch(config) -> dict:
    size = int(config.data.buckets.fixed.split("x")[0])
    images = np.random.default_rng(0).uniform(-1, 1, (config.batch_size, size, size, 3)).astype(np.float32)
    return {"image": images, "valid": np.ones((config.batch_size,), bool)}


def torch_step(width: dict, image: int, batch: int, *, alternating: bool = False):
    """The same step in PyTorch; `alternating` runs taming's two steps (the discriminator's with a
    second VAE forward) instead of one shared forward."""
    import lpips
    import torch
    import transformers
    from diffusers import AutoencoderKL
    from taming.modules.discriminator.model import NLayerDiscriminator

    from stage1_reference import Stage1Loss

    levels = len(width["ch_mult"])
    ae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                       up_block_types=("UpDecoderBlock2D",) * levels,
                       block_out_channels=tuple(width["ch"] * m for m in width["ch_mult"]),
                       layers_per_block=width["num_res_blocks"], latent_channels=16, norm_num_groups=32,
                       use_quant_conv=False, use_post_quant_conv=False)
    disc = NLayerDiscriminator(input_nc=3, **DISC)
    perceptual = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    dino = transformers.Dinov2Model(transformers.Dinov2Config(**PRIOR, image_size=image)).eval()
    head = torch.nn.Conv2d(16, PRIOR["hidden_size"], 3, padding=1)
    loss = Stage1Loss(ae, disc, perceptual, lambda pixels: dino(pixel_values=pixels).last_hidden_state[:, 1:], head)
    opt_g = torch.optim.AdamW(list(loss.student.parameters()) + list(head.parameters()), lr=1e-5, weight_decay=1e-4)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-4, betas=(0.5, 0.9), weight_decay=0.0)
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (batch, 3, image, image)).astype(np.float32))

    def step():
        terms = loss(x)
        opt_g.zero_grad()
        terms["generator"].backward()
        opt_g.step()
        opt_d.zero_grad()
        if alternating:
            with torch.no_grad():
                recon = loss.student.decode(loss.student.encode(x).latent_dist.mean).sample
            from taming.modules.losses.vqperceptual import hinge_d_loss

            hinge_d_loss(disc(x), disc(recon)).backward()
        else:
            terms["loss_d"].backward()
        opt_d.step()

    return step


def compiled_memory(image: int, batch: int) -> dict:
    """XLA's memory analysis of the step at the Flux VAE's full width (SAM2-B+ prior, LPIPS-VGG16,
    taming's default PatchGAN, bf16 compute), compiled for this CPU without running it."""
    from configs.vae_sga import get_config
    from sga_jax import parallel
    from sga_jax.train import loop, state as state_lib

    config = get_config("sam2")
    config.batch_size = batch
    config.data.buckets.fixed = f"{image}x{image}"
    config.align.long_edge = image // 32
    run = loop.build_run(config, jax.devices()[:1])
    with parallel.activation_sharding(run.mesh, run.rules):
        state = state_lib.with_shardings(run.setup.abstract_state, run.setup.state_shardings)
        frozen = state_lib.with_shardings(run.setup.abstract_frozen, run.setup.frozen_shardings)
        batch_spec = {"image": jax.ShapeDtypeStruct((batch, image, image, 3), jnp.float32),
                      "valid": jax.ShapeDtypeStruct((batch,), jnp.bool_)}
        analysis = loop.jitted_step(run).lower(state, frozen, batch_spec).compile().memory_analysis()
    gib = 2.0**30
    return {"image": image, "batch": batch, "arguments GiB": analysis.argument_size_in_bytes / gib,
            "temporaries GiB": analysis.temp_size_in_bytes / gib, "outputs GiB": analysis.output_size_in_bytes / gib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("SGA_DEMO_ASSETS", tempfile.mkdtemp(prefix="sga_bench_assets_"))
    import torch

    rows, record = [], {"image": args.image, "batch": args.batch, "torch_threads": torch.get_num_threads()}
    for name, width in WIDTHS.items():
        jax_fn, _ = jax_step(stage_config(width, args.image, args.batch))
        torch_fn = torch_step(width, args.image, args.batch)
        t_jax = median_time(jax_fn, repeats=args.repeats)
        t_torch = median_time(torch_fn, repeats=args.repeats)
        rows.append({"VAE width": f"{name} (ch {width['ch']}, mult {width['ch_mult']})", "JAX s": t_jax,
                     "PyTorch s": t_torch, "JAX / PyTorch": t_jax / t_torch})
        print(rows[-1], flush=True)
    record["steps"] = rows

    tiny = WIDTHS["tiny"]
    variants = {"SGA (full step)": {}, "vanilla (no SGA)": {"align.method": "none"},
                "no GAN": {"loss.gan.weight": 0.0}}
    times = {}
    for label, overrides in variants.items():
        fn, _ = jax_step(stage_config(tiny, args.image, args.batch, **overrides))
        times[label] = median_time(fn, repeats=args.repeats)
    one = median_time(torch_step(tiny, args.image, args.batch), repeats=args.repeats)
    alternating = median_time(torch_step(tiny, args.image, args.batch, alternating=True), repeats=args.repeats)
    overheads = [
        {"comparison": "SGA over vanilla (JAX)", "s": times["SGA (full step)"], "vs": times["vanilla (no SGA)"]},
        {"comparison": "GAN in one step over no GAN (JAX)", "s": times["SGA (full step)"], "vs": times["no GAN"]},
        {"comparison": "taming's alternating steps over one step (PyTorch)", "s": alternating, "vs": one},
    ]
    for row in overheads:
        row["overhead"] = f"{100 * (row['s'] / row['vs'] - 1):+.1f}%"
    record["overheads"] = overheads
    memory = [compiled_memory(512, 1), compiled_memory(1024, 1)]
    record["memory"] = memory

    body = (
        f"Batch {args.batch}, {args.image} x {args.image} px, every term on (L1 + LPIPS, PatchGAN with "
        f"lambda_adv, moment anchor, scale consistency, SGA with lambda_sga), both players updated; medians of "
        f"{args.repeats} steps after a warm-up; PyTorch with {torch.get_num_threads()} threads.\n\n"
        + markdown_table(rows)
        + "\n\nOverheads (tiny width):\n\n" + markdown_table(overheads)
        + "\n\nCompiled memory of one step at the Flux VAE's width (SAM2-B+ prior, LPIPS-VGG16, taming's "
        "PatchGAN, bf16 compute, fp32 masters, one device; XLA:CPU's analysis):\n\n" + markdown_table(memory)
    )
    write_section("vae_stage", "Stage-1 train step (VAE + LPIPS + PatchGAN + SGA)", body, record)


if __name__ == "__main__":
    main()
