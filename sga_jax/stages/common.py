"""Pieces every training stage shares: model configs from a config section, the frozen priors by
name, per-example loss weights that ignore padding slots, per-example losses, frozen modules
loaded from their paths (or initialised from the seed), the image batches of `config.data` and
the probe's examples from it."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sga_jax import parallel
from sga_jax.data.pipeline import make_pipeline
from sga_jax.errors import ConfigError
from sga_jax.models import dinov2, dinov3, flux, sam2, vae
from sga_jax.models.vae.convert import open_checkpoint as open_vae_checkpoint
from sga_jax.train.state import model_key
from sga_jax.weights import converted

log = logging.getLogger(__name__)

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


def prior_config(section: ml_collections.ConfigDict, dtype: str, *, needed: bool = True) -> tuple[str, Any]:
    """(kind, model config in `dtype` with the section's `attention`) of a `config.model.prior`
    section; the config is None when the run does not need the prior (its weights are then never
    fetched). An unknown kind is a ConfigError either way."""
    kind = section.kind
    if kind not in PRIOR_MODELS:
        raise ConfigError(f"config.model.prior.kind={kind!r}: expected one of {sorted(PRIOR_MODELS)}")
    if not needed:
        return kind, None
    config = model_config(section, PRIOR_MODELS[kind][0], kind)
    return kind, dataclasses.replace(config, dtype=dtype, param_dtype=dtype, attention=section.get("attention", "xla"))


def example_weights(batch: dict, size: int) -> jax.Array:
    """Per-example weights summing to 1 over the real examples (`valid`; padding slots get 0)."""
    valid = batch.get("valid")
    valid = jnp.ones((size,), jnp.float32) if valid is None else valid.astype(jnp.float32)
    return valid / jnp.maximum(jnp.sum(valid), 1.0)


def per_example(loss_fn: Callable[..., jax.Array], *arrays: jax.Array) -> jax.Array:
    """(B,) values of a batch-mean loss `loss_fn(a, b, ...)` applied to each example alone."""
    return jax.vmap(lambda *rows: loss_fn(*(r[None] for r in rows)))(*arrays)


def frozen_copy(module: nnx.Module) -> nnx.Module:
    """`module` with `jax.lax.stop_gradient` on all its variables: a player's view of another
    player's parameters (or of a part that does not train)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.lax.stop_gradient(state))


def load_frozen_parts(
    paths: dict[str, Path | None],
    shardings: Callable[[str], Any],
    load_part: Callable[[str, Path, Any], dict],
    init_random: Callable[[jax.Array], dict],
    seed: int,
) -> dict[str, dict]:
    """The pure-dict state of each frozen part named in `paths`: `load_part(name, path,
    shardings(name))` for a part with a path; a part whose path is None is randomly initialised by
    `init_random(key)` (the engine's model key, so it equals the engine's own initialisation; only
    those parts are computed, XLA drops the others' initialisers), with a warning."""
    state = {}
    random_parts = [name for name, path in paths.items() if path is None]
    if random_parts:
        for name in random_parts:
            log.warning("the frozen %s has no weights configured: it is RANDOM", name)

        key = model_key(seed)  # concrete: the parts are built with eagerly drawn keys (nn.construction_rngs)

        def init() -> dict:
            full = init_random(key)
            return {name: full[name] for name in random_parts}

        out_shardings = {name: shardings(name) for name in random_parts}
        state.update(jax.jit(init, out_shardings=out_shardings)())
    for name, path in paths.items():
        if path is not None:
            state[name] = load_part(name, path, shardings(name))
    return state


class ImageBatches:
    """Batches of the Grain pipeline of `config.data` as global arrays sharded along the batch;
    host-side values (captions, keys) pass through. A stage adds host-side work in `prepare`."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, *, seed: int):
        self.task_config = config
        self.mesh = mesh
        self.rules = parallel.resolve_rules(config.sharding_rules)
        self.pipeline = make_pipeline(config.data, seed=seed)

    def prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        """This process's batch (numpy) before it becomes global arrays; unchanged here."""
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        return parallel.host_to_global(self.prepare(dict(next(self.pipeline))), self.mesh, self.rules)

    def get_state(self) -> dict[str, Any]:
        return self.pipeline.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.pipeline.set_state(state)


def probe_examples(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """The feature-drift probe's examples: the first `config.probe.batch_size` examples of the
    run's data with its seed (filler slots dropped; captions and keys as str arrays)."""
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.global_batch_size, data.worker_count = int(config.probe.batch_size), 0
    pipeline = make_pipeline(data, seed=int(config.seed), process_index=0, process_count=1)
    try:
        batch = next(pipeline)
    finally:
        pipeline.close()
    keep = np.flatnonzero(batch.pop("valid"))
    if keep.size == 0:
        raise ConfigError(f"probe: the first batch of {data.path or 'the data'} has no readable image")
    return {k: (np.asarray(v, str) if k in ("caption", "key") else np.asarray(v))[keep] for k, v in batch.items()}
