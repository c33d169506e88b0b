"""LoRA files for Flux, in and out: diffusers / PEFT, kohya (what ComfyUI loads) and XLabs layouts.

Layouts (module names with a block index i; A is (rank, in) and B (out, rank) as PyTorch stores them):

- diffusers / PEFT: `transformer.<diffusers module>.lora_A.weight` / `.lora_B.weight`, e.g.
  `transformer.transformer_blocks.{i}.attn.to_q`; the scale alpha / rank comes from `<module>.alpha`
  tensors or the file's `lora_adapter_metadata` (diffusers' `save_lora_weights`), else 1. Written to
  `pytorch_lora_weights.safetensors`, the name `load_lora_weights(DIR)` looks for, with the scale
  folded into B (no alpha needed by diffusers or ComfyUI).
- kohya (sd-scripts, ComfyUI): `lora_unet_<BFL module with _>.lora_down.weight` / `.lora_up.weight`
  / `.alpha` on BFL's fused modules, e.g. `lora_unet_double_blocks_{i}_img_attn_qkv`; scale alpha /
  rank. Our per-projection adapters of a fused layer are written block-diagonally (down stacks the
  A's, up holds each B in its own rows and columns, alpha times the part count), the form
  sd-scripts' `split_qkv` saves; ComfyUI's `diffusion_model.<BFL module>` spelling is also read.
- XLabs (x-flux): `double_blocks.{i}.processor.{qkv,proj}_lora{1,2}.{down,up}.weight` and
  `single_blocks.{i}.processor.{qkv,proj}_lora.*`; read only, scale 1.

Every name is derived from the Flux key maps (`convert.bfl_key_map`, `convert.diffusers_key_map`)
and the model's own layer parts; only XLabs' processor names are a table here. A file is read into
`Adapters` (one A, B and scale per layer, block and projection) which either become a LoRA model's
adapters (`attach`, unmerged) or are added to the base weights (`merge`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from sga_jax import weights as W
from sga_jax.models import nn
from sga_jax.models.flux import convert
from sga_jax.models.flux.model import Flux, FluxConfig
from sga_jax.models.nn.lora import WHOLE, Part

log = logging.getLogger(__name__)

# diffusers' Flux LoRA training scripts (PEFT target_modules attn.to_{q,k,v}, attn.to_out.0,
# attn.add_{q,k,v}_proj, attn.to_add_out, ff.net.{0.proj,2}, ff_context.net.{0.proj,2}, which also
# match the single blocks' attn.to_{q,k,v}) in our layer names.
DEFAULT_TARGETS = (
    r"double_blocks\.(img|txt)_attn\.(qkv|proj)",
    r"double_blocks\.(img|txt)_mlp\.[02]",
    r"single_blocks\.linear1\.[qkv]",
)
FORMATS = ("diffusers", "kohya")  # written; "xlabs" is read too
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "flux_lora_kohya.safetensors"
DIFFUSERS_PREFIXES = ("transformer.", "base_model.model.", "")
KOHYA_PREFIX = "lora_unet_"
COMFY_PREFIX = "diffusion_model."
PEFT_METADATA_KEY = "lora_adapter_metadata"
TEXT_ENCODER_PREFIXES = ("text_encoder", "lora_te", "text_encoders.")
XLABS = {  # x-flux's LoRA processors -> our layer (a qkv LoRA covers the first parts of linear1)
    "double_blocks.{i}.processor.qkv_lora1": "double_blocks.img_attn.qkv",
    "double_blocks.{i}.processor.proj_lora1": "double_blocks.img_attn.proj",
    "double_blocks.{i}.processor.qkv_lora2": "double_blocks.txt_attn.qkv",
    "double_blocks.{i}.processor.proj_lora2": "double_blocks.txt_attn.proj",
    "single_blocks.{i}.processor.qkv_lora": "single_blocks.linear1",
    "single_blocks.{i}.processor.proj_lora": "single_blocks.linear2",
}


@dataclasses.dataclass(frozen=True)
class Layer:
    """One linear layer of Flux as LoRA files name it.

    name: ours (`double_blocks.img_attn.qkv`); in_features: its input width; parts: (name, size)
    of its output projections; layers: stack depth (None: not stacked); bfl: BFL module
    (`double_blocks.{i}.img_attn.qkv`);
    diffusers: the diffusers module of each part (`transformer_blocks.{i}.attn.to_q`, ...);
    swap_halves: diffusers stores the two output halves the other way round (norm_out.linear).
    """

    name: str
    in_features: int
    parts: tuple[Part, ...]
    layers: int | None
    bfl: str
    diffusers: tuple[str, ...]
    swap_halves: bool

    @property
    def kohya(self) -> str:
        return KOHYA_PREFIX + self.bfl.replace(".", "_")

    def indices(self) -> list[int | None]:
        return list(range(self.layers)) if self.layers is not None else [None]

    def offsets(self) -> dict[str, tuple[int, int]]:
        """Part name -> (start, size) along the output axis."""
        starts = np.cumsum([0] + [size for _, size in self.parts])
        return {name: (int(start), size) for (name, size), start in zip(self.parts, starts)}


@dataclasses.dataclass
class Adapter:
    """One low-rank update `scale * x a b`: a (in, rank), b (rank, out) float32 numpy arrays."""

    a: np.ndarray
    b: np.ndarray
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.a.shape[1]


Site = tuple[str, int | None, str]  # (layer name, block index or None, part name)
Adapters = dict[Site, Adapter]


def _module(key: str) -> str:
    return key.removesuffix(".weight")


@functools.lru_cache(maxsize=8)
def layers(config: FluxConfig) -> dict[str, Layer]:
    """Every linear layer of a Flux with this config, by our name, with its names in LoRA files
    (derived from the BFL and diffusers key maps and the model's fused-layer parts)."""
    base = dataclasses.replace(config, lora=None)
    every = convert.abstract_model(dataclasses.replace(base, lora=nn.LoRAConfig(rank=1, targets=(".*",))))
    bfl, diffusers = convert.bfl_key_map(base), convert.diffusers_key_map(base)
    out = {}
    for name, layer in nn.adapted_layers(every):
        theirs, ours = diffusers[f"{name}.kernel"], bfl[f"{name}.kernel"]
        if isinstance(theirs.transform, W.Concat) and theirs.transform.sizes != tuple(s for _, s in layer.parts):
            raise AssertionError(f"{name}: diffusers splits {theirs.transform.sizes}, the model {layer.parts}")
        out[name] = Layer(name, layer.in_features, layer.parts, ours.layers, _module(ours.keys[0]),
                          tuple(_module(k) for k in theirs.keys), isinstance(theirs.transform, W.SwapHalves))
    return out


def _swap_halves(x: np.ndarray, axis: int) -> np.ndarray:
    first, second = np.split(x, 2, axis=axis)
    return np.concatenate([second, first], axis=axis)


def _site_name(layer: str, part: str) -> str:
    return layer if part == WHOLE else f"{layer}.{part}"


# ---------------------------------------------------------------- from and to a LoRA model


def from_model(model: Flux) -> Adapters:
    """The adapters of a LoRA Flux, one per layer, block and projection (float32 copies)."""
    out: Adapters = {}
    for name, layer in nn.adapted_layers(model):
        for part, adapter in layer.lora.items():
            a = np.asarray(jax.device_get(adapter.a[...]), np.float32)
            b = np.asarray(jax.device_get(adapter.b[...]), np.float32)
            if a.ndim == 2:
                out[(name, None, part)] = Adapter(a, b, layer.scale)
            else:
                out.update({(name, i, part): Adapter(a[i], b[i], layer.scale) for i in range(a.shape[0])})
    return out


def lora_config(adapters: Adapters, param_dtype: str = "float32") -> nn.LoRAConfig:
    """A LoRAConfig holding `adapters`: their largest rank (smaller ones are zero-padded), scale 1
    (each adapter's scale goes into its B), targets naming exactly the adapted projections."""
    if not adapters:
        raise ValueError("no LoRA adapters to attach")
    sites = sorted({_site_name(layer, part) for layer, _, part in adapters})
    return nn.LoRAConfig(rank=max(a.rank for a in adapters.values()), targets=tuple(re.escape(s) for s in sites),
                         param_dtype=param_dtype)


def attach(model: Flux, adapters: Adapters, scale: float = 1.0, *, dtype: str | None = None) -> Flux:
    """`model` (a Flux without LoRA) with `adapters` added unmerged: a LoRA Flux whose base weights
    are the model's (`nn.Frozen`) and whose A, B are the adapters', B times `scale` and the
    adapter's own scale; blocks an adapter does not reach get zeros. A and B are stored in `dtype`
    (default: the model's parameter dtype)."""
    dtype = dtype or model.config.param_dtype
    config = dataclasses.replace(model.config, lora=lora_config(adapters, dtype))
    graphdef, params, frozen = nnx.split(convert.abstract_model(config), nnx.LoRAParam, nn.Frozen)
    nnx.replace_by_pure_dict(frozen, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    nnx.replace_by_pure_dict(params, _stacked(adapters, config, params, scale))
    return nnx.merge(graphdef, params, frozen)


def _stacked(adapters: Adapters, config: FluxConfig, params: nnx.State, scale: float) -> dict:
    """The LoRAParam values of a model with `config` (abstract `params`) filled from `adapters`."""
    table = layers(config)
    flat = {}
    for path, var in nnx.to_flat_state(params):
        *layer_path, _, part, which = (str(p) for p in path)
        layer = table[".".join(layer_path)]
        value = np.zeros(var.get_value().shape, np.float32)
        for index in layer.indices():
            adapter = adapters.get((layer.name, index, part))
            if adapter is None:
                continue
            target = value if index is None else value[index]
            if which == "a":
                target[:, : adapter.rank] = adapter.a
            else:
                target[: adapter.rank] = adapter.b * (adapter.scale * scale)
        flat[path] = jnp.asarray(value, var.get_value().dtype)
    return traverse_util.unflatten_dict(flat)


def merged(model: Flux, scale: float = 1.0) -> Flux:
    """A LoRA Flux's adapters merged into its kernels (`nn.merged_weights`, `scale` times their own
    scale): a Flux without LoRA, in the base weights' dtype."""
    graphdef, params = nnx.split(convert.abstract_model(dataclasses.replace(model.config, lora=None)), nnx.Param)
    nnx.replace_by_pure_dict(params, nn.merged_weights(model, scale))
    return nnx.merge(graphdef, params)


def merge(model: Flux, adapters: Adapters, scale: float = 1.0) -> Flux:
    """`model` (without LoRA) with `adapters` merged into its kernels: `W + scale * s * a b` per
    adapter, summed in float32 and stored in the model's dtype."""
    return merged(attach(model, adapters, scale, dtype="float32"))


# ---------------------------------------------------------------- reading files


def read(path: str | os.PathLike, config: FluxConfig) -> Adapters:
    """The adapters of a LoRA file (diffusers / PEFT, kohya, ComfyUI or XLabs layout, detected from
    its keys) for a Flux with `config`. Text-encoder LoRA tensors are skipped with a warning; any
    other tensor the layout does not name is an error listing them. `path` may be a directory
    holding `pytorch_lora_weights.safetensors` (diffusers) or `adapter_model.safetensors` (PEFT)."""
    reader = W.CheckpointReader(_lora_file(Path(path)))
    keys = set(reader.keys())
    text = {k for k in keys if k.startswith(TEXT_ENCODER_PREFIXES)}
    if text:
        log.warning("%s: %d text-encoder LoRA tensors skipped (only the transformer's are applied)", path, len(text))
    keys -= text
    if any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys):
        adapters, used = _read_kohya(reader, keys, config)
    elif any(".processor." in k for k in keys):
        adapters, used = _read_xlabs(reader, keys, config)
    elif any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys):
        adapters, used = _read_diffusers(reader, keys, config, Path(path))
    else:
        raise W.CheckpointError(f"{reader.path}: not a LoRA file (no lora_A/lora_B, lora_down/lora_up or XLabs "
                                f"processor tensors; first keys: {sorted(keys)[:5]})")
    unused = sorted(keys - used)
    if unused:
        raise W.CheckpointError(f"{reader.path}: {len(unused)} tensors name no layer of this Flux: "
                                + ", ".join(unused[:10]) + (" ..." if len(unused) > 10 else ""))
    if not adapters:
        raise W.CheckpointError(f"{reader.path}: no LoRA adapter for this Flux")
    return adapters


