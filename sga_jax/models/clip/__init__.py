"""CLIP text encoder (Flux's `text_encoder`, CLIP ViT-L/14): model, config and transformers converters."""

from sga_jax.models.clip.convert import FORMATS, infer_config, key_map, load, save
from sga_jax.models.clip.model import ClipTextConfig, ClipTextModel, eos_positions

__all__ = ["FORMATS", "ClipTextConfig", "ClipTextModel", "eos_positions", "infer_config", "key_map", "load", "save"]
