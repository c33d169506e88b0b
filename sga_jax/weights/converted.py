"""Converted model directories: a family's parameters as an orbax checkpoint (`params/`) plus
`sga_config.json` (family + model config), written by `python -m sga_jax.convert` and read back by
training configs, sampling and export with the right shardings; and the registry of model families.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
from flax import nnx

from sga_jax.errors import ConfigError
from sga_jax.models import nn
from sga_jax.weights import hub

CONFIG_FILE = "sga_config.json"


@dataclasses.dataclass(frozen=True)
class Family:
    """Where a model family lives, what its config and module classes are called, and which files
    of a folder (or hub repo) its weights are (`hub.Layout`).

    `extra_files` names the further checkpoint files its `load(path, ...)` takes as keyword
    arguments (LPIPS: `lin`, its head, which ships apart from the trunk); the convert command line
    offers each as `--NAME FILE`.
    """

    module: str
    config_class: str
    model_class: str
    layout: hub.Layout = hub.PRETRAINED
    extra_files: tuple[str, ...] = ()

    def load_module(self) -> ModuleType:
        return importlib.import_module(self.module)


FAMILIES: dict[str, Family] = {
    "flux": Family("sga_jax.models.flux", "FluxConfig", "Flux", hub.FLUX),
    "vae": Family("sga_jax.models.vae", "AutoEncoderConfig", "AutoEncoder", hub.VAE),
    "dinov2": Family("sga_jax.models.dinov2", "Dinov2Config", "Dinov2"),
    "dinov3": Family("sga_jax.models.dinov3", "Dinov3Config", "Dinov3"),
    "sam2": Family("sga_jax.models.sam2", "Sam2HieraConfig", "Sam2Hiera"),
    "t5": Family("sga_jax.models.t5", "T5Config", "T5EncoderModel"),
    "clip": Family("sga_jax.models.clip", "ClipTextConfig", "ClipTextModel"),
    "lpips": Family("sga_jax.models.lpips", "LPIPSConfig", "LPIPS", extra_files=("lin",)),
    "inception": Family("sga_jax.models.inception", "InceptionConfig", "InceptionV3"),
}


def family(name: str) -> Family:
    """The registry entry for a family name, with a clear error for unknown names."""
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def resolve_weights(name: str, spec: str | Path) -> Path:
    """The local path of family `name`'s weights at `spec` (a path or hub id, see `sga_jax.weights.hub`)."""
    return hub.resolve(spec, family(name).layout)


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def save_converted(name: str, model: nnx.Module, dst: str | Path) -> Path:
    """Write a model's parameters as an orbax checkpoint plus its config, under directory `dst`."""
    dst = Path(dst).absolute()
    dst.mkdir(parents=True, exist_ok=True)
    config = model.config
    (dst / CONFIG_FILE).write_text(json.dumps({"family": name, "config": config.to_dict()}, indent=2))
    checkpointer = _checkpointer()
    checkpointer.save(dst / "params", nnx.state(model, nnx.Param), force=True)
    checkpointer.wait_until_finished()
    return dst


def is_converted(path: str | Path) -> bool:
    """Whether `path` is a directory written by `save_converted`."""
    return (Path(path) / CONFIG_FILE).is_file()


def load_converted(path: str | Path, *, shardings: Any = None, **overrides: Any) -> nnx.Module:
    """Rebuild a model from a `save_converted` directory, restoring straight into `shardings`.

    `overrides` replace config fields (e.g. dtype="bfloat16", remat="full").
    """
    path = Path(path).absolute()
    meta = json.loads((path / CONFIG_FILE).read_text())
    entry = family(meta["family"])
    module = entry.load_module()
    config = getattr(module, entry.config_class).from_dict(meta["config"])
    if overrides:
        config = dataclasses.replace(config, **overrides)
    abstract = nnx.eval_shape(lambda: getattr(module, entry.model_class)(config, rngs=nn.construction_rngs(0)))
    graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
    if shardings is not None:
        abstract_params = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params, shardings
        )
    params = _checkpointer().restore(path / "params", abstract_params)
    return nnx.merge(graphdef, params, rest)


def load_model(name: str, path: str | Path, *, shardings: Any = None, **overrides: Any) -> nnx.Module:
    """Load a family's model from either a converted directory or its public checkpoint format."""
    if is_converted(path):
        return load_converted(path, shardings=shardings, **overrides)
    return family(name).load_module().load(path, shardings=shardings, **overrides)


def import_checkpoint(name: str, src: str | Path, dst: str | Path, **extra_files: str | Path) -> Path:
    """Read family `name`'s checkpoint at `src` (its public format; a path or hub id), with the
    family's `extra_files` given by name, and write it as a converted directory `dst`; returns `dst`."""
    entry = family(name)
    unknown = sorted(set(extra_files) - set(entry.extra_files))
    if unknown:
        raise ConfigError(f"--{unknown[0]} is not an input of the {name} import (it takes {list(entry.extra_files)})")
    extra = {key: resolve_weights(name, path) for key, path in extra_files.items()}
    return save_converted(name, entry.load_module().load(resolve_weights(name, src), **extra), dst)


def export_checkpoint(name: str, src: str | Path, dst: str | Path, *, format: str, dtype: str | None = None) -> None:
    """Write family `name`'s model from `src` (a converted directory, or any checkpoint `load_model`
    reads) as safetensors at `dst` in the family's export `format` (e.g. "diffusers", "bfl")."""
    module = family(name).load_module()
    if not hasattr(module, "save"):
        raise ConfigError(f"the {name} family is import-only: it has no export format")
    model = load_model(name, resolve_weights(name, src))
    kwargs = {"dtype": dtype} if dtype else {}
    module.save(model, dst, format=format, **kwargs)
