"""CLIP weights: transformers safetensors <-> ours.

Two on-disk layouts carry the same text-encoder tensors: transformers 5's
`CLIPTextModel.save_pretrained` writes `embeddings.*`, `encoder.layers.{i}.*`, `final_layer_norm.*`;
the hub layout (Flux's `text_encoder` folder, checkpoints saved by transformers 4, and full
`CLIPModel` checkpoints such as openai/clip-vit-large-patch14) prefixes them with `text_model.`.
Both load with `load`; in a full CLIPModel the vision tower, the projections and `logit_scale` are
skipped. `load_clip_model` reads a full `CLIPModel` checkpoint (both towers and projections, for
CLIP score); only `logit_scale` is left out.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from sga_jax import weights as W
from sga_jax.errors import ConfigError
from sga_jax.models import nn
from sga_jax.models.clip.model import ClipModel, ClipTextConfig, ClipTextModel, ClipVisionConfig

FORMATS = ("transformers", "hub")
HUB_PREFIX = "text_model."
_SKIPPED = ("vision_model.", "visual_projection.", "text_projection.", "logit_scale", "embeddings.position_ids")


def _encoder_rules(n: int) -> dict[str, W.Rule]:
    """The stacked encoder blocks both towers share."""
    layer = "encoder.layers.{i}"
    km = {}
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        km[f"encoder.layers.self_attn.{proj}.kernel"] = W.rule(f"{layer}.self_attn.{proj}.weight", transform=W.LINEAR, layers=n)
        km[f"encoder.layers.self_attn.{proj}.bias"] = W.rule(f"{layer}.self_attn.{proj}.bias", layers=n)
    for fc in ("fc1", "fc2"):
        km[f"encoder.layers.mlp.{fc}.kernel"] = W.rule(f"{layer}.mlp.{fc}.weight", transform=W.LINEAR, layers=n)
        km[f"encoder.layers.mlp.{fc}.bias"] = W.rule(f"{layer}.mlp.{fc}.bias", layers=n)
    for norm in ("layer_norm1", "layer_norm2"):
        km[f"encoder.layers.{norm}.scale"] = W.rule(f"{layer}.{norm}.weight", layers=n)
        km[f"encoder.layers.{norm}.bias"] = W.rule(f"{layer}.{norm}.bias", layers=n)
    return km


def _norm_rules(name: str) -> dict[str, W.Rule]:
    return {f"{name}.scale": W.rule(f"{name}.weight"), f"{name}.bias": W.rule(f"{name}.bias")}


def key_map(config: ClipTextConfig) -> dict[str, W.Rule]:
    """Our text-model parameter path -> checkpoint rule (transformers 5 names, no prefix)."""
    return {
        "embeddings.token_embedding.embedding": W.rule("embeddings.token_embedding.weight"),
        "embeddings.position_embedding.embedding": W.rule("embeddings.position_embedding.weight"),
        **_norm_rules("final_layer_norm"),
        **_encoder_rules(config.num_hidden_layers),
    }


def vision_key_map(config: ClipVisionConfig) -> dict[str, W.Rule]:
    """Our vision-model parameter path -> checkpoint rule (no `vision_model.` prefix)."""
    return {
        "embeddings.class_embedding": W.rule("embeddings.class_embedding"),
        "embeddings.patch_embedding.kernel": W.rule("embeddings.patch_embedding.weight", transform=W.CONV2D),
        "embeddings.position_embedding.embedding": W.rule("embeddings.position_embedding.weight"),
        **_norm_rules("pre_layrnorm"),
        **_norm_rules("post_layernorm"),
        **_encoder_rules(config.num_hidden_layers),
    }


def clip_model_key_map(model: ClipModel) -> dict[str, W.Rule]:
    """A full `CLIPModel` checkpoint's rules: both towers under their prefixes and the projections."""
    nest = lambda km, prefix: {f"{prefix}{name}": r for name, r in _with_prefix(km, prefix).items()}
    return {
        **nest(key_map(model.text_model.config), HUB_PREFIX),
        **nest(vision_key_map(model.vision_model.config), "vision_model."),
        "text_projection.kernel": W.rule("text_projection.weight", transform=W.LINEAR),
        "visual_projection.kernel": W.rule("visual_projection.weight", transform=W.LINEAR),
    }


def _with_prefix(km: dict[str, W.Rule], prefix: str) -> dict[str, W.Rule]:
    return {name: W.Rule(tuple(prefix + k for k in r.keys), r.transform, r.layers) for name, r in km.items()}


def _open(path: Path) -> W.CheckpointReader:
    """A reader with the hub `text_model.` prefix stripped when the checkpoint has it."""
    reader = W.CheckpointReader(path)
    if any(k.startswith(HUB_PREFIX) for k in reader.keys()):
        reader = W.CheckpointReader(path, prefix=HUB_PREFIX)
    return reader


