"""CLIP text encoder weights: transformers safetensors <-> ours.

Two on-disk layouts carry the same tensors: transformers 5's `CLIPTextModel.save_pretrained`
writes `embeddings.*`, `encoder.layers.{i}.*`, `final_layer_norm.*`; the hub layout (Flux's
`text_encoder` folder, checkpoints saved by transformers 4, and full `CLIPModel` checkpoints such
as openai/clip-vit-large-patch14) prefixes them with `text_model.`. Both load; in a full CLIPModel
the vision tower, the projections and `logit_scale` are skipped.
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
from sga_jax.models.clip.model import ClipTextConfig, ClipTextModel

FORMATS = ("transformers", "hub")
HUB_PREFIX = "text_model."
_SKIPPED = ("vision_model.", "visual_projection.", "text_projection.", "logit_scale", "embeddings.position_ids")


def key_map(config: ClipTextConfig) -> dict[str, W.Rule]:
    """Our parameter path -> checkpoint rule (transformers 5 names, no prefix)."""
    n = config.num_hidden_layers
    layer = "encoder.layers.{i}"
    km = {
        "embeddings.token_embedding.embedding": W.rule("embeddings.token_embedding.weight"),
        "embeddings.position_embedding.embedding": W.rule("embeddings.position_embedding.weight"),
        "final_layer_norm.scale": W.rule("final_layer_norm.weight"),
        "final_layer_norm.bias": W.rule("final_layer_norm.bias"),
    }
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
    model = nnx.eval_shape(lambda: ClipTextModel(config, rngs=nnx.Rngs(0)))
    graphdef, abstract, rest = nnx.split(model, nnx.Param, ...)
    if callable(shardings):
        shardings = shardings(abstract)
    if shardings is not None and not isinstance(shardings, nnx.State):
        shardings = nnx.State(shardings)
    ignore = lambda key: key.startswith(_SKIPPED)
    state = W.load_state(reader, key_map(config), abstract, shardings=shardings, ignore=ignore)
    return nnx.merge(graphdef, state, rest)


def save(model: ClipTextModel, path: str | os.PathLike, format: str = "transformers", *,
         dtype: Any = None, max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """Write `model` as a transformers `CLIPTextModel` directory (config.json + safetensors).

    format "transformers": keys as transformers 5 writes them; "hub": with the `text_model.`
    prefix, as in Flux's `text_encoder` folder and transformers 4. `dtype` is the stored dtype
    (default: the parameters' own). Returns the files written.
    """
    if format not in FORMATS:
        raise ValueError(f"CLIP export format {format!r} is not one of {FORMATS}")
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
