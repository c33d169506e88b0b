"""T5 encoder (Flux's `text_encoder_2`, T5 v1.1 XXL): model, config and transformers converters."""

from sga_jax.models.t5.convert import FORMATS, infer_config, key_map, load, save
from sga_jax.models.t5.model import T5Config, T5EncoderModel, relative_position_buckets

__all__ = ["FORMATS", "T5Config", "T5EncoderModel", "infer_config", "key_map", "load", "relative_position_buckets", "save"]