def infer_config(reader: W.CheckpointReader, **overrides: Any) -> ClipTextConfig:
    """Shapes-only config. Heads are not stored in weights: head width 64 (every OpenAI CLIP text
    tower) is assumed unless `num_attention_heads` is given; so is the legacy `eos_token_id` 2."""
    key = "embeddings.token_embedding.weight"
    if key not in reader:
        raise W.CheckpointError(f"{reader.path}: not a CLIP text checkpoint (no {key!r} / {HUB_PREFIX + key!r})")
    vocab_size, hidden = reader.shape(key)
    layers = {int(m.group(1)) for k in reader.keys() if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=reader.shape("encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=max(layers) + 1,
        num_attention_heads=max(hidden // 64, 1),
        max_position_embeddings=reader.shape("embeddings.position_embedding.weight")[0],
    )
    return ClipTextConfig(**{**fields, **overrides})


def load(path: str | os.PathLike, config: ClipTextConfig | None = None, *, shardings: Any = None,
         **overrides: Any) -> ClipTextModel:
    """Load a CLIP text encoder from transformers safetensors (either layout), one tensor at a time.

    Args:
      path: a save_pretrained directory, a .safetensors file or an index.json.
      config: when None, read from `config.json` beside the weights (a `clip_text_model` or a full
        `clip` config), else inferred from tensor shapes.
      shardings: optional shardings to place each parameter into as it is read: a tree matching
        `nnx.state(model, nnx.Param)` (an nnx.State or its pure dict, e.g. from
        `sga_jax.parallel.state_shardings`), or a function of the abstract parameter state that
        returns one (the config is only known once the checkpoint is opened).
      **overrides: config fields to change (e.g. dtype="bfloat16").
    """
    path = Path(path)
    reader = _open(path)
    if config is None:
        folder = path if path.is_dir() else path.parent
        hf = folder / "config.json"
        config = (ClipTextConfig.from_hf_config(json.loads(hf.read_text()), **overrides) if hf.exists()
                  else infer_config(reader, **overrides))
    elif overrides:
        config = ClipTextConfig.from_dict({**config.to_dict(), **overrides})
    return W.load_module(lambda: ClipTextModel(config, rngs=nn.construction_rngs(0)), reader, key_map(config),
                         shardings=shardings, ignore=lambda key: key.startswith(_SKIPPED))


def save(model: ClipTextModel, path: str | os.PathLike, format: str = "transformers", *,
         dtype: Any = None, max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """Write `model` as a transformers `CLIPTextModel` directory (config.json + safetensors).

    format "transformers": keys as transformers 5 writes them; "hub": with the `text_model.`
    prefix, as in Flux's `text_encoder` folder and transformers 4. `dtype` is the stored dtype
    (default: the parameters' own). Returns the files written.
    """
    if format not in FORMATS:
        raise ConfigError(f"CLIP export format {format!r} is not one of {FORMATS}")
    config: ClipTextConfig = model.config
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    km = key_map(config)
    if format == "hub":
        km = _with_prefix(km, HUB_PREFIX)
    files = W.save_state(path / "model.safetensors", nnx.state(model, nnx.Param), km, dtype=dtype,
                         max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
    stored = np.dtype(dtype).name if dtype is not None else config.param_dtype
    (path / "config.json").write_text(json.dumps({**config.to_hf_config(), "dtype": stored}, indent=2))
    return files


def load_clip_model(path: str | os.PathLike, *, shardings: Any = None, **overrides: Any) -> ClipModel:
    """Load a transformers `CLIPModel` (e.g. openai/clip-vit-base-patch16) from its save_pretrained
    directory: `config.json` (model_type "clip") beside safetensors. `overrides` (e.g. dtype) apply to
    both towers; `shardings` as in `load`."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    hf_file = folder / "config.json"
    if not hf_file.is_file():
        raise FileNotFoundError(f"{hf_file} not found: a CLIPModel directory needs its config.json")
    hf = json.loads(hf_file.read_text())
    if hf.get("model_type") != "clip":
        raise ConfigError(f"{hf_file}: model_type {hf.get('model_type')!r} is not a full CLIPModel ('clip')")
    text_config = ClipTextConfig.from_hf_config(hf, **overrides)
    vision_config = ClipVisionConfig.from_hf_config(hf, **overrides)
    projection_dim = hf.get("projection_dim", 512)
    return W.load_module(
        lambda: ClipModel(text_config, vision_config, projection_dim, rngs=nn.construction_rngs(0)), W.CheckpointReader(path),
        clip_model_key_map, shardings=shardings, ignore=lambda key: key == "logit_scale" or key.endswith("position_ids"),
    )
