"""Stage 1 of the paper: SGA fine-tuning of the Flux VAE in its F16 form (Eq. 6-7, Tables 2 and 6).

    python -m sga_jax.train --config configs/vae_sga.py:ROW --workdir runs/NAME \
        --config.model.vae.weights=ckpt/vae --config.model.prior.weights=ckpt/sam2 \
        --config.model.lpips.trunk=vgg16-397923af.pth --config.model.lpips.lin=vgg.pth \
        --config.data.path=my_images/ --config.eval.path=heldout_images/

ROW is a comma-separated list (any order, all optional):
  dinov2 | dinov3 | sam2       the prior of the SGA term (default sam2, the paper's best)
  vanilla                      Table 6's fine-tuning baseline: the same recipe without SGA
  moment=f16 | f8_pooled       reference of the moment anchor (default f16: the pre-trained
                               weights in the F16 form; f8_pooled: the F8 encoder's moments pooled 2x2)
  parts=both | encoder | decoder   which half of the VAE trains (default both)
  weight=W                     sga_weight, the factor of the adaptive lambda_sga (default 0.1)
e.g. `configs/vae_sga.py:dinov2`, `configs/vae_sga.py:vanilla`, `configs/vae_sga.py:sam2,moment=f8_pooled`.

What the paper states: the Flux VAE fine-tuned for 2 epochs on 16 H100 GPUs, total batch 160,
AdamW, over 12M+ images; 512 px crops (F16 latents 32 x 32); DINOv2-B/14 at 448 px, DINOv3-B/16
at 512 px (32 x 32 tokens), SAM2-B/32 at 512 px (16 x 16, latents pooled to it); a conv head;
LPIPS and a patch GAN with taming's adaptive weight; an SGA weight from the clamped gradient ratio
at the encoder's last layer (VA-VAE). What its extracted text lost is set here as documented
choices (docs/reproduce.md): generator AdamW lr 1e-5, betas (0.9, 0.999), weight decay 1e-4 (SC-VAE's
fine-tuning); discriminator Adam-style betas (0.5, 0.9) (taming), lr 1e-4, no weight decay;
L1 reconstruction and LPIPS weight 1 (taming); disc_weight 0.5 and the discriminator from step
5001 (VA-VAE's F16 config); sga_weight 0.1 and clamp 1e8 (VA-VAE); moment and scale-consistency
weights 1 (Diffusion-4K weights its SC term 1); the decoder reconstructs a posterior sample (ldm),
the head sees the posterior mean. 2 epochs of 12M images at batch 160 = 150,000 steps.
"""

import ml_collections

from sga_jax.data.pipeline import default_data_config
from sga_jax.stages import probe
from sga_jax.train.config import base_config

PRIORS = ("dinov2", "dinov3", "sam2")
PRIOR_PRESETS = {"dinov2": "vitb14", "dinov3": "vitb16", "sam2": "base_plus"}
PRIOR_LONG_EDGE = {"dinov2": 32, "dinov3": 32, "sam2": 16}  # 512 px crops: 448 / 512 / 512 px prior inputs
OPTIONS = {"moment": ("f16", "f8_pooled"), "parts": ("both", "encoder", "decoder")}


def parse_row(arg: str | None) -> dict:
    """'dinov2,moment=f8_pooled' -> {"prior": "dinov2", "method": "sga", "moment": "f8_pooled", ...};
    errors name the token."""
    row = {"prior": "sam2", "method": "sga", "moment": "f16", "parts": "both", "weight": 0.1}
    for token in filter(None, (t.strip() for t in (arg or "").split(","))):
        key, _, value = token.partition("=")
        if token in PRIORS:
            row["prior"] = token
        elif token == "vanilla":
            row["method"] = "none"
        elif key in OPTIONS and value in OPTIONS[key]:
            row[key] = value
        elif key == "weight" and value:
            row["weight"] = float(value)
        else:
            raise ValueError(f"config argument {token!r}: expected a prior {PRIORS}, vanilla, "
                             + ", ".join(f"{k}={'|'.join(v)}" for k, v in OPTIONS.items()) + " or weight=W")
    return row


def stage_config(row: dict) -> ml_collections.ConfigDict:
    """The VAE-stage config for one row of the paper, at full scale (the Flux VAE, 512 px crops)."""
    config = base_config()
    config.task = "vae_sga"
    config.seed = 0
    config.total_steps = 150_000
    config.batch_size = 160
    config.checkpoint_every = 2000
    config.log_every = 20
    config.sample_every = 2000
    config.eval_every = 2000  # held-out PSNR / SSIM / LPIPS and the feature-drift probe (config.probe)
    config.mesh.data, config.mesh.fsdp = -1, 1  # 84M + 3M parameters: data parallel
    opt = config.optimizer
    opt.learning_rate = 1e-5
    opt.warmup_steps = 1000
    opt.weight_decay = 1e-4
    opt.groups = {"disc": {"learning_rate": 1e-4, "b1": 0.5, "b2": 0.9, "weight_decay": 0.0}}
    config.precision.compute_dtype = "bfloat16"

    config.model = ml_collections.ConfigDict({
        "frozen_dtype": "bfloat16",
        "vae": {"weights": "", "preset": "flux_f16", "overrides": {}, "f16": True, "remat": "none"},
        "prior": {"kind": row["prior"], "weights": "", "preset": PRIOR_PRESETS[row["prior"]], "overrides": {}},
        "lpips": {"trunk": "", "lin": ""},  # torchvision vgg16-397923af.pth + the lpips package's vgg.pth
        "disc": {"weights": "", "ndf": 64, "n_layers": 3},  # taming's NLayerDiscriminator
    })
    config.loss = ml_collections.ConfigDict({
        "rec": "l1",
        "lpips_weight": 1.0,
        "decode_latent": "sample",
        "parts": row["parts"],
        "gan": {"weight": 0.5, "start": 5001, "loss": "hinge", "clamp": 1e4},
        "moment": {"weight": 1.0, "reference": row["moment"]},
        "sc": {"weight": 1.0},
    })
    config.align = ml_collections.ConfigDict({
        "method": row["method"],
        "weight": row["weight"],
        "adaptive": True,
        "clamp": 1e8,
        "latent": "mean",
        "long_edge": PRIOR_LONG_EDGE[row["prior"]],
        "head_kernel": 3,
        "sga_method": "auto",
    })
    config.eval = ml_collections.ConfigDict({"path": "", "batch_size": 8, "size": 512})  # path "": data.path
    config.probe = probe.default_config()
    config.data = default_data_config()
    config.data.global_batch_size = config.get_ref("batch_size")
    data = config.data
    data.buckets.fixed = "512x512"
    data.random_crop = True
    data.flip = True
    data.remainder = "drop"
    data.worker_count = 8
    return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """ml_collections entry point: `configs/vae_sga.py[:ROW]`."""
    return stage_config(parse_row(arg))
