"""CLIP score (Hessel et al. 2021, as the paper and torchmetrics report it): `100 * max(cos, 0)`
between a CLIP model's image embedding and its prompt's text embedding, per image.

Images are prepared as CLIP's image processor does, in JAX: the short side resized to the vision
tower's size (bicubic, antialiased: close to, not bit-equal with, PIL's), the centre cropped to a
square, CLIP's mean / std normalisation. Prompts are CLIP token ids (`sga_jax.text.tokenize`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sga_jax.models import clip


def clip_pixels(images: jax.Array, size: int) -> jax.Array:
    """[-1, 1] images (B, H, W, 3) -> CLIP-normalised (B, size, size, 3): short side to `size`,
    centre crop (the crop's origin rounded down, as transformers)."""
    batch, height, width, _ = images.shape
    scale = size / min(height, width)
    resized = (size, int(width * scale)) if height <= width else (int(height * scale), size)
    x = (images.astype(jnp.float32) + 1.0) * 0.5
    if resized != (height, width):
        x = jax.image.resize(x, (batch, *resized, 3), method="cubic", antialias=True)
    top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
    x = x[:, top : top + size, left : left + size]
    return (x - jnp.asarray(clip.IMAGE_MEAN)) / jnp.asarray(clip.IMAGE_STD)


@nnx.jit
def clip_score(model: clip.ClipModel, images: jax.Array, input_ids: jax.Array) -> jax.Array:
    """Per-image CLIP score (B,) of images (B, H, W, 3) in [-1, 1] against token ids (B, L)."""
    image = model.image_features(clip_pixels(images, model.vision_model.config.image_size))
    text = model.text_features(input_ids)
    normalise = lambda e: e / jnp.linalg.norm(e.astype(jnp.float32), axis=-1, keepdims=True)
    cosine = jnp.sum(normalise(image) * normalise(text), axis=-1)
    return 100.0 * jnp.maximum(cosine, 0.0)
