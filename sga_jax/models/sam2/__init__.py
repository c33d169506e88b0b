"""SAM2's image-encoder trunk (Hiera): config, NNX model, Hugging Face weights in and out."""

from sga_jax.models.sam2.convert import FORMATS, key_map, load, save, to_hf_config
from sga_jax.models.sam2.model import IMAGE_MEAN, IMAGE_STD, Sam2Hiera, Sam2HieraConfig

__all__ = ["FORMATS", "IMAGE_MEAN", "IMAGE_STD", "Sam2Hiera", "Sam2HieraConfig", "key_map", "load", "save", "to_hf_config"]
