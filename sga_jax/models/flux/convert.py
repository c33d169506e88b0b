"""Flux weights both ways: Black Forest Labs' single file and diffusers' `FluxTransformer2DModel`.

Our parameter paths are BFL's names (with `kernel` for `weight` and a stacked `layers` axis), so
the BFL key map is derived from the paths and the diffusers map is a rename table with the few
reshapes: fused qkv <-> to_q/to_k/to_v, the single block's linear1 <-> q/k/v/proj_mlp, and the
final layer's (shift, scale) <-> diffusers' (scale, shift). Loading streams one tensor at a time
into an abstract model built by `nnx.eval_shape` (never random weights first).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sga_jax import weights as W
from sga_jax.errors import ConfigError
from sga_jax.models import nn
from sga_jax.models.flux.model import Flux, FluxConfig

FORMATS = ("bfl", "diffusers")
BFL_PREFIX = "model.diffusion_model."
CONFIG_METADATA_KEY = "sga_jax.flux_config"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_CONFIG = "config.json"
BFL_WEIGHTS = "flux.safetensors"
# BFL's released configs fix the rotary split for their 128-wide heads; other widths must say it.
DEFAULT_AXES_DIM = {128: (16, 56, 56)}

_STACKS = {"double_blocks": "depth", "single_blocks": "depth_single_blocks"}


def abstract_model(config: FluxConfig) -> Flux:
    """The model with abstract (shape-only) parameters: no memory, no random init."""
    return nnx.eval_shape(lambda: Flux(config, rngs=nn.construction_rngs(0)))


def _abstract_params(config: FluxConfig) -> nnx.State:
    return nnx.state(abstract_model(config), nnx.Param)


def _param_paths(config: FluxConfig) -> dict[str, tuple[int, ...]]:
    return {name: tuple(var.get_value().shape) for name, var in W.flat_params(_abstract_params(config)).items()}


def _leaf_rule(key: str, leaf: str, layers: int | None) -> W.Rule:
    """A Linear kernel is stored transposed as `weight`; biases and norm scales keep their name."""
    if leaf == "kernel":
        return W.rule(f"{key}.weight", transform=W.LINEAR, layers=layers)
    return W.rule(f"{key}.{leaf}", layers=layers)


def bfl_key_map(config: FluxConfig) -> W.KeyMap:
    """Our parameter path -> BFL checkpoint keys (names are ours, stacked blocks get `.{i}`)."""
    key_map = {}
    for name, shape in _param_paths(config).items():
        head, *rest = name.split(".")
        *path, leaf = rest
        layers = getattr(config, _STACKS[head]) if head in _STACKS else None
        key = ".".join([head, "{i}", *path] if layers else [head, *path])
        key_map[name] = _leaf_rule(key, leaf, layers)
    return key_map


def _linear(key: str, layers: int | None = None) -> dict[str, W.Rule]:
    return {
        "kernel": W.rule(f"{key}.weight", transform=W.LINEAR, layers=layers),
        "bias": W.rule(f"{key}.bias", layers=layers),
    }


def _fused(keys: list[str], sizes: tuple[int, ...], layers: int) -> dict[str, W.Rule]:
    """One of our Linears made of several diffusers Linears concatenated on the output axis."""
    return {
        "kernel": W.rule(*[f"{k}.weight" for k in keys], transform=W.Concat(1, sizes, W.LINEAR), layers=layers),
        "bias": W.rule(*[f"{k}.bias" for k in keys], transform=W.Concat(0, sizes), layers=layers),
    }


def diffusers_key_map(config: FluxConfig) -> W.KeyMap:
    """Our parameter path -> diffusers `FluxTransformer2DModel` state-dict keys."""
    config.to_diffusers_config()  # raises when diffusers cannot represent this model
    h, n, ns = config.hidden_size, config.depth, config.depth_single_blocks
    modules: dict[str, dict[str, W.Rule]] = {
        "img_in": _linear("x_embedder"),
        "txt_in": _linear("context_embedder"),
        "time_in.in_layer": _linear("time_text_embed.timestep_embedder.linear_1"),
        "time_in.out_layer": _linear("time_text_embed.timestep_embedder.linear_2"),
        "vector_in.in_layer": _linear("time_text_embed.text_embedder.linear_1"),
        "vector_in.out_layer": _linear("time_text_embed.text_embedder.linear_2"),
        "final_layer.linear": _linear("proj_out"),
        "final_layer.adaLN_modulation.1": {
            "kernel": W.rule("norm_out.linear.weight", transform=W.SwapHalves(1, W.LINEAR)),
            "bias": W.rule("norm_out.linear.bias", transform=W.SwapHalves(0)),
        },
    }
    if config.guidance_embed:
        modules["guidance_in.in_layer"] = _linear("time_text_embed.guidance_embedder.linear_1")
        modules["guidance_in.out_layer"] = _linear("time_text_embed.guidance_embedder.linear_2")

    block = "transformer_blocks.{i}"
    for ours, theirs, attn in (("img", "", "to_{}"), ("txt", "_context", "add_{}_proj")):
        added = "" if ours == "img" else "added_"
        modules[f"double_blocks.{ours}_mod.lin"] = _linear(f"{block}.norm1{theirs}.linear", n)
        modules[f"double_blocks.{ours}_attn.qkv"] = _fused([f"{block}.attn.{attn.format(c)}" for c in "qkv"], (h, h, h), n)
        modules[f"double_blocks.{ours}_attn.proj"] = _linear(f"{block}.attn.{'to_out.0' if ours == 'img' else 'to_add_out'}", n)
        modules[f"double_blocks.{ours}_mlp.0"] = _linear(f"{block}.ff{theirs}.net.0.proj", n)
        modules[f"double_blocks.{ours}_mlp.2"] = _linear(f"{block}.ff{theirs}.net.2", n)
        modules[f"double_blocks.{ours}_attn.norm.query_norm"] = {
            "scale": W.rule(f"{block}.attn.norm_{added}q.weight", layers=n)
        }
        modules[f"double_blocks.{ours}_attn.norm.key_norm"] = {
            "scale": W.rule(f"{block}.attn.norm_{added}k.weight", layers=n)
        }

    single = "single_transformer_blocks.{i}"
    modules["single_blocks.linear1"] = _fused(
        [f"{single}.attn.to_q", f"{single}.attn.to_k", f"{single}.attn.to_v", f"{single}.proj_mlp"],
        (h, h, h, config.mlp_hidden_dim),
        ns,
    )
    modules["single_blocks.linear2"] = _linear(f"{single}.proj_out", ns)
    modules["single_blocks.modulation.lin"] = _linear(f"{single}.norm.linear", ns)
    modules["single_blocks.norm.query_norm"] = {"scale": W.rule(f"{single}.attn.norm_q.weight", layers=ns)}
    modules["single_blocks.norm.key_norm"] = {"scale": W.rule(f"{single}.attn.norm_k.weight", layers=ns)}

    key_map = {f"{module}.{leaf}": r for module, leaves in modules.items() for leaf, r in leaves.items()}
    expected = set(_param_paths(config))
    if set(key_map) != expected:  # a model change without a matching table change is a bug here
        raise AssertionError(f"diffusers key map out of date: {sorted(set(key_map) ^ expected)}")
    return key_map


def key_map(config: FluxConfig, format: str) -> W.KeyMap:
    """The key map for `format` ("bfl" or "diffusers")."""
    if format not in FORMATS:
        raise ConfigError(f"unknown Flux checkpoint format {format!r}; expected one of {FORMATS}")
    return bfl_key_map(config) if format == "bfl" else diffusers_key_map(config)


def open_checkpoint(path: str | os.PathLike) -> tuple[W.CheckpointReader, str]:
    """Open a Flux checkpoint (file, index.json or directory) and detect its format.

    BFL files may carry the `model.diffusion_model.` prefix (ComfyUI-style single files); it is
    stripped. A diffusers pipeline directory is read from its `transformer/` subfolder.
    """
    reader = W.CheckpointReader(path, subfolder_hint="transformer")
    if any(k.startswith(BFL_PREFIX) for k in reader.keys()):
        reader = W.CheckpointReader(path, prefix=BFL_PREFIX, subfolder_hint="transformer")
    if "img_in.weight" in reader:
        return reader, "bfl"
    if "x_embedder.weight" in reader:
        return reader, "diffusers"
    raise W.CheckpointError(
        f"{path}: not a Flux transformer checkpoint (neither BFL's 'img_in.weight' nor diffusers' "
        f"'x_embedder.weight' is present; first keys: {reader.keys()[:5]})"
    )


def _count_blocks(reader: W.CheckpointReader, prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    indices = {int(m.group(1)) for k in reader.keys() if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def _diffusers_config_file(path: Path) -> Path | None:
    for folder in (path, path / "transformer") if path.is_dir() else (path.parent,):
        candidate = folder / DIFFUSERS_CONFIG
        if candidate.is_file():
            return candidate
    return None


def infer_config(path: str | os.PathLike, **overrides: Any) -> FluxConfig:
    """The config of a checkpoint: from our own metadata or diffusers' config.json when present,
    otherwise from tensor shapes. `overrides` replace fields (e.g. dtype, remat, axes_dim).

    Shapes fix every field except the rotary split `axes_dim` and `theta`: 128-wide heads get
    BFL's (16, 56, 56) and 10000; other widths need `axes_dim=` passed explicitly.
    """
    reader, fmt = open_checkpoint(path)
    stored = reader.metadata().get(CONFIG_METADATA_KEY)
    if stored:
        return dataclasses.replace(FluxConfig.from_dict(json.loads(stored)), **overrides)
    config_file = _diffusers_config_file(Path(path))
    if fmt == "diffusers" and config_file is not None:
        return FluxConfig.from_diffusers_config(json.loads(config_file.read_text()), **overrides)

    names = {
        "bfl": dict(img="img_in", txt="txt_in", vec="vector_in.in_layer", out="final_layer.linear",
                    guidance="guidance_in.in_layer.weight", double="double_blocks", single="single_blocks",
                    norm="double_blocks.0.img_attn.norm.query_norm.scale", mlp="double_blocks.0.img_mlp.0.weight",
                    bias="double_blocks.0.img_attn.qkv.bias"),
        "diffusers": dict(img="x_embedder", txt="context_embedder", vec="time_text_embed.text_embedder.linear_1",
                          out="proj_out", guidance="time_text_embed.guidance_embedder.linear_1.weight",
                          double="transformer_blocks", single="single_transformer_blocks",
                          norm="transformer_blocks.0.attn.norm_q.weight", mlp="transformer_blocks.0.ff.net.0.proj.weight",
                          bias="transformer_blocks.0.attn.to_q.bias"),
    }[fmt]
    hidden, in_channels = reader.shape(f"{names['img']}.weight")
    head_dim = reader.shape(names["norm"])[0]
    values: dict[str, Any] = dict(
        in_channels=in_channels,
        out_channels=reader.shape(f"{names['out']}.weight")[0],
        vec_in_dim=reader.shape(f"{names['vec']}.weight")[1],
        context_in_dim=reader.shape(f"{names['txt']}.weight")[1],
        hidden_size=hidden,
        mlp_ratio=reader.shape(names["mlp"])[0] / hidden,
        num_heads=hidden // head_dim,
        depth=_count_blocks(reader, names["double"]),
        depth_single_blocks=_count_blocks(reader, names["single"]),
        qkv_bias=names["bias"] in reader,
        guidance_embed=names["guidance"] in reader,
    )
    values.update(overrides)
    if "axes_dim" not in values:
        if head_dim not in DEFAULT_AXES_DIM:
            raise ConfigError(
                f"{path}: heads are {head_dim} wide, so the rotary split axes_dim cannot be inferred "
                f"(known: {DEFAULT_AXES_DIM}); pass axes_dim=(...) summing to {head_dim}"
            )
        values["axes_dim"] = DEFAULT_AXES_DIM[head_dim]
    return FluxConfig(**values)


def load(
    path: str | os.PathLike,
    config: FluxConfig | None = None,
    *,
    shardings: Any = None,
    **overrides: Any,
) -> Flux:
    """Load a BFL or diffusers Flux checkpoint (file, directory or index.json), streaming.

    config: the model config; inferred (see `infer_config`) when None. `overrides` replace config
    fields either way (e.g. dtype="bfloat16", param_dtype="bfloat16", remat="full").
    shardings: optional tree matching `nnx.state(model, nnx.Param)` (an nnx.State or its pure
    dict, e.g. from `sga_jax.parallel.state_shardings`); each parameter goes straight there.
    Raises `CheckpointError` naming any missing, unexpected or mis-shaped tensor.
    """
    reader, fmt = open_checkpoint(path)
    if config is None:
        config = infer_config(path, **overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    return W.load_module(lambda: Flux(config, rngs=nn.construction_rngs(0)), reader, key_map(config, fmt), shardings=shardings)


def _dtype(dtype: Any) -> np.dtype | None:
    return None if dtype is None else np.dtype(jnp.dtype(dtype))


def save(
    model: Flux,
    path: str | os.PathLike,
    format: str = "bfl",
    *,
    dtype: Any = None,
    max_shard_bytes: int = 5 * 2**30,
) -> list[Path]:
    """Write `model` as safetensors in BFL's or diffusers' layout; returns the files written.

    bfl: `path` is the .safetensors file (a directory gets `flux.safetensors`); the header
    metadata also records our config so `load` needs no hints. diffusers: `path` is a directory
    that `FluxTransformer2DModel.from_pretrained` reads (config.json plus
    `diffusion_pytorch_model.safetensors`, sharded with an index.json when large).
    dtype: storage dtype (e.g. "bfloat16"); default: the parameters' own.
    """
    config = model.config
    path = Path(path)
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(config.to_dict())}
    if format == "diffusers":
        path.mkdir(parents=True, exist_ok=True)
        diffusers_config = config.to_diffusers_config()
        target = path / DIFFUSERS_WEIGHTS
    else:
        key_map(config, format)  # validates the format name
        target = path if path.suffix == ".safetensors" else path / BFL_WEIGHTS
    files = W.save_state(
        target,
        nnx.state(model, nnx.Param),
        key_map(config, format),
        dtype=_dtype(dtype),
        max_shard_bytes=max_shard_bytes,
        metadata=metadata,
    )
    if format == "diffusers":
        (path / DIFFUSERS_CONFIG).write_text(json.dumps(diffusers_config, indent=2) + "\n")
    return files


def convert_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    format: str,
    *,
    config: FluxConfig | None = None,
    dtype: Any = None,
    max_shard_bytes: int = 5 * 2**30,
    **overrides: Any,
) -> list[Path]:
    """Rewrite a Flux checkpoint in another layout without building the model: safetensors in
    (BFL or diffusers), safetensors out in `format`, one block's tensor at a time, so peak host
    memory is a few tensors whatever the model size. No torch involved.

    `dst` follows `save`'s conventions; dtype defaults to the source's storage dtype.
    """
    reader, src_format = open_checkpoint(src)
    if config is None:
        config = infer_config(src, **overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    source_map, target_map = key_map(config, src_format), key_map(config, format)
    first = "img_in.weight" if src_format == "bfl" else "x_embedder.weight"
    out_dtype = _dtype(dtype) or np.dtype(reader.read(first).dtype)
    abstract = _abstract_params(config)
    specs = W.export_specs(abstract, target_map, out_dtype)
    tensors = W.transcode_tensors(reader, source_map, target_map, abstract, out_dtype)
    dst = Path(dst)
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(config.to_dict())}
    if format == "diffusers":
        dst.mkdir(parents=True, exist_ok=True)
        (dst / DIFFUSERS_CONFIG).write_text(json.dumps(config.to_diffusers_config(), indent=2) + "\n")
        target_file = dst / DIFFUSERS_WEIGHTS
    else:
        target_file = dst if dst.suffix == ".safetensors" else dst / BFL_WEIGHTS
    return W.write_safetensors(target_file, specs, tensors, max_shard_bytes=max_shard_bytes, metadata=metadata)


def param_count(config: FluxConfig) -> int:
    """Number of parameters of a model with this config (from shapes only)."""
    return int(sum(np.prod(s, dtype=np.int64) for s in _param_paths(config).values()))


def shardings_for(config: FluxConfig, mesh: jax.sharding.Mesh, rules: Any = None) -> dict:
    """Parameter shardings of a Flux model on `mesh` by its logical axis names (see `parallel`)."""
    from sga_jax import parallel

    return parallel.state_shardings(_abstract_params(config), mesh, parallel.resolve_rules(rules))
