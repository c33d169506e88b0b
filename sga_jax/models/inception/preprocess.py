"""How images become the FID Inception's input, by protocol name. FID values are only comparable
under one protocol: the resize to 299 pixels and the value range differ between implementations.

* `"diffusion-4k"` (the default): the protocol of the SGA paper's numbers. The SGA authors'
  evaluation code is Diffusion-4K's `generate_and_eval_fid.py` (same group; the SGA repository has
  no code), which feeds uint8 images to torchmetrics' `FrechetInceptionDistance(normalize=False)`
  pinned at torchmetrics 1.5.1 / torch-fidelity 0.3.0. There (torchmetrics <= 1.7) the images go
  through torch-fidelity's TensorFlow-1 bilinear resize to 299 x 299 (no half-pixel offset, no
  antialias) on uint8-range values, then `(x - 128) / 128`. (Their `fid_preprocess` first brings
  every image to the evaluation size, a short-side resize and center crop: `python -m
  sga_jax.evaluate --size`, `sga_jax.evaluate.images.square`.)
* `"pytorch-fid"`: mseitzer/pytorch-fid: images in [0, 1] resized by `F.interpolate(299,
  bilinear, align_corners=False)` without antialias, then `2x - 1`.

Both take images (B, H, W, 3) in [-1, 1] (the project's convention). Under "diffusion-4k" they
are first quantised to the 8-bit values they would have as image files, so images decoded in
memory and images read from PNG files give the same FID.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sga_jax.models import nn

PROTOCOLS = ("diffusion-4k", "pytorch-fid")
DEFAULT_PROTOCOL = "diffusion-4k"
INPUT_SIZE = 299


def check_protocol(protocol: str) -> None:
    """Raise a ValueError for an unknown protocol name."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown FID protocol {protocol!r}; expected one of {PROTOCOLS}")


def to_uint8_levels(images: jax.Array) -> jax.Array:
    """[-1, 1] images -> float32 values in {0, ..., 255} (the 8-bit pixels of the saved image)."""
    return jnp.round(jnp.clip((images.astype(jnp.float32) + 1.0) * 127.5, 0.0, 255.0))


def inception_input(images: jax.Array, protocol: str = DEFAULT_PROTOCOL) -> jax.Array:
    """Images (B, H, W, 3) in [-1, 1] -> the Inception input (B, 299, 299, 3) under `protocol`
    (see the module docstring). Sizes are static: each input size compiles once under jit."""
    check_protocol(protocol)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected RGB images (B, H, W, 3), got shape {tuple(images.shape)}")
    size = (INPUT_SIZE, INPUT_SIZE)
    if protocol == "pytorch-fid":
        unit = (images.astype(jnp.float32) + 1.0) * 0.5
        return 2.0 * nn.resize_torch(unit, size, "bilinear") - 1.0
    return (nn.resize_tf1_bilinear(to_uint8_levels(images), size) - 128.0) / 128.0
