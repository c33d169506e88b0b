"""taming's PatchGAN discriminator (NLayerDiscriminator) in Flax NNX, and its checkpoint names."""

from sga_jax.models.discriminator.convert import infer_config, key_map, load
from sga_jax.models.discriminator.model import DiscriminatorBlock, NLayerDiscriminator, PatchGANConfig

__all__ = ["DiscriminatorBlock", "NLayerDiscriminator", "PatchGANConfig", "infer_config", "key_map", "load"]
