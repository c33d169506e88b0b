"""Flux's VAE in Flax NNX (F8 and the F16 form of the SGA paper), with BFL / diffusers conversion.

    from sga_jax.models import vae
    ae = vae.load("ae.safetensors", f16=True)     # or a diffusers AutoencoderKL dir / file
    z = ae.encode(images)                          # (B, H/16, W/16, 16), scaled and shifted
    images = ae.decode(z)
    vae.save(ae, "out_dir", format="diffusers")
"""

from sga_jax.models.vae.convert import (
    detect_format,
    diffusers_config,
    infer_config,
    key_map,
    load,
    save,
    shardings_for,
)
from sga_jax.models.vae.model import (
    AttnBlock,
    AutoEncoder,
    AutoEncoderConfig,
    Decoder,
    Downsample,
    Encoder,
    ResnetBlock,
    Upsample,
    posterior_moments,
    posterior_sample,
    upsample_nearest,
)
from sga_jax.models.vae.tiling import tiled_map

__all__ = [
    "AttnBlock",
    "AutoEncoder",
    "AutoEncoderConfig",
    "Decoder",
    "Downsample",
    "Encoder",
    "ResnetBlock",
    "Upsample",
    "detect_format",
    "diffusers_config",
    "infer_config",
    "key_map",
    "load",
    "posterior_moments",
    "posterior_sample",
    "save",
    "shardings_for",
    "tiled_map",
    "upsample_nearest",
]
