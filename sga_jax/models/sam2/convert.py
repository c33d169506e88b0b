"""SAM2 Hiera trunk weights: Hugging Face checkpoints <-> our parameters.

Reads a save_pretrained directory of `Sam2Model` (keys under `vision_encoder.backbone.`, the hub's
facebook/sam2.1-hiera-* layout), `Sam2VisionModel` (`backbone.`) or `Sam2HieraDetModel` (no
prefix); the neck, prompt encoder, mask decoder and memory weights are skipped. Streaming, one
tensor at a time, no torch. The checkpoint numbers blocks across stages; ours are grouped per
stage (an opening block, then a stacked run), so each rule says where its run starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from sga_jax import weights as W
from sga_jax.errors import ConfigError
from sga_jax.models import hf, nn
from sga_jax.models.sam2.model import Sam2Hiera, Sam2HieraConfig

FORMATS = ("hf",)
PREFIXES = {"sam2": "vision_encoder.backbone.", "sam2_vision_model": "backbone.", "sam2_hiera_det_model": ""}
TRUNK_ROOTS = ("patch_embed.", "pos_embed", "blocks.")
_BLOCK_PARAMS = {
    "layer_norm1": ("weight", "bias"),
    "layer_norm2": ("weight", "bias"),
    "attn.qkv": ("weight", "bias"),
    "attn.proj": ("weight", "bias"),
    "mlp.proj_in": ("weight", "bias"),
    "mlp.proj_out": ("weight", "bias"),
}


def _block_rules(ours: str, theirs: str, *, projects: bool, layers: int | None, start: int) -> dict[str, W.Rule]:
    names = dict(_BLOCK_PARAMS, **({"proj": ("weight", "bias")} if projects else {}))
    table = {}
    for name in names:
        norm = name.startswith("layer_norm")
        table[f"{ours}.{name}.{'scale' if norm else 'kernel'}"] = W.rule(
            f"{theirs}.{name}.weight", transform=W.SAME if norm else W.LINEAR, layers=layers, start=start
        )
        table[f"{ours}.{name}.bias"] = W.rule(f"{theirs}.{name}.bias", layers=layers, start=start)
    return table


def key_map(config: Sam2HieraConfig) -> dict[str, W.Rule]:
    """Our dotted parameter path -> trunk checkpoint tensor(s) (keys without the model prefix)."""
    table: dict[str, W.Rule] = {
        "patch_embed.projection.kernel": W.rule("patch_embed.projection.weight", transform=W.CONV2D),
        "patch_embed.projection.bias": W.rule("patch_embed.projection.bias"),
        "pos_embed": W.rule("pos_embed", transform=W.Permute((0, 2, 3, 1))),
        "pos_embed_window": W.rule("pos_embed_window", transform=W.Permute((0, 2, 3, 1))),
    }
    for stage, (start, count) in enumerate(zip(config.stage_starts, config.blocks_per_stage)):
        if stage > 0:
            projects = config.embed_dim_per_stage[stage] != config.embed_dim_per_stage[stage - 1]
            table.update(_block_rules(f"stages.{stage}.first", f"blocks.{start}", projects=projects, layers=None, start=0))
            start, count = start + 1, count - 1
        if count:
            table.update(_block_rules(f"stages.{stage}.blocks", "blocks.{i}", projects=False, layers=count, start=start))
    return table


def _read_hf_json(path: Path) -> dict[str, Any]:
    file = (path if path.is_dir() else path.parent) / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"{file}: no config.json; pass config=Sam2HieraConfig(...) to load()")
    return json.loads(file.read_text())


def load(
    path: str | os.PathLike,
    config: Sam2HieraConfig | None = None,
    *,
    shardings: Any = None,
    prefix: str | None = None,
    **overrides: Any,
) -> Sam2Hiera:
    """Load the Hiera trunk from a Hugging Face SAM2 checkpoint (directory, safetensors file or index).

    The config and the key prefix come from `config.json` (full `Sam2Model`, `Sam2VisionModel` or
    `Sam2HieraDetModel`) unless given; `overrides` replace config fields (e.g. dtype="bfloat16",
    param_dtype="bfloat16"). `shardings`: optional State-shaped tree of shardings.
    """
    path = Path(path)
    if config is None or prefix is None:
        hf = _read_hf_json(path)
        config = Sam2HieraConfig.from_hf_config(hf) if config is None else config
        prefix = PREFIXES.get(hf.get("model_type"), "") if prefix is None else prefix
    config = dataclasses.replace(config, **overrides)
    reader = W.CheckpointReader(path, prefix=prefix)
    return W.load_module(lambda: Sam2Hiera(config, rngs=nn.construction_rngs(0)), reader, key_map(config), shardings=shardings,
                         ignore=lambda key: not key.startswith(TRUNK_ROOTS))


def to_hf_config(config: Sam2HieraConfig) -> dict[str, Any]:
    """A transformers `Sam2HieraDetModel` config.json dict for this trunk."""
    fields = {k: v for k, v in config.to_dict().items() if k not in ("dtype", "param_dtype", "attention", "remat")}
    return {"architectures": ["Sam2HieraDetModel"], "model_type": "sam2_hiera_det_model", **fields}


def save(model: Sam2Hiera, path: str | os.PathLike, format: str = "hf", *, dtype: Any = None) -> list[Path]:
    """Write a `Sam2HieraDetModel` save_pretrained-style directory that transformers loads."""
    if format not in FORMATS:
        raise ConfigError(f"SAM2 save: format {format!r} is not one of {FORMATS}")
    return hf.save_pretrained(path, to_hf_config(model.config), model, key_map(model.config), dtype=dtype)
