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

from sga_jax.errors import ConfigError
from sga_jax.models import dinov2, dinov3, flux, sam2, vae
from sga_jax.models.vae.convert import open_checkpoint as open_vae_checkpoint
from sga_jax.weights import converted

PRIOR_MODELS = {"dinov2": (dinov2.Dinov2Config, dinov2.Dinov2), "dinov3": (dinov3.Dinov3Config, dinov3.Dinov3),
                "sam2": (sam2.Sam2HieraConfig, sam2.Sam2Hiera)}


def weights_path(section: ml_collections.ConfigDict, family: str) -> Path | None:
    """The local path of a `config.model.<part>` section's `weights` for model family `family`: a
    path, or a hub id fetched once per process into the hub cache (`sga_jax.weights.hub`); None
    when the section names no weights."""
    weights = section.get("weights", "")
    return converted.resolve_weights(family, weights) if weights else None


def model_config(section: ml_collections.ConfigDict, cls: Any, family: str) -> Any:
    """A model config from a `config.model.<family>` section: the config of the weights it names
    (a converted directory, a Hugging Face config.json, or inferred from a Flux / VAE checkpoint), else
    its `preset`; then its `overrides`."""
    weights = weights_path(section, family)
    if weights is not None and converted.is_converted(weights):
        config = cls.from_dict(json.loads((weights / converted.CONFIG_FILE).read_text())["config"])
    elif weights is not None and hasattr(cls, "from_hf_config") and (weights / "config.json").is_file():
        config = cls.from_hf_config(json.loads((weights / "config.json").read_text()))
    elif weights is not None and family == "flux":
        config = flux.infer_config(weights)
    elif weights is not None and family == "vae":
        config = vae.infer_config(*open_vae_checkpoint(weights)[:2])
    else:
        preset = section.get("preset", "")
        if not preset or not hasattr(cls, preset):
            raise ConfigError(f"config.model.{family}: give `weights` or a `preset` of {cls.__name__}, got {preset!r}")
        config = getattr(cls, preset)()
    overrides = dict(section.get("overrides", {}) or {})
    if overrides:
        try:
            return dataclasses.replace(config, **overrides)
        except TypeError as error:
            raise ConfigError(f"config.model.{family}.overrides={overrides}: {error}") from error
    return config


def example_weights(batch: dict, size: int) -> jax.Array:
    """Per-example weights summing to 1 over the real examples (`valid`; padding slots get 0)."""
    valid = batch.get("valid")
    valid = jnp.ones((size,), jnp.float32) if valid is None else valid.astype(jnp.float32)
    return valid / jnp.maximum(jnp.sum(valid), 1.0)
