"""T5 encoder weights: transformers safetensors (save_pretrained directory, file or index) <-> ours.

Checkpoint keys (transformers `T5EncoderModel`): `shared.weight` (or its tied copy
`encoder.embed_tokens.weight`), `encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight`,
`encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight`,
`encoder.block.{i}.layer.0.layer_norm.weight`, `encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight`
(`wi` when not gated), `encoder.block.{i}.layer.1.layer_norm.weight`, `encoder.final_layer_norm.weight`.
A full encoder-decoder checkpoint also loads: its `decoder.*` and `lm_head.*` tensors are skipped.
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
from sga_jax.models.t5.model import T5Config, T5EncoderModel

FORMATS = ("transformers",)
_EMBED_KEYS = ("shared.weight", "encoder.embed_tokens.weight")


def key_map(config: T5Config, embed_key: str = "shared.weight") -> dict[str, W.Rule]:
    """Our parameter path -> checkpoint rule, for `config`'s depth and feed-forward kind."""
    n = config.num_layers
    block = "encoder.block.{i}.layer"
    ours = "encoder.block.layer"
    km = {
        "shared.embedding": W.rule(embed_key),
        "encoder.relative_attention_bias.embedding": W.rule(
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        ),
        "encoder.final_layer_norm.scale": W.rule("encoder.final_layer_norm.weight"),
        f"{ours}.0.layer_norm.scale": W.rule(f"{block}.0.layer_norm.weight", layers=n),
        f"{ours}.1.layer_norm.scale": W.rule(f"{block}.1.layer_norm.weight", layers=n),
    }
    for name in "qkvo":
        km[f"{ours}.0.SelfAttention.{name}.kernel"] = W.rule(
            f"{block}.0.SelfAttention.{name}.weight", transform=W.LINEAR, layers=n
        )
    for name in ("wi_0", "wi_1", "wo") if config.is_gated_act else ("wi", "wo"):
        km[f"{ours}.1.DenseReluDense.{name}.kernel"] = W.rule(
            f"{block}.1.DenseReluDense.{name}.weight", transform=W.LINEAR, layers=n
        )
    return km


def _config_json(path: Path) -> Path | None:
    folder = path if path.is_dir() else path.parent
    candidate = folder / "config.json"
    return candidate if candidate.exists() else None


def infer_config(reader: W.CheckpointReader, **overrides: Any) -> T5Config:
    """Shapes-only config: widths, depth, heads and the feed-forward kind from the tensors.

    The relative-attention max distance and the norm epsilon are not stored in weights: they take
    T5's defaults (128, 1e-6) unless overridden.
    """
    embed_key = next((k for k in _EMBED_KEYS if k in reader), None)
    bias_key = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    if embed_key is None or bias_key not in reader:
        raise W.CheckpointError(f"{reader.path}: not a T5 encoder checkpoint (no {_EMBED_KEYS[0]} or {bias_key})")
    vocab_size, d_model = reader.shape(embed_key)
    buckets, heads = reader.shape(bias_key)
    layers = {int(m.group(1)) for k in reader.keys() if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in reader
    wi = "wi_0" if gated else "wi"
    fields = dict(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=reader.shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0] // heads,
        d_ff=reader.shape(f"encoder.block.0.layer.1.DenseReluDense.{wi}.weight")[0],
        num_layers=max(layers) + 1,
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        dense_act_fn="gelu_new" if gated else "relu",
        is_gated_act=gated,
    )
    return T5Config(**{**fields, **overrides})


def load(path: str | os.PathLike, config: T5Config | None = None, *, shardings: Any = None, **overrides: Any) -> T5EncoderModel:
    """Load a T5 encoder from transformers safetensors, one tensor at a time.

    Args:
      path: a save_pretrained directory, a .safetensors file or an index.json.
      config: the model's config; when None it is read from `config.json` beside the weights, or
        inferred from tensor shapes when there is none.
      shardings: optional shardings to place each parameter into as it is read: a tree matching
        `nnx.state(model, nnx.Param)` (an nnx.State or its pure dict, e.g. from
        `sga_jax.parallel.state_shardings`), or a function of the abstract parameter state that
        returns one (the config is only known once the checkpoint is opened).
      **overrides: config fields to change (e.g. dtype="bfloat16", param_dtype="bfloat16", remat="full").
    """
    path = Path(path)
    reader = W.CheckpointReader(path)
    if config is None:
        hf = _config_json(path)
        config = T5Config.from_hf_config(json.loads(hf.read_text()), **overrides) if hf else infer_config(reader, **overrides)
    elif overrides:
        config = T5Config.from_dict({**config.to_dict(), **overrides})
    embed_key = next((k for k in _EMBED_KEYS if k in reader), _EMBED_KEYS[0])
    skipped = set(_EMBED_KEYS) - {embed_key}
    ignore = lambda key: key in skipped or key.startswith(("decoder.", "lm_head."))
    return W.load_module(lambda: T5EncoderModel(config, rngs=nn.construction_rngs(0)), reader, key_map(config, embed_key),
                         shardings=shardings, ignore=ignore)


def save(model: T5EncoderModel, path: str | os.PathLike, format: str = "transformers", *,
         dtype: Any = None, max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """Write `model` as a transformers `T5EncoderModel` directory (config.json + safetensors).

    `dtype` is the stored dtype (default: the parameters' own). transformers ties
    `encoder.embed_tokens` to `shared`, so only `shared.weight` is written. Returns the files written.
    """
    if format not in FORMATS:
        raise ConfigError(f"T5 export format {format!r} is not one of {FORMATS}")
    config: T5Config = model.config
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = nnx.state(model, nnx.Param)
    files = W.save_state(path / "model.safetensors", state, key_map(config), dtype=dtype,
                         max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
    stored = np.dtype(dtype).name if dtype is not None else config.param_dtype
    (path / "config.json").write_text(json.dumps({**config.to_hf_config(), "dtype": stored}, indent=2))
    return files
