"""The toy task: a tiny residual MLP learning a frozen random teacher; the engine's test model.

python -m sga_jax.train --config configs/toy.py --workdir /tmp/toy --config.total_steps=20
"""

import ml_collections

from sga_jax.train.config import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Toy run; `arg` "sharded" uses a (data=2, fsdp=4) mesh (8 devices) instead of data=-1."""
    config = base_config()
    config.task = "toy"
    config.seed = 0
    config.total_steps = 8
    config.batch_size = 16
    config.checkpoint_every = 4
    config.log_every = 1
    config.sample_every = 4
    config.eval_every = 4
    if arg == "sharded":
        config.mesh.data, config.mesh.fsdp = 2, 4
    config.optimizer.learning_rate = 3e-3
    config.optimizer.schedule = "cosine"
    config.optimizer.warmup_steps = 2
    config.optimizer.ema_decay = 0.9
    config.toy = ml_collections.ConfigDict(
        {
            "features": 8,
            "width": 16,
            "hidden": 32,
            "depth": 2,
            "noise": 0.1,
            "activation_weight": 1e-3,
            "nan_batches": (),
        }
    )
    return config
