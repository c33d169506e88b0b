"""CLIP (Flux's `text_encoder`, CLIP ViT-L/14; and full CLIP models for CLIP score): models,
configs and transformers converters."""

from sga_jax.models.clip.convert import FORMATS, infer_config, key_map, load, load_clip_model, save, vision_key_map
from sga_jax.models.clip.model import (
    IMAGE_MEAN,
    IMAGE_STD,
    ClipModel,
    ClipTextConfig,
    ClipTextModel,
    ClipVisionConfig,
    ClipVisionModel,
    eos_positions,
)

__all__ = [
    "FORMATS",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "ClipModel",
    "ClipTextConfig",
    "ClipTextModel",
    "ClipVisionConfig",
    "ClipVisionModel",
    "eos_positions",
    "infer_config",
    "key_map",
    "load",
    "load_clip_model",
    "save",
    "vision_key_map",
]
