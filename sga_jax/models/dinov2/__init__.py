"""DINOv2 (with and without registers): config, NNX model, Hugging Face weights in and out."""

from sga_jax.models.dinov2.convert import FORMATS, key_map, load, save, to_hf_config
from sga_jax.models.dinov2.model import IMAGE_MEAN, IMAGE_STD, Dinov2, Dinov2Config

__all__ = ["FORMATS", "Dinov2", "Dinov2Config", "IMAGE_MEAN", "IMAGE_STD", "key_map", "load", "save", "to_hf_config"]