def _lora_file(path: Path) -> Path:
    if not path.is_dir():
        return path
    for name in (DIFFUSERS_FILE, "adapter_model.safetensors"):
        if (path / name).is_file():
            return path / name
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"{path}: expected {DIFFUSERS_FILE}, adapter_model.safetensors or one .safetensors file")
    return files[0]


def _read_tensor(reader: W.CheckpointReader, key: str, shape: tuple[int | None, ...]) -> np.ndarray:
    """A 2-D tensor as float32, its shape checked where `shape` gives a size."""
    tensor = reader.read(key)
    if tensor.ndim != len(shape) or any(want is not None and got != want for got, want in zip(tensor.shape, shape)):
        want = tuple("r" if s is None else s for s in shape)
        raise W.CheckpointError(f"{reader.file_of(key)}: tensor {key!r} has shape {tensor.shape}, expected {want}")
    return tensor.astype(np.float32)


def _peft_metadata(reader: W.CheckpointReader, path: Path, prefix: str) -> dict[str, Any]:
    """The PEFT LoraConfig fields stored with the file (diffusers' header metadata, prefix stripped,
    or a PEFT directory's adapter_config.json); {} when there are none."""
    raw = reader.metadata().get(PEFT_METADATA_KEY)
    if raw:
        return {k.removeprefix(prefix): v for k, v in json.loads(raw).items()}
    config_file = (path if path.is_dir() else path.parent) / "adapter_config.json"
    return json.loads(config_file.read_text()) if config_file.is_file() else {}


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of `module`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_diffusers(reader: W.CheckpointReader, keys: set[str], config: FluxConfig, path: Path):
    prefix = next(p for p in DIFFUSERS_PREFIXES if any(k.startswith(p) and ".lora_" in k for k in keys))
    meta = _peft_metadata(reader, path, prefix)
    if meta.get("use_dora") or any("lora_magnitude_vector" in k for k in keys):
        raise W.CheckpointError(f"{reader.path}: DoRA adapters are not supported (only LoRA)")
    adapters, used = {}, set()
    for layer in layers(config).values():
        for index in layer.indices():
            for (part, size), module_template in zip(layer.parts, layer.diffusers):
                module = module_template.format(i=index)
                a_key, b_key = f"{prefix}{module}.lora_A.weight", f"{prefix}{module}.lora_B.weight"
                if a_key not in keys and b_key not in keys:
                    continue
                if f"{prefix}{module}.lora_B.bias" in keys:
                    raise W.CheckpointError(f"{reader.path}: {module} has a lora_B bias, which is not supported")
                a = _read_tensor(reader, a_key, (None, layer.in_features))
                b = _read_tensor(reader, b_key, (size, a.shape[0]))
                alpha_key = f"{prefix}{module}.alpha"
                rank = a.shape[0]
                if alpha_key in keys:
                    alpha = float(reader.read(alpha_key))
                    used.add(alpha_key)
                else:
                    alpha = float(_pattern_value(meta.get("alpha_pattern") or {}, module, meta.get("lora_alpha", rank)))
                root = math.sqrt(rank) if meta.get("use_rslora") else rank
                b = b.T
                if layer.swap_halves:
                    b = _swap_halves(b, 1)
                adapters[(layer.name, index, part)] = Adapter(a.T, b, alpha / root)
                used.update((a_key, b_key))
    return adapters, used


