"""Stage 2 of the paper: SGA fine-tuning of Flux.1-dev at 2K-4K (Eq. 8).

    python -m sga_jax.train --config configs/flux_sga.py:ROW --workdir runs/NAME \
        --config.model.flux.weights=/ckpt/flux1-dev.safetensors ...

ROW is a comma-separated list of the paper's settings (any order, all optional):
  dinov2 | dinov3 | sam2         the prior (default dinov2)
  sga | irepa | repa | vanilla   the alignment at the tapped block (default sga; vanilla = none)
  fm | wlf                       objective: flow matching or wavelet latent fine-tuning (default wlf)
  layer=K                        double block whose image stream is aligned (default 12; 8, 19 in Table 5)
  long_edge=L                    aligned grid's long edge in tokens (default 32; 64 at 4K, Table 7)
  weight=W                       lambda of the alignment term (default 0.5)
  lora=R                         train LoRA adapters of rank R instead of all of Flux (default 0: off;
                                 learning rate 1e-4, as diffusers' Flux LoRA scripts)
e.g. `configs/flux_sga.py:sam2,layer=12,long_edge=64`, `configs/flux_sga.py:vanilla,fm`,
`configs/flux_sga.py:lora=64` (one GPU: see docs/reproduce.md).

`config.lora`: rank, alpha (0: alpha = rank, scale 1), dropout, targets (regular expressions on
Flux's layer names, default diffusers' Flux LoRA scripts' modules: both streams' attention q/k/v/out
and MLPs, the single blocks' q/k/v), base_dtype (the frozen base weights' storage dtype).

Attention kernels: `--config.model.attention=cudnn --config.model.prior.attention=cudnn` on NVIDIA
GPUs (cuDNN's fused flash attention), `=splash` on TPUs (the Pallas splash kernel; its tile sizes are
`config.model.splash_block_sizes`); the default `chunked` runs anywhere in plain XLA.

Values the paper's extracted text lost (its learning rate, weight decay, lambda) are set to
documented choices here: AdamW lr 1e-5, weight decay 1e-4, lambda 0.5 (REPA's weight), WLF
sub-band weights (1, 2, 2, 2). See docs/reproduce.md.
"""

import dataclasses

import ml_collections

from sga_jax.data.pipeline import default_data_config
from sga_jax.models.flux.lora import DEFAULT_TARGETS
from sga_jax.models.nn import SplashBlockSizes
from sga_jax.stages import probe
from sga_jax.text import default_text_config
from sga_jax.train.config import base_config

PRIORS = ("dinov2", "dinov3", "sam2")
METHODS = {"sga": "sga", "irepa": "irepa", "repa": "repa", "vanilla": "none"}
PRIOR_PRESETS = {"dinov2": "vitb14", "dinov3": "vitb16", "sam2": "base_plus"}


def parse_row(arg: str | None) -> dict:
    """'dinov3,layer=8,wlf' -> {"prior": "dinov3", "layer": 8, "objective": "wlf"}; errors name the token."""
    row = {"prior": "dinov2", "method": "sga", "objective": "wlf", "layer": 12, "long_edge": 32, "weight": 0.5,
           "lora": 0}
    for token in filter(None, (t.strip() for t in (arg or "").split(","))):
        if "=" in token:
            key, value = token.split("=", 1)
            if key not in ("layer", "long_edge", "weight", "lora"):
                raise ValueError(f"config argument {token!r}: unknown key {key!r} (layer, long_edge, weight, lora)")
            row[key] = float(value) if key == "weight" else int(value)
        elif token in PRIORS:
            row["prior"] = token
        elif token in METHODS:
            row["method"] = METHODS[token]
        elif token in ("fm", "wlf"):
            row["objective"] = token
        else:
            raise ValueError(f"config argument {token!r}: expected a prior {PRIORS}, a method {tuple(METHODS)}, "
                             "fm | wlf, or layer= / long_edge= / weight= / lora=")
    return row


