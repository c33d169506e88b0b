"""The LAION improved aesthetic predictor (the paper's "Aesthetics"): a CLIP ViT-L/14 image embedding,
L2-normalised, into five linear layers 768-1024-128-64-16-1 with no activations between them
(their dropouts are inactive at evaluation).

Its weights (`sac+logos+ava1-l14-linearMSE.pth`, keys `layers.{0,2,4,6,7}.*`) load as published, through
the safe pickle reader of `sga_jax.weights`, or from a safetensors file with the same keys.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from sga_jax import weights as W
from sga_jax.metrics.clip_score import clip_pixels
from sga_jax.models import clip
from sga_jax.models import nn

WIDTHS = (1024, 128, 64, 16, 1)
CHECKPOINT_LAYERS = (0, 2, 4, 6, 7)  # nn.Sequential indices: dropouts sit between the linears


class AestheticPredictor(nnx.Module):
    """Normalised image embeddings (B, input_size) -> aesthetic scores (B,)."""

    def __init__(self, input_size: int = 768, *, rngs: nnx.Rngs):
        widths = (input_size, *WIDTHS)
        self.fc0, self.fc1, self.fc2, self.fc3, self.fc4 = (
            nn.linear(a, b, (None, None), rngs=rngs) for a, b in zip(widths[:-1], widths[1:])
        )

    def __call__(self, embeddings: jax.Array) -> jax.Array:
        x = embeddings.astype(jnp.float32)
        for layer in (self.fc0, self.fc1, self.fc2, self.fc3, self.fc4):
            x = layer(x)
        return x[:, 0]


def load_aesthetic_predictor(path: str | os.PathLike) -> AestheticPredictor:
    """Load the predictor from LAION's .pth (or a safetensors file with its keys, `layers.0.weight`, ...)."""
    reader = W.CheckpointReader(path)
    first = f"layers.{CHECKPOINT_LAYERS[0]}.weight"
    if first not in reader:
        raise W.CheckpointError(f"{path}: not an aesthetic predictor (no {first!r})")
    key_map = {}
    for i, index in enumerate(CHECKPOINT_LAYERS):
        key_map[f"fc{i}.kernel"] = W.rule(f"layers.{index}.weight", transform=W.LINEAR)
        key_map[f"fc{i}.bias"] = W.rule(f"layers.{index}.bias")
    return W.load_module(lambda: AestheticPredictor(reader.shape(first)[1], rngs=nn.construction_rngs(0)), reader, key_map)


@nnx.jit
def aesthetic_score(clip_model: clip.ClipModel, predictor: AestheticPredictor, images: jax.Array) -> jax.Array:
    """Aesthetic score (B,) of [-1, 1] images (B, H, W, 3), through CLIP's image preprocessing and
    the normalised projected image embedding (CLIP ViT-L/14 for the published predictor)."""
    embedding = clip_model.image_features(clip_pixels(images, clip_model.vision_model.config.image_size))
    embedding = embedding.astype(jnp.float32)
    return predictor(embedding / jnp.linalg.norm(embedding, axis=-1, keepdims=True))
