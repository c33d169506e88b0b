"""Flux.1 transformer (BFL's MMDiT): config, NNX model, and weights both ways (BFL / diffusers)."""

from sga_jax.models.flux.convert import (
    FORMATS,
    abstract_model,
    bfl_key_map,
    convert_file,
    diffusers_key_map,
    infer_config,
    key_map,
    load,
    open_checkpoint,
    param_count,
    save,
    shardings_for,
)
from sga_jax.models.flux.model import Flux, FluxConfig, timestep_embedding

__all__ = [
    "FORMATS",
    "Flux",
    "FluxConfig",
    "abstract_model",
    "bfl_key_map",
    "convert_file",
    "diffusers_key_map",
    "infer_config",
    "key_map",
    "load",
    "open_checkpoint",
    "param_count",
    "save",
    "shardings_for",
    "timestep_embedding",
]
