"""Stage 2 of the paper: SGA fine-tuning of Flux (task `flux_sga`); see `task.py`."""

from sga_jax.stages.flux.task import FluxSGATask

__all__ = ["FluxSGATask"]
