"""The embedded demo of stage 1 (`make demo`, first half of Algorithm 1): SGA fine-tuning of an F16
VAE at toy scale on this CPU.

Real images (scikit-image's bundled photographs; two others held out for the PSNR / SSIM / LPIPS
eval and the reconstruction grids), but tiny, RANDOMLY INITIALISED networks: the F16 VAE of
configs/demo.py (width 32, 4 levels, one res block each), a DINOv2 prior, a 2-layer PatchGAN, and
LPIPS with a random VGG16 trunk but the lpips package's real lin weights. The
VAE starts from random weights (there is no pre-trained tiny VAE), so the moment and
scale-consistency anchors hold it near its own start, as they hold a real run near the pre-trained
Flux VAE. Every term of the paper's stage 1 is on. Its export is the VAE that stage 2's demo trains
against (Makefile).

    python -m sga_jax.train --config configs/demo_vae.py --workdir out/demo_vae
"""

import os

import ml_collections

from configs.vae_sga import parse_row, stage_config
from sga_jax.demo import prepare_demo_assets, prepare_demo_lpips


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Tiny stage-1 run; `arg` is a row as in configs/vae_sga.py whose prior is DINOv2, the one the
    demo sizes (default: dinov2 with SGA; `vanilla` is DINOv2's vanilla row, its prior built for
    the probe)."""
    directory = os.environ.get("SGA_DEMO_ASSETS", "out/demo_assets")
    assets = prepare_demo_assets(directory)
    config = stage_config(parse_row(f"dinov2,{arg}" if arg else "dinov2"))
    config.total_steps = 60
    config.batch_size = 4
    config.checkpoint_every = 30
    config.log_every = 5
    config.sample_every = 30
    config.eval_every = 15
    config.mesh.data, config.mesh.fsdp = -1, 1
    opt = config.optimizer
    opt.learning_rate = 2e-3
    opt.warmup_steps = 5
    opt.groups.disc.learning_rate = 2e-3
    config.precision.compute_dtype = "float32"

    m = config.model
    m.frozen_dtype = "float32"
    m.vae.overrides = {"ch": 32, "ch_mult": (1, 1, 2, 2), "num_res_blocks": 1}
    m.prior.preset = "tiny"
    m.prior.overrides = {"patch_size": 14, "image_size": 56}
    m.disc.ndf, m.disc.n_layers = 16, 2
    m.lpips.trunk = str(prepare_demo_lpips(directory))  # random trunk, the lpips package's lin weights
    config.loss.gan.start = 30
    config.loss.moment.weight = 0.1
    config.loss.sc.weight = 0.1
    config.align.long_edge = 4  # 64 px crops: F16 latents 4 x 4, DINOv2 at 4 x 14 = 56 px

    config.eval.path = str(assets["heldout"])
    config.eval.batch_size, config.eval.size = 2, 64
    data = config.data
    data.path = str(assets["data"])
    data.buckets.fixed = "64x64"
    data.worker_count = 0
    data.index_threads = 2
    return config
