"""DINOv2 weights: Hugging Face checkpoints (save_pretrained directories) <-> our parameters.

Streaming, one tensor at a time, no torch. The hub names are our module paths, so the table below
only changes layouts (Linear (out, in) -> (in, out), Conv2d OIHW -> HWIO) and stacks the blocks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sga_jax import weights as W
from sga_jax.errors import ConfigError
from sga_jax.models import hf
from sga_jax.models.dinov2.model import Dinov2, Dinov2Config

FORMATS = ("hf",)


def key_map(config: Dinov2Config) -> dict[str, W.Rule]:
    """Our dotted parameter path -> hub checkpoint tensor(s)."""
    n = config.num_hidden_layers
    table: dict[str, W.Rule] = {
        "embeddings.cls_token": W.rule("embeddings.cls_token"),
        "embeddings.position_embeddings": W.rule("embeddings.position_embeddings"),
        "embeddings.patch_embeddings.projection.kernel": W.rule(
            "embeddings.patch_embeddings.projection.weight", transform=W.CONV2D
        ),
        "embeddings.patch_embeddings.projection.bias": W.rule("embeddings.patch_embeddings.projection.bias"),
        "layernorm.scale": W.rule("layernorm.weight"),
        "layernorm.bias": W.rule("layernorm.bias"),
    }
    if config.use_mask_token:
        table["embeddings.mask_token"] = W.rule("embeddings.mask_token")
    if config.model_type == "dinov2_with_registers":
        table["embeddings.register_tokens"] = W.rule("embeddings.register_tokens")
    linears = ["attention.attention.query", "attention.attention.key", "attention.attention.value", "attention.output.dense", "mlp.fc1", "mlp.fc2"]
    for name in linears:
        table[f"encoder.layer.{name}.kernel"] = W.rule(f"encoder.layer.{{i}}.{name}.weight", transform=W.LINEAR, layers=n)
        if config.qkv_bias or not name.startswith("attention.attention"):
            table[f"encoder.layer.{name}.bias"] = W.rule(f"encoder.layer.{{i}}.{name}.bias", layers=n)
    for norm in ("norm1", "norm2"):
        table[f"encoder.layer.{norm}.scale"] = W.rule(f"encoder.layer.{{i}}.{norm}.weight", layers=n)
        table[f"encoder.layer.{norm}.bias"] = W.rule(f"encoder.layer.{{i}}.{norm}.bias", layers=n)
    for scale in ("layer_scale1", "layer_scale2"):
        table[f"encoder.layer.{scale}.lambda1"] = W.rule(f"encoder.layer.{{i}}.{scale}.lambda1", layers=n)
    return table


def read_config(path: str | os.PathLike) -> Dinov2Config:
    """The config from `config.json` beside the weights (a directory, or a file inside one)."""
    return Dinov2Config.from_hf_config(hf.config_json(path, "Dinov2Config"))



def load(path: str | os.PathLike, config: Dinov2Config | None = None, *, shardings: Any = None, **overrides: Any) -> Dinov2:
    """Load a Hugging Face DINOv2 checkpoint (save_pretrained directory, safetensors file or index).

    The config comes from `config.json` when not given; `overrides` replace config fields (e.g.
    dtype="bfloat16", param_dtype="bfloat16" for frozen inference). `shardings`: optional
    State-shaped tree of shardings to place each parameter into as it is read.
    """
    config = read_config(path) if config is None else config
    return hf.load_pretrained(path, config, Dinov2, key_map, shardings=shardings, **overrides)


def save(model: Dinov2, path: str | os.PathLike, format: str = "hf", *, dtype: Any = None) -> list[Path]:
    """Write a save_pretrained-style directory (config.json + model.safetensors) that transformers loads."""
    if format not in FORMATS:
        raise ConfigError(f"DINOv2 save: format {format!r} is not one of {FORMATS}")
    return hf.save_pretrained(path, to_hf_config(model.config), model, key_map(model.config), dtype=dtype)


def to_hf_config(config: Dinov2Config) -> dict[str, Any]:
    """A transformers config.json dict for this model."""
    with_registers = config.model_type == "dinov2_with_registers"
    out = {
        "architectures": ["Dinov2WithRegistersModel" if with_registers else "Dinov2Model"],
        "model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "mlp_ratio": int(config.mlp_ratio) if float(config.mlp_ratio).is_integer() else config.mlp_ratio,
        "hidden_act": config.hidden_act,
        "layer_norm_eps": config.layer_norm_eps,
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "num_channels": config.num_channels,
        "qkv_bias": config.qkv_bias,
        "layerscale_value": config.layerscale_value,
        "use_swiglu_ffn": False,
    }
    if with_registers:
        out["num_register_tokens"] = config.num_register_tokens
    else:
        out["use_mask_token"] = config.use_mask_token
    return out
