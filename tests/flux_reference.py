"""Tiny diffusers Flux transformers and inputs for the Flux and sampler tests (CPU, fp32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import FluxTransformer2DModel
from torch_reference import randomize_, to_numpy

TINY = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=3,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=12,
    axes_dims_rope=(4, 6, 6),
)
BATCH, GRID_H, GRID_W, TXT_LEN = 2, 3, 4, 5  # a non-square 3 x 4 token grid (6 x 8 latent)


def tiny_reference(guidance: bool, seed: int = 0) -> FluxTransformer2DModel:
    """A tiny diffusers Flux with every parameter (biases, norm scales) randomised."""
    torch.manual_seed(seed)
    return randomize_(FluxTransformer2DModel(guidance_embeds=guidance, **TINY), seed=seed, scale=0.2)


def save_reference(model: FluxTransformer2DModel, directory: Path) -> Path:
    """Save as diffusers does on disk (config.json + diffusion_pytorch_model.safetensors)."""
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def grid_ids(h: int, w: int) -> np.ndarray:
    """BFL's image ids written out here: (h * w, 3) of (0, row, col)."""
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1] = np.arange(h)[:, None]
    ids[..., 2] = np.arange(w)[None, :]
    return ids.reshape(-1, 3)


def inputs(seed: int = 0) -> dict[str, np.ndarray]:
    """Random model inputs in BFL's argument names (ids without a batch axis)."""
    rng = np.random.default_rng(seed)
    return dict(
        img=rng.normal(size=(BATCH, GRID_H * GRID_W, TINY["in_channels"])).astype(np.float32),
        img_ids=grid_ids(GRID_H, GRID_W),
        txt=rng.normal(size=(BATCH, TXT_LEN, TINY["joint_attention_dim"])).astype(np.float32),
        txt_ids=np.zeros((TXT_LEN, 3), np.float32),
        timesteps=np.array([0.3, 0.85], np.float32),
        y=rng.normal(size=(BATCH, TINY["pooled_projection_dim"])).astype(np.float32),
        guidance=np.array([3.5, 2.0], np.float32),
    )


def reference_forward(model: FluxTransformer2DModel, x: dict[str, np.ndarray], guidance: bool) -> np.ndarray:
    """diffusers' forward on the same inputs (renamed to its argument names)."""
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    with torch.no_grad():
        out = model(
            hidden_states=t["img"],
            encoder_hidden_states=t["txt"],
            pooled_projections=t["y"],
            timestep=t["timesteps"],
            img_ids=t["img_ids"],
            txt_ids=t["txt_ids"],
            guidance=t["guidance"] if guidance else None,
        ).sample
    return to_numpy(out)


def ours_args(x: dict[str, np.ndarray], guidance: bool) -> tuple:
    """Positional arguments of our model, in BFL's order, ids batched as BFL passes them."""
    batch = x["img"].shape[0]
    img_ids = np.broadcast_to(x["img_ids"], (batch, *x["img_ids"].shape))
    txt_ids = np.broadcast_to(x["txt_ids"], (batch, *x["txt_ids"].shape))
    return (x["img"], img_ids, x["txt"], txt_ids, x["timesteps"], x["y"], x["guidance"] if guidance else None)
