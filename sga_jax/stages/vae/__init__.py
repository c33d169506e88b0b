"""Stage 1 of the paper: SGA fine-tuning of the Flux VAE in its F16 form (task `vae_sga`); see
`task.py` for the step and `losses.py` for its terms."""

from sga_jax.stages.vae.task import VAESGATask

__all__ = ["VAESGATask"]