def _split_fused(layer: Layer, down: np.ndarray, up: np.ndarray, scale: float, where: str) -> dict[str, Adapter]:
    """One LoRA over the first parts of a fused layer, down (R, in) and up (rows, R), as one adapter
    per part. Each part keeps the columns of `up` its rows use (kohya's block-diagonal form gives
    each part its own; a shared down projection stays whole), so the split is exact; parts whose
    rows are all zero get none."""
    offsets = layer.offsets()
    covered = [name for name, (start, size) in offsets.items() if start + size <= up.shape[0]]
    if not covered or offsets[covered[-1]][0] + offsets[covered[-1]][1] != up.shape[0]:
        raise W.CheckpointError(f"{where}: up projection has {up.shape[0]} rows; {layer.name}'s parts "
                                f"{layer.parts} do not start with that many outputs")
    out = {}
    for name in covered:
        start, size = offsets[name]
        rows = up[start : start + size]
        cols = np.flatnonzero(np.any(rows != 0, axis=0))
        if cols.size:
            out[name] = Adapter(down[cols].T, rows[:, cols].T, scale)
    return out


def _read_fused(reader: W.CheckpointReader, layer: Layer, index: int | None, down_key: str, up_key: str,
                alpha_key: str | None) -> tuple[dict[str, Adapter], set[str]]:
    down = _read_tensor(reader, down_key, (None, layer.in_features))
    up = _read_tensor(reader, up_key, (None, down.shape[0]))
    used = {down_key, up_key}
    alpha = float(down.shape[0])
    if alpha_key is not None and alpha_key in reader:
        alpha = float(reader.read(alpha_key))
        used.add(alpha_key)
    return _split_fused(layer, down, up, alpha / down.shape[0], f"{reader.file_of(up_key)}: {up_key}"), used


