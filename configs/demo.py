"""The embedded demo of stage 2 (`make demo`): SGA fine-tuning at toy scale on this CPU.

Real images (scikit-image's bundled photographs, captions in sga_jax/demo.py), but tiny,
RANDOMLY INITIALISED networks: Flux (2 + 2 blocks, width 64), an F16 VAE, a DINOv2 prior and
T5 / CLIP text encoders. The run shows the whole machinery (bucketed data, frozen VAE / prior /
text encoders, hidden tap, conv head, SGA + WLF, sharded jitted steps, checkpoints, TensorBoard,
samples); its samples are not meant to look like anything. Point configs/flux_sga.py at converted
weights for a real run (README).

    python -m sga_jax.train --config configs/demo.py --workdir out/demo
"""

import os

import ml_collections

from configs.flux_sga import parse_row, stage_config
from sga_jax.demo import prepare_demo_assets


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Tiny stage-2 run; `arg` is a row as in configs/flux_sga.py (default: dinov2, SGA, WLF)."""
    assets = prepare_demo_assets(os.environ.get("SGA_DEMO_ASSETS", "out/demo_assets"))
    row = parse_row(arg or "dinov2,sga,wlf,layer=1,long_edge=8")
    config = stage_config(row)
    config.total_steps = 60
    config.batch_size = 2
    config.checkpoint_every = 30
    config.log_every = 2
    config.sample_every = 30
    config.eval_every = 10  # the feature-drift probe
    config.mesh.data, config.mesh.fsdp = -1, 1
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 4
    config.precision.compute_dtype = "float32"

    m = config.model
    m.frozen_dtype = "float32"
    m.flux.preset = "dev"
    m.flux.remat = "none"
    m.flux.overrides = {"hidden_size": 64, "num_heads": 2, "axes_dim": (8, 12, 12), "depth": 2,
                        "depth_single_blocks": 2, "context_in_dim": 32, "vec_in_dim": 32}
    m.vae.preset = "flux_f16"
    m.vae.overrides = {"ch": 32, "ch_mult": (1, 1, 2, 2), "num_res_blocks": 1}
    m.prior.preset = "tiny"
    m.prior.overrides = {"patch_size": 14, "image_size": 112}
    config.text.root = str(assets["text"])
    config.text.dtype = "float32"
    config.text.t5_length = 32
    config.text.clip_length = 16

    config.sample.prompts = ("a cup of coffee on a wooden table", "a rocket under a blue sky")
    config.sample.steps = 8
    config.sample.guidance = 3.5
    config.sample.height = config.sample.width = 256

    data = config.data
    data.path = str(assets["data"])
    data.buckets.max_long_edge = 640
    data.buckets.pixel_budget = 512 * 384
    data.buckets.multiple = 64
    data.worker_count = 0
    data.index_threads = 2
    return config
