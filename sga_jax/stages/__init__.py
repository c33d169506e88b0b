"""The paper's training stages, each a Task (`sga_jax.train.task`) that the engine runs.

- `vae/`: stage 1, SGA fine-tuning of the F16 Flux VAE with a patch GAN (task `vae_sga`)
- `flux/`: stage 2, SGA fine-tuning of Flux (task `flux_sga`)
- `common.py`: what the stages share (model configs from config sections, the priors, loss weights)

The engine (`sga_jax.train`) owns the mesh, state, optimizer, checkpoints and logging; a stage
owns its models, losses, data and hooks.
"""