def stage_config(row: dict) -> ml_collections.ConfigDict:
    """The diffusion-stage config for one row of the paper, at full scale (Flux.1-dev)."""
    config = base_config()
    config.task = "flux_sga"
    config.seed = 0
    config.total_steps = 20_000
    config.batch_size = 32
    config.checkpoint_every = 1000
    config.log_every = 10
    config.sample_every = 1000
    config.eval_every = 500  # the feature-drift probe (config.probe; docs/geometry.md)
    config.mesh.data, config.mesh.fsdp = 1, -1  # ZeRO-style: parameters and moments sharded over all devices
    config.optimizer.learning_rate = 1e-4 if row["lora"] else 1e-5
    config.optimizer.warmup_steps = 500
    config.optimizer.weight_decay = 1e-4
    config.precision.compute_dtype = "bfloat16"
    config.guidance = 3.5  # constant guidance-embedding input while training (Flux.1-dev)

    config.model = ml_collections.ConfigDict({
        # Flux's attention: "cudnn" on NVIDIA GPUs (cuDNN's fused flash attention), "splash" on TPUs
        # (the Pallas kernel; tile sizes below, MaxText's v5e / v5p defaults); "chunked" anywhere
        # (plain XLA, memory linear in the token count); "xla" materialises the logits.
        "attention": "chunked",
        "splash_block_sizes": dataclasses.asdict(SplashBlockSizes()),
        "frozen_dtype": "bfloat16",
        "flux": {"weights": "", "preset": "dev", "overrides": {}, "remat": "full"},
        "vae": {"weights": "", "preset": "flux_f16", "overrides": {}, "f16": True},  # F8 weights run as F16 too
        "prior": {"kind": row["prior"], "weights": "", "preset": PRIOR_PRESETS[row["prior"]], "overrides": {},
                  "attention": "xla"},  # "cudnn" on NVIDIA GPUs, "splash" on TPUs
    })
    config.text = default_text_config()  # a Flux.1 folder's text_encoder(_2) / tokenizer(_2), or a caption cache
    config.objective = ml_collections.ConfigDict({
        "kind": row["objective"],
        "timesteps": "logit_normal",
        "logit_mean": 0.0,
        "logit_std": 1.0,
        "shift": True,
        "wlf_weights": (1.0, 2.0, 2.0, 2.0),  # LL, LH, HL, HH
    })
    config.align = ml_collections.ConfigDict({
        "method": row["method"],
        "block": row["layer"],
        "weight": row["weight"],
        "long_edge": row["long_edge"],
        "head_kernel": 3,
        "head_stride": 2,
        "sga_method": "auto",
        "irepa_alpha": 0.6,
        "irepa_kernel": 1,
        "repa_hidden": 2048,
    })
    config.lora = ml_collections.ConfigDict({
        "rank": row["lora"],  # 0: full fine-tuning
        "alpha": 0.0,  # 0: alpha = rank (scale 1, as diffusers' Flux LoRA scripts)
        "dropout": 0.0,
        "targets": DEFAULT_TARGETS,
        "base_dtype": "bfloat16",  # the frozen base weights ("float32" for an fp32 base)
    })
    config.probe = probe.default_config()
    config.sample = ml_collections.ConfigDict({
        "prompts": ("A majestic snow-capped mountain range at sunrise, ultra detailed",
                    "A close-up portrait of an old fisherman, weathered skin, 4K photograph"),
        "steps": 50,
        "guidance": 7.0,  # 7.0 at 2K, 5.0 at 4K (paper)
        "height": 2048,
        "width": 2048,
    })
    config.data = default_data_config()
    config.data.global_batch_size = config.get_ref("batch_size")
    data = config.data
    data.buckets.max_long_edge = 4096
    data.buckets.pixel_budget = 2048 * 2048
    data.buckets.multiple = 64  # F16 latents pack 2x2: sides multiple of 32 px; 64 keeps the head's stride exact
    data.random_crop = False
    data.worker_count = 8
    return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """ml_collections entry point: `configs/flux_sga.py[:ROW]`."""
    return stage_config(parse_row(arg))
