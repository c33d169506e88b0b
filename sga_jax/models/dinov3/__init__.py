"""DINOv3 ViT: config, NNX model, Hugging Face weights in and out."""

from sga_jax.models.dinov3.convert import FORMATS, key_map, load, save, to_hf_config
from sga_jax.models.dinov3.model import IMAGE_MEAN, IMAGE_STD, Dinov3, Dinov3Config, rope_tables

__all__ = ["FORMATS", "Dinov3", "Dinov3Config", "IMAGE_MEAN", "IMAGE_STD", "key_map", "load", "rope_tables", "save", "to_hf_config"]
