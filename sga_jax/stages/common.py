"""Pieces every training stage shares: model configs from a config section, the frozen priors by
name, and per-example loss weights that ignore padding slots."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from sga_jax.models import dinov2, dinov3, flux, sam2, vae
from sga_jax.models.vae.convert import open_checkpoint as open_vae_checkpoint
from sga_jax.weights import converted

PRIOR_MODELS = {"dinov2": (dinov2.Dinov2Config, dinov2.Dinov2), "dinov3": (dinov3.Dinov3Config, dinov3.Dinov3),
                "sam2": (sam2.Sam2HieraConfig, sam2.Sam2Hiera)}


def model_config(section: ml_collections.ConfigDict, cls: Any, family: str) -> Any:
    """A model config from a `config.model.<family>` section: the config of the weights it names
    (a converted directory, a Hugging Face config.json, or inferred from a Flux / VAE checkpoint), else
    its `preset`; then its `overrides`."""
    weights = section.get("weights", "")
    if weights and converted.is_converted(weights):
        config = cls.from_dict(json.loads((Path(weights) / converted.CONFIG_FILE).read_text())["config"])
    elif weights and hasattr(cls, "from_hf_config") and (Path(weights) / "config.json").is_file():
        config = cls.from_hf_config(json.loads((Path(weights) / "config.json").read_text()))
    elif weights and family == "flux":
        config = flux.infer_config(weights)
    elif weights and family == "vae":
        config = vae.infer_config(*open_vae_checkpoint(weights)[:2])
    else:
        preset = section.get("preset", "")
        if not preset or not hasattr(cls, preset):
            raise ValueError(f"config.model.{family}: give `weights` or a `preset` of {cls.__name__}, got {preset!r}")
        config = getattr(cls, preset)()
    overrides = dict(section.get("overrides", {}) or {})
    return dataclasses.replace(config, **overrides) if overrides else config


def example_weights(batch: dict, size: int) -> jax.Array:
    """Per-example weights summing to 1 over the real examples (`valid`; padding slots get 0)."""
    valid = batch.get("valid")
    valid = jnp.ones((size,), jnp.float32) if valid is None else valid.astype(jnp.float32)
    return valid / jnp.maximum(jnp.sum(valid), 1.0)
