"""Hugging Face `save_pretrained` directories, shared by the families that read and write them
(DINOv2, DINOv3, SAM2): config.json beside model.safetensors."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

from flax import nnx

from sga_jax import weights as W
from sga_jax.models import nn


def config_json(path: str | os.PathLike, config_class: str) -> dict[str, Any]:
    """The config.json beside the weights (`path` a directory, or a file inside one)."""
    path = Path(path)
    file = (path if path.is_dir() else path.parent) / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"{file}: no config.json; pass config={config_class}(...) to load()")
    return json.loads(file.read_text())


def save_pretrained(path: str | os.PathLike, hf_config: dict[str, Any], model: nnx.Module, key_map: W.KeyMap,
                    *, dtype: Any = None) -> list[Path]:
    """Write `path/config.json` and the parameters as `path/model.safetensors`, as transformers
    saves them (so `from_pretrained` loads the directory)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))
    state = nnx.state(model, nnx.Param)
    return W.save_state(path / "model.safetensors", state, key_map, dtype=dtype, metadata={"format": "pt"})


def load_pretrained(path: str | os.PathLike, config: Any, model_class: type, key_map: Callable[[Any], W.KeyMap], *,
                    shardings: Any = None, **overrides: Any) -> nnx.Module:
    """Stream a checkpoint into `model_class(config with overrides)`, built abstractly (no random
    weights), each parameter placed into `shardings` (a State-shaped tree, optional) as it is read."""
    config = dataclasses.replace(config, **overrides)
    return W.load_module(lambda: model_class(config, rngs=nn.construction_rngs(0)), W.CheckpointReader(path), key_map(config),
                         shardings=shardings)
