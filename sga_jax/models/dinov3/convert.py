"""DINOv3 weights: Hugging Face checkpoints (save_pretrained directories) <-> our parameters.

Streaming, one tensor at a time, no torch. Hub names are our module paths; the table only changes
layouts (Linear (out, in) -> (in, out), Conv2d OIHW -> HWIO) and stacks the blocks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sga_jax import weights as W
from sga_jax.errors import ConfigError
from sga_jax.models import hf
from sga_jax.models.dinov3.model import Dinov3, Dinov3Config

FORMATS = ("hf",)


def key_map(config: Dinov3Config) -> dict[str, W.Rule]:
    """Our dotted parameter path -> hub checkpoint tensor(s)."""
    n = config.num_hidden_layers
    table: dict[str, W.Rule] = {
        "embeddings.cls_token": W.rule("embeddings.cls_token"),
        "embeddings.mask_token": W.rule("embeddings.mask_token"),
        "embeddings.register_tokens": W.rule("embeddings.register_tokens"),
        "embeddings.patch_embeddings.kernel": W.rule("embeddings.patch_embeddings.weight", transform=W.CONV2D),
        "embeddings.patch_embeddings.bias": W.rule("embeddings.patch_embeddings.bias"),
        "norm.scale": W.rule("norm.weight"),
        "norm.bias": W.rule("norm.bias"),
    }
    biases = {
        "attention.q_proj": config.query_bias,
        "attention.k_proj": config.key_bias,
        "attention.v_proj": config.value_bias,
        "attention.o_proj": config.proj_bias,
        "mlp.up_proj": config.mlp_bias,
        "mlp.down_proj": config.mlp_bias,
    }
    if config.use_gated_mlp:
        biases["mlp.gate_proj"] = config.mlp_bias
    for name, has_bias in biases.items():
        table[f"layer.{name}.kernel"] = W.rule(f"layer.{{i}}.{name}.weight", transform=W.LINEAR, layers=n)
        if has_bias:
            table[f"layer.{name}.bias"] = W.rule(f"layer.{{i}}.{name}.bias", layers=n)
    for norm in ("norm1", "norm2"):
        table[f"layer.{norm}.scale"] = W.rule(f"layer.{{i}}.{norm}.weight", layers=n)
        table[f"layer.{norm}.bias"] = W.rule(f"layer.{{i}}.{norm}.bias", layers=n)
    for scale in ("layer_scale1", "layer_scale2"):
        table[f"layer.{scale}.lambda1"] = W.rule(f"layer.{{i}}.{scale}.lambda1", layers=n)
    return table


def read_config(path: str | os.PathLike) -> Dinov3Config:
    """The config from `config.json` beside the weights (a directory, or a file inside one)."""
    return Dinov3Config.from_hf_config(hf.config_json(path, "Dinov3Config"))



def load(path: str | os.PathLike, config: Dinov3Config | None = None, *, shardings: Any = None, **overrides: Any) -> Dinov3:
    """Load a Hugging Face DINOv3 ViT checkpoint (save_pretrained directory, safetensors file or index).

    The config comes from `config.json` when not given; `overrides` replace config fields (e.g.
    dtype="bfloat16", param_dtype="bfloat16" for frozen inference). `shardings`: optional
    State-shaped tree of shardings to place each parameter into as it is read.
    """
    config = read_config(path) if config is None else config
    return hf.load_pretrained(path, config, Dinov3, key_map, shardings=shardings, **overrides)


def to_hf_config(config: Dinov3Config) -> dict[str, Any]:
    """A transformers config.json dict for this model."""
    fields = {k: v for k, v in config.to_dict().items() if k not in ("dtype", "param_dtype", "attention", "remat")}
    return {"architectures": ["DINOv3ViTModel"], "model_type": "dinov3_vit", **fields}


def save(model: Dinov3, path: str | os.PathLike, format: str = "hf", *, dtype: Any = None) -> list[Path]:
    """Write a save_pretrained-style directory (config.json + model.safetensors) that transformers loads."""
    if format not in FORMATS:
        raise ConfigError(f"DINOv3 save: format {format!r} is not one of {FORMATS}")
    return hf.save_pretrained(path, to_hf_config(model.config), model, key_map(model.config), dtype=dtype)