def _read_kohya(reader: W.CheckpointReader, keys: set[str], config: FluxConfig):
    adapters, used = {}, set()
    for layer in layers(config).values():
        for index in layer.indices():
            for module in (layer.kohya.format(i=index), COMFY_PREFIX + layer.bfl.format(i=index)):
                down_key, up_key = f"{module}.lora_down.weight", f"{module}.lora_up.weight"
                if down_key in keys or up_key in keys:
                    parts, keys_used = _read_fused(reader, layer, index, down_key, up_key, f"{module}.alpha")
                    adapters.update({(layer.name, index, part): adapter for part, adapter in parts.items()})
                    used |= keys_used
    return adapters, used


def _read_xlabs(reader: W.CheckpointReader, keys: set[str], config: FluxConfig):
    table = layers(config)
    adapters, used = {}, set()
    for template, name in XLABS.items():
        layer = table[name]
        for index in layer.indices():
            for module in (template.format(i=index), COMFY_PREFIX + template.format(i=index)):
                down_key, up_key = f"{module}.down.weight", f"{module}.up.weight"
                if down_key in keys or up_key in keys:
                    parts, keys_used = _read_fused(reader, layer, index, down_key, up_key, None)
                    adapters.update({(layer.name, index, part): adapter for part, adapter in parts.items()})
                    used |= keys_used
    return adapters, used


