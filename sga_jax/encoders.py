"""Foundation features for alignment: one extractor over the three priors the paper uses.

`FoundationEncoder` takes images as the rest of the project holds them, (B, H, W, 3) in [-1, 1],
at any aspect ratio, and returns the prior's patch tokens on a grid whose long edge is
`long_edge` tokens (the short edge proportional, `sga_jax.align.grid_for_long_edge`, the same
grid the diffusion stage pools its generative features to):

1. resize (antialiased; bicubic for DINOv2 as its image processor, bilinear for DINOv3 and SAM2)
   to the grid times the prior's stride (DINOv2-B/14: 448 px for 32 tokens, DINOv3-B/16: 512,
   SAM2 Hiera: 1024, whose last stage has stride 32);
2. normalise with the model's mean and std (ImageNet statistics for all three);
3. forward the frozen prior; drop CLS and register tokens; reshape to (B, gh, gw, C);
4. `jax.lax.stop_gradient`, so no gradient reaches the prior.

It is an NNX module used functionally: `graphdef, state = nnx.split(encoder)` once, then
`nnx.merge(graphdef, state)(images)` inside the jitted train step, with `state` passed as an
argument (never captured). Grid sizes are static functions of the image shape.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sga_jax.align.pool import grid_for_long_edge
from sga_jax.models import dinov2, dinov3, sam2

KINDS = ("dinov2", "dinov3", "sam2")
_FAMILIES = {"dinov2": dinov2, "dinov3": dinov3, "sam2": sam2}
_MODEL_CLASSES = {"dinov2": dinov2.Dinov2, "dinov3": dinov3.Dinov3, "sam2": sam2.Sam2Hiera}
_RESIZE = {"dinov2": "cubic", "dinov3": "linear", "sam2": "linear"}


class FoundationEncoder(nnx.Module):
    """Frozen prior features on a long-edge grid: (B, H, W, 3) in [-1, 1] -> (B, gh, gw, C).

    Args:
      kind: "dinov2" | "dinov3" | "sam2".
      model: the matching model (`dinov2.Dinov2`, `dinov3.Dinov3`, `sam2.Sam2Hiera`), loaded or random.
      long_edge: tokens along the longer image side (32 in the paper's diffusion stage, 64 at 4K,
        16 for SAM2 in the VAE stage).
    """

    def __init__(self, kind: str, model: nnx.Module, *, long_edge: int = 32):
        if kind not in KINDS:
            raise ValueError(f"FoundationEncoder: kind {kind!r} is not one of {KINDS}")
        if not isinstance(model, _MODEL_CLASSES[kind]):
            raise ValueError(f"FoundationEncoder: kind {kind!r} needs a {_MODEL_CLASSES[kind].__name__}, got {type(model).__name__}")
        if int(long_edge) < 1:
            raise ValueError(f"FoundationEncoder: long_edge must be a positive int, got {long_edge}")
        self.kind = kind
        self.model = model
        self.long_edge = int(long_edge)
        config = model.config
        self.stride = config.stride if kind == "sam2" else config.patch_size
        self.prefix = 0 if kind == "sam2" else config.num_prefix_tokens
        family = _FAMILIES[kind]
        self.mean = tuple(family.IMAGE_MEAN)
        self.std = tuple(family.IMAGE_STD)

    @property
    def dim(self) -> int:
        """Channels of the output features."""
        config = self.model.config
        return config.embed_dim_per_stage[-1] if self.kind == "sam2" else config.hidden_size

    def grid(self, h_img: int, w_img: int) -> tuple[int, int]:
        """The output token grid for an image of h_img x w_img pixels: long edge = `long_edge`."""
        return grid_for_long_edge(h_img, w_img, self.long_edge)

    def input_size(self, h_img: int, w_img: int) -> tuple[int, int]:
        """The pixel size the prior sees: the grid times the prior's stride (a patch multiple)."""
        gh, gw = self.grid(h_img, w_img)
        return gh * self.stride, gw * self.stride

    def preprocess(self, images: jax.Array) -> jax.Array:
        """[-1, 1] images (B, H, W, 3) -> resized, normalised pixels at `input_size`, float32."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"FoundationEncoder expects images (B, H, W, 3), got shape {tuple(images.shape)}")
        batch, h, w, _ = images.shape
        size = self.input_size(h, w)
        x = (images.astype(jnp.float32) + 1.0) * 0.5
        if (h, w) != size:
            x = jax.image.resize(x, (batch, *size, 3), method=_RESIZE[self.kind], antialias=True)
        return (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Patch features (B, gh, gw, C), without CLS or registers, with no gradient into the prior."""
        batch, h, w, _ = images.shape
        gh, gw = self.grid(h, w)
        features = self.model(self.preprocess(images))
        if self.kind != "sam2":
            features = features[:, self.prefix :].reshape(batch, gh, gw, -1)
        return jax.lax.stop_gradient(features)

    @classmethod
    def from_pretrained(
        cls,
        kind: str,
        path: str | os.PathLike,
        *,
        long_edge: int = 32,
        dtype: str = "bfloat16",
        shardings: Any = None,
    ) -> "FoundationEncoder":
        """Load a Hugging Face checkpoint directory of the prior (`{dinov2,dinov3,sam2}.load`) with
        parameters and compute in `dtype` ("bfloat16" for frozen inference, or "float32")."""
        if kind not in KINDS:
            raise ValueError(f"FoundationEncoder: kind {kind!r} is not one of {KINDS}")
        model = _FAMILIES[kind].load(path, shardings=shardings, dtype=dtype, param_dtype=dtype)
        return cls(kind, model, long_edge=long_edge)
