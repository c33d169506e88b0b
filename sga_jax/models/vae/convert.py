"""Flux VAE weights in and out: BFL `ae.safetensors` names and diffusers `AutoencoderKL` names.

Our parameter paths are BFL's module names, so the BFL key map renames leaves only (`kernel` /
`scale` -> `weight`); the diffusers map also renames modules (`down_blocks.{i}.resnets.{j}`,
`conv_shortcut`, `mid_block.attentions.0.to_q`, `conv_norm_out`, ...) and reverses the order of
the decoder's up blocks. The attention projections are dense kernels here, 1x1 convs in BFL files
and linears in diffusers files. Everything streams one tensor at a time through `sga_jax.weights`.

The config travels with our exports (safetensors metadata `sga_jax_config`, and for diffusers also
`config.json`), so the F16 switch and scaling factors survive a round trip; for other files the
shape is inferred from the tensors and the rest comes from `config.json` or the Flux defaults.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable

import jax
from flax import nnx

from sga_jax import weights as W
from sga_jax.errors import ConfigError
from sga_jax.models import nn
from sga_jax.models.vae.model import AutoEncoder, AutoEncoderConfig

FORMATS = ("bfl", "diffusers")
METADATA_KEY = "sga_jax_config"
BFL_FILENAME = "ae.safetensors"
DIFFUSERS_FILENAME = "diffusion_pytorch_model.safetensors"
_PROBE = {"bfl": "encoder.down.0.block.0.conv1.weight", "diffusers": "encoder.down_blocks.0.resnets.0.conv1.weight"}
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}

log = logging.getLogger(__name__)


def _diffusers_module(path: str, levels: int) -> str:
    """Our (BFL) module path -> diffusers' module path."""
    rules: list[tuple[str, str | Callable[[re.Match], str]]] = [
        (r"^encoder\.down\.(\d+)\.block\.(\d+)", r"encoder.down_blocks.\1.resnets.\2"),
        (r"^encoder\.down\.(\d+)\.downsample\.conv", r"encoder.down_blocks.\1.downsamplers.0.conv"),
        (r"^decoder\.up\.(\d+)\.block\.(\d+)", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}"),
        (r"^decoder\.up\.(\d+)\.upsample\.conv", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.conv"),
        (r"\.mid\.block_(\d)", lambda m: f".mid_block.resnets.{int(m[1]) - 1}"),
        (r"\.mid\.attn_1\.norm$", ".mid_block.attentions.0.group_norm"),
        (r"\.mid\.attn_1\.(q|k|v)$", r".mid_block.attentions.0.to_\1"),
        (r"\.mid\.attn_1\.proj_out$", ".mid_block.attentions.0.to_out.0"),
        (r"\.nin_shortcut$", ".conv_shortcut"),
        (r"\.norm_out$", ".conv_norm_out"),
    ]
    for pattern, replacement in rules:
        path = re.sub(pattern, replacement, path)
    return path


def key_map(params: nnx.State, fmt: str, levels: int) -> dict[str, W.Rule]:
    """{our dotted parameter path: Rule} for `fmt` ("bfl" or "diffusers"), built from a (possibly
    abstract) parameter state of a model with `levels` resolution levels."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown VAE checkpoint format {fmt!r}; expected one of {FORMATS}")
    rules = {}
    for name, var in W.flat_params(params).items():
        module, leaf = name.rsplit(".", 1)
        ndim = len(var.get_value().shape)
        if leaf == "kernel" and ndim == 4:
            transform = W.CONV2D
        elif leaf == "kernel" and ndim == 2:
            transform = W.TrailingOnes(2, W.LINEAR) if fmt == "bfl" else W.LINEAR
        else:
            transform = W.SAME
        theirs = module if fmt == "bfl" else _diffusers_module(module, levels)
        rules[name] = W.rule(f"{theirs}.{_LEAF_NAMES[leaf]}", transform=transform)
    return rules


def detect_format(reader: W.CheckpointReader) -> str:
    """"bfl" or "diffusers", from the key names."""
    for fmt, probe in _PROBE.items():
        if probe in reader:
            return fmt
    sample = ", ".join(reader.keys()[:8])
    raise W.CheckpointError(
        f"{reader.path}: not a Flux VAE checkpoint in BFL or diffusers names (neither {_PROBE['bfl']!r} nor "
        f"{_PROBE['diffusers']!r} found; first keys: {sample})"
    )


def _prefix(path: Path) -> str:
    """A prefix before the VAE's keys, as in single-file pipeline checkpoints ("vae.", ...)."""
    for key in W.CheckpointReader(path, subfolder_hint="vae").keys():
        if key.endswith("encoder.conv_in.weight") and not key.startswith("encoder."):
            return key[: -len("encoder.conv_in.weight")]
    return ""


def open_checkpoint(path: str | os.PathLike) -> tuple[W.CheckpointReader, str, Callable[[str], bool]]:
    """Reader, format and ignore-predicate for a BFL or diffusers VAE file or directory.

    A directory may be a diffusers pipeline (its `vae/` subfolder is used) or the VAE folder itself.
    When the VAE's keys carry a prefix, it is stripped and every other key is ignored.
    """
    prefix = _prefix(Path(path))
    reader = W.CheckpointReader(path, prefix=prefix, subfolder_hint="vae")
    if "quant_conv.weight" in reader or "post_quant_conv.weight" in reader:
        raise W.CheckpointError(
            f"{reader.path}: this VAE has quant_conv / post_quant_conv layers (a Stable Diffusion style "
            "AutoencoderKL); Flux's VAE has none, so it cannot be loaded as one"
        )
    if prefix:
        return reader, detect_format(reader), lambda k: not k.startswith(("encoder.", "decoder."))
    return reader, detect_format(reader), lambda k: False


def _config_json(path: Path) -> dict[str, Any]:
    for candidate in (path / "vae" / "config.json", path / "config.json", path.parent / "config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return {}


def infer_config(reader: W.CheckpointReader, fmt: str) -> AutoEncoderConfig:
    """The config of a checkpoint: our own (from its metadata) when we wrote it; else the shape from
    tensor shapes and the scaling, groups and resolution from a diffusers `config.json` (Flux's
    values when there is none)."""
    stored = reader.metadata().get(METADATA_KEY)
    if stored:
        return AutoEncoderConfig.from_dict(json.loads(stored))
    block = "encoder.down.{i}.block.{j}.conv1.weight" if fmt == "bfl" else "encoder.down_blocks.{i}.resnets.{j}.conv1.weight"
    ch, in_channels = reader.shape("encoder.conv_in.weight")[:2]
    levels = 0
    while block.format(i=levels, j=0) in reader:
        levels += 1
    blocks = 0
    while block.format(i=0, j=blocks) in reader:
        blocks += 1
    fields: dict[str, Any] = {
        "in_channels": in_channels,
        "ch": ch,
        "ch_mult": tuple(reader.shape(block.format(i=i, j=0))[0] // ch for i in range(levels)),
        "num_res_blocks": blocks,
        "z_channels": reader.shape("decoder.conv_in.weight")[1],
        "out_ch": reader.shape("decoder.conv_out.weight")[0],
    }
    hf = _config_json(reader.path) if fmt == "diffusers" else {}
    if hf.get("_" + METADATA_KEY):
        return AutoEncoderConfig.from_dict(hf["_" + METADATA_KEY])
    if hf:
        fields["norm_groups"] = hf.get("norm_num_groups", 32)
        fields["scale_factor"] = hf.get("scaling_factor", AutoEncoderConfig.scale_factor)
        fields["shift_factor"] = hf.get("shift_factor") or 0.0
        if "sample_size" in hf and isinstance(hf["sample_size"], int):
            fields["resolution"] = hf["sample_size"]
    return AutoEncoderConfig(**fields)


def load(
    path: str | os.PathLike,
    config: AutoEncoderConfig | None = None,
    *,
    shardings: Any = None,
    **overrides: Any,
) -> AutoEncoder:
    """Load a BFL `ae.safetensors` or a diffusers AutoencoderKL (dir, pipeline dir or file).

    The format is detected from the key names; `config` is inferred when None (see
    `infer_config`); `overrides` replace config fields (e.g. `f16=True` to run F8 weights in the
    F16 form, `dtype="bfloat16"`). Parameters stream into `shardings` (a State-shaped tree of
    shardings, optional) one at a time.
    """
    reader, fmt, ignore = open_checkpoint(path)
    config = config if config is not None else infer_config(reader, fmt)
    if overrides:
        config = dataclasses.replace(config, **overrides)
    rules = lambda model: key_map(nnx.state(model, nnx.Param), fmt, len(config.ch_mult))
    return W.load_module(lambda: AutoEncoder(config, rngs=nn.construction_rngs(0)), reader, rules, shardings=shardings,
                         ignore=ignore)


def shardings_for(config: AutoEncoderConfig, mesh: jax.sharding.Mesh, rules: Any = None) -> dict:
    """Parameter shardings of an AutoEncoder on `mesh` from its logical axis names (for `load`)."""
    from sga_jax import parallel

    abstract = nnx.eval_shape(lambda: AutoEncoder(config, rngs=nn.construction_rngs(0)))
    return parallel.state_shardings(nnx.state(abstract, nnx.Param), mesh, parallel.resolve_rules(rules))


def diffusers_config(config: AutoEncoderConfig) -> dict[str, Any]:
    """diffusers' `AutoencoderKL` config.json for this model (our config under a private key)."""
    levels = len(config.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": config.in_channels,
        "out_channels": config.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [config.ch * m for m in config.ch_mult],
        "layers_per_block": config.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": config.z_channels,
        "norm_num_groups": config.norm_groups,
        "sample_size": config.resolution,
        "scaling_factor": config.scale_factor,
        "shift_factor": config.shift_factor,
        "latents_mean": None,
        "latents_std": None,
        "force_upcast": True,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
        "_" + METADATA_KEY: config.to_dict(),
    }


def save(model: AutoEncoder, path: str | os.PathLike, format: str = "bfl", *, dtype: Any = None) -> list[Path]:
    """Export to BFL names (one `.safetensors` file; a directory gets `ae.safetensors`) or to a
    diffusers `AutoencoderKL` directory (`config.json` + `diffusion_pytorch_model.safetensors`),
    loadable by `AutoencoderKL.from_pretrained`. `dtype` casts tensors (default: as stored).

    diffusers' stock AutoencoderKL has no F16 form: an F16 model's weights load there but run as F8.
    """
    config = model.config
    if format not in FORMATS:
        raise ConfigError(f"unknown VAE export format {format!r}; expected one of {FORMATS}")
    path = Path(path)
    params = nnx.state(model, nnx.Param)
    rules = key_map(params, format, len(config.ch_mult))
    metadata = {METADATA_KEY: json.dumps(config.to_dict()), "format": format}
    if format == "bfl":
        target = path if path.suffix == ".safetensors" else path / BFL_FILENAME
        return W.save_state(target, params, rules, dtype=dtype, metadata=metadata)
    if config.norm_eps != 1e-6:
        raise ConfigError(f"diffusers' AutoencoderKL fixes GroupNorm eps at 1e-6; this model has norm_eps={config.norm_eps}")
    if config.f16:
        log.warning("%s: diffusers' AutoencoderKL runs these F16 weights as an F8 VAE (no stride-2 conv_in)", path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(diffusers_config(config), indent=2) + "\n")
    return W.save_state(path / DIFFUSERS_FILENAME, params, rules, dtype=dtype, metadata=metadata)