# ---------------------------------------------------------------- writing files


def write(adapters: Adapters, config: FluxConfig, out: str | os.PathLike, format: str = "diffusers", *,
          dtype: Any = None) -> Path:
    """Write `adapters` as a LoRA file in `format` ("diffusers" or "kohya"); returns the file.

    `out` is the .safetensors file, or a directory that gets `pytorch_lora_weights.safetensors`
    (diffusers) or `flux_lora_kohya.safetensors` (kohya). dtype: storage dtype (default float32);
    kohya's alpha scalars stay float32."""
    if format not in FORMATS:
        raise ValueError(f"unknown LoRA format {format!r}; expected one of {FORMATS}")
    out = Path(out)
    file = out if out.suffix == ".safetensors" else out / (DIFFUSERS_FILE if format == "diffusers" else KOHYA_FILE)
    dtype = np.dtype(jnp.dtype(dtype)) if dtype is not None else np.dtype(np.float32)
    tensors = _diffusers_tensors(adapters, config) if format == "diffusers" else _kohya_tensors(adapters, config)
    tensors = {k: v.astype(np.float32 if k.endswith(".alpha") else dtype) for k, v in tensors.items()}
    metadata = {"format": "pt", "sga_jax.lora": json.dumps({"format": format, "flux": config.to_dict()})}
    specs = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    W.write_safetensors(file, specs, tensors.items(), metadata=metadata)
    return file


def _ordered(adapters: Adapters, config: FluxConfig):
    """(layer, index, {part: adapter}) in the model's layer order, blocks ascending."""
    for layer in layers(config).values():
        for index in layer.indices():
            parts = {p: adapters[(layer.name, index, p)] for p, _ in layer.parts if (layer.name, index, p) in adapters}
            if parts:
                yield layer, index, parts


def _diffusers_tensors(adapters: Adapters, config: FluxConfig) -> dict[str, np.ndarray]:
    """PEFT keys with the scale folded into lora_B (so alpha = rank everywhere)."""
    tensors = {}
    for layer, index, parts in _ordered(adapters, config):
        modules = dict(zip((p for p, _ in layer.parts), layer.diffusers))
        for part, adapter in parts.items():
            module = "transformer." + modules[part].format(i=index)
            b = adapter.b * adapter.scale
            tensors[f"{module}.lora_A.weight"] = adapter.a.T
            tensors[f"{module}.lora_B.weight"] = _swap_halves(b, 1).T if layer.swap_halves else b.T
    return tensors


def _kohya_tensors(adapters: Adapters, config: FluxConfig) -> dict[str, np.ndarray]:
    """One (lora_down, lora_up, alpha) per BFL module; a fused layer's adapters block-diagonally."""
    tensors = {}
    for layer, index, parts in _ordered(adapters, config):
        scales = {adapter.scale for adapter in parts.values()}
        scale = scales.pop() if len(scales) == 1 else 1.0  # mixed scales go into the up blocks
        rank = sum(adapter.rank for adapter in parts.values())
        out_features = sum(size for _, size in layer.parts)
        up = np.zeros((out_features, rank), np.float32)
        column = 0
        for part, adapter in parts.items():
            start, size = layer.offsets()[part]
            up[start : start + size, column : column + adapter.rank] = adapter.b.T * (adapter.scale / scale)
            column += adapter.rank
        module = layer.kohya.format(i=index)
        tensors[f"{module}.lora_down.weight"] = np.concatenate([adapter.a.T for adapter in parts.values()], axis=0)
        tensors[f"{module}.lora_up.weight"] = up
        tensors[f"{module}.alpha"] = np.asarray(scale * rank, np.float32)
    return tensors
