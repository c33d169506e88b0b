"""The feature-drift probe: how far a stage's tapped features move away from the pre-trained
model's during fine-tuning, in channel coordinates and in spatial structure (docs/geometry.md).

SGA's claim (paper Sec. 3.2 and Appendix A) is that aligning spatial self-similarity is
non-invasive: the features may rotate in channel space (Prop. 1) but keep their pre-trained
coordinates far better than under REPA / iREPA, while their spatial structure moves toward the
prior's (Prop. 2). The probe measures both on the run itself, every `eval_every` steps, on one
fixed batch. A stage plugs in with `Taps`, three small functions:

``examples(rng) -> dict[str, np.ndarray]`` (host)
    The probe examples: images (and captions) chosen from the run's data with its seed, plus the
    fixed randomness the stage needs (noise, timesteps). Saved as WORKDIR/probe/batch.npz.
``prepare(frozen, examples) -> (inputs, prior)``
    The frozen part, once per start: the trainable model's inputs on the examples (stage 2: noisy
    latents and text embeddings) and the prior's tokens Y on their grid, (B, gh, gw, Cf).
``tap(trainable, inputs) -> (features, output)``
    The trainable model on those inputs: the tapped features X (B, h, w, C), what the alignment
    acts on through its head, and the model's output (stage 2: velocity; stage 1: reconstruction).

On a fresh start (step 0, before the first update) the probe saves the examples, runs `tap` with
the pre-trained parameters and keeps X_0 and the output on the host (WORKDIR/probe/reference.npz),
so no second copy of the model is held; those numbers are logged at step 0 (zero drift by
construction, the pre-trained model's distance to the prior). A resumed run reads both files back
and continues the same curves. Every evaluation runs `tap` once and `drift_metrics` (jitted, all
math in `sga_jax.align.geometry`); the engine logs the results with the "eval_" prefix.

Config (`config.probe`, see `default_config`): `enabled`, `batch_size`, `top_k`. The probe runs
when it is enabled and `config.eval_every > 0`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from sga_jax.align import geometry as geo
from sga_jax.align.pool import adaptive_avg_pool, grid_to_tokens
from sga_jax.errors import CheckpointError, ConfigError
from sga_jax.metrics.reconstruction import psnr

log = logging.getLogger(__name__)

BATCH_FILE = "batch.npz"
REFERENCE_FILE = "reference.npz"

# name (logged as eval_<name>) -> what it measures; docs/geometry.md explains each curve
METRICS = {
    "drift_coord": "||X_t - X_0||_F / ||X_0||_F: coordinate drift of the tapped features",
    "drift_unit": "||X_t - X_0||_F / sqrt(N) of row-normalised features: the same move without rotation (Q = I)",
    "drift_orbit": "min_Q ||X_t - X_0 Q||_F / sqrt(N) of row-normalised features, one orthogonal Q: orbit drift (Prop. 1)",
    "drift_structure": "||G(X_t) - G(X_0)||_F / N on the prior's grid: spatial-structure drift (Prop. 2)",
    "drift_angle": "largest principal angle (deg) between the top-k spatial subspaces of G(X_t) and G(X_0)",
    "prior_gram": "||G(X_t) - G(Y)||_F / N: distance to the prior's spatial structure (sqrt of L_SGA on X)",
    "prior_eig_gap": "||lambda_1..k(G(X_t)) - lambda_1..k(G(Y))||_2 / N: top-k Gram spectrum gap to the prior (Prop. 2(i))",
    "prior_angle": "largest principal angle (deg) between the top-k spatial subspaces of G(X_t) and G(Y) (Prop. 2(ii))",
    "drift_output": "||out_t - out_0|| / ||out_0||: the model's prediction against the pre-trained one",
}
IMAGE_METRICS = {"output_psnr": "PSNR (dB, images in [-1, 1]) of the output against the pre-trained output"}

Examples = dict[str, np.ndarray]


def default_config() -> ml_collections.ConfigDict:
    """`config.probe`: on by default (it runs at `eval_every`), a batch of 2, top-8 subspaces."""
    return ml_collections.ConfigDict({"enabled": True, "batch_size": 2, "top_k": 8})


def is_enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether the run probes: a `probe` section with `enabled` and `eval_every > 0`; checks the section."""
    section = config.get("probe")
    if section is None or not section.enabled or int(config.get("eval_every", 0)) <= 0:
        return False
    for key in ("batch_size", "top_k"):
        value = section.get(key)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"config.probe.{key}={value!r}: expected a positive integer")
    return True


@dataclasses.dataclass(frozen=True)
class Taps:
    """What a stage supplies to the probe (see the module docstring); `image_output`: the output
    is an image in [-1, 1], so its PSNR against the pre-trained output is logged too."""

    examples: Callable[[jax.Array], Examples]
    prepare: Callable[[nnx.Module | None, dict[str, jax.Array]], tuple[dict[str, jax.Array], jax.Array]]
    tap: Callable[[nnx.Module, dict[str, jax.Array]], tuple[jax.Array, jax.Array]]
    image_output: bool = False


def _mean_over_batch(fn: Callable[..., jax.Array], *args: jax.Array) -> jax.Array:
    """The mean of `fn` over the examples, one call per example: XLA:CPU's batched SVDs (what
    `vmap` makes of the subspace and spectrum numbers) are far slower than unbatched ones (the
    probe's numbers at 2 x 16 x 16 x 256 features: 326 ms vmapped, 71 ms per example), and the
    probe batch is small."""
    return jnp.mean(jnp.stack([fn(*(a[i] for a in args)) for i in range(args[0].shape[0])]))


def _largest_angle_deg(x: jax.Array, y: jax.Array, k: int) -> jax.Array:
    return jnp.degrees(jnp.max(geo.principal_angles(x, y, k)))


@functools.partial(jax.jit, static_argnames=("k", "image_output"))
def drift_metrics(features: jax.Array, output: jax.Array, features0: jax.Array, output0: jax.Array,
                  prior: jax.Array, *, k: int, image_output: bool = False) -> dict[str, jax.Array]:
    """The probe's numbers (`METRICS`) for tapped features X_t (B, h, w, C) and output against the
    pre-trained X_0 and output, and the prior's tokens Y (B, gh, gw, Cf), all in float32.

    Coordinate, unit and orbit drift use the whole batch at the features' own grid (one Procrustes
    Q for all B h w rows: a rotation of the channel space, as a network would apply). The Gram
    quantities are per example, at the prior's grid (X pooled there as the alignment heads pool),
    averaged over the batch; `k` is the subspace size (at most min(gh gw, C, Cf)).
    """
    b, _, _, c = features.shape
    x = features.astype(jnp.float32).reshape(-1, c)
    x0 = features0.astype(jnp.float32).reshape(-1, c)
    unit, orbit = geo.zero_set_distances(x, x0)
    rows = math.sqrt(x.shape[0])
    grid = prior.shape[1:3]
    pooled = grid_to_tokens(adaptive_avg_pool(features.astype(jnp.float32), grid))
    pooled0 = grid_to_tokens(adaptive_avg_pool(features0.astype(jnp.float32), grid))
    y = grid_to_tokens(prior.astype(jnp.float32))
    out, out0 = output.astype(jnp.float32), output0.astype(jnp.float32)
    metrics = {
        "drift_coord": geo.coordinate_drift(x, x0),
        "drift_unit": unit / rows,
        "drift_orbit": orbit / rows,
        "drift_structure": _mean_over_batch(geo.gram_distance, pooled, pooled0),
        "drift_angle": _mean_over_batch(functools.partial(_largest_angle_deg, k=k), pooled, pooled0),
        "prior_gram": _mean_over_batch(geo.gram_distance, pooled, y),
        "prior_eig_gap": _mean_over_batch(functools.partial(geo.eigenvalue_gap, k=k), pooled, y),
        "prior_angle": _mean_over_batch(functools.partial(_largest_angle_deg, k=k), pooled, y),
        "drift_output": geo.coordinate_drift(out.reshape(b, -1), out0.reshape(b, -1)),
    }
    if image_output:
        metrics["output_psnr"] = jnp.mean(psnr(out, out0))
    return metrics


def _replicated(state: Any) -> NamedSharding | None:
    """Replicated over the mesh the state lives on (so every process can read the result), or
    None when it lives on one device."""
    for leaf in jax.tree.leaves(state):
        if isinstance(getattr(leaf, "sharding", None), NamedSharding):
            return NamedSharding(leaf.sharding.mesh, PartitionSpec())
    return None


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an .npz atomically, from process 0 only."""
    if jax.process_index() != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _load(path: Path, expected: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Read an .npz (no pickles); with `expected` ({key: ShapeDtypeStruct}), check every key's shape."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    for key, spec in (expected or {}).items():
        if key not in arrays:
            raise CheckpointError(f"{path}: missing array {key!r} (has {sorted(arrays)})")
        if arrays[key].shape != tuple(spec.shape):
            raise CheckpointError(f"{path}: {key!r} has shape {arrays[key].shape}, expected {tuple(spec.shape)} "
                                  "(the probe batch or the model changed since the run started)")
    return arrays


def _numeric(examples: Examples) -> dict[str, np.ndarray]:
    """The arrays a jitted function can take (strings such as captions stay on the host)."""
    return {k: v for k, v in examples.items() if np.asarray(v).dtype.kind in "biuf"}


def _split(module: nnx.Module | None) -> tuple[nnx.GraphDef | None, Any]:
    return (None, None) if module is None else nnx.split(module)


def _merge(graph: nnx.GraphDef | None, state: Any) -> nnx.Module | None:
    return None if graph is None else nnx.merge(graph, state)


class FeatureProbe:
    """The probe of one run: `start` at every start of training, `measure` at every evaluation."""

    def __init__(self, config: ml_collections.ConfigDict, taps: Taps):
        self.top_k = int(config.top_k)
        self.taps = taps
        self.inputs: dict[str, jax.Array] | None = None  # on the devices, from one `prepare` per start
        self.prior: jax.Array | None = None
        self.reference: dict[str, np.ndarray] | None = None
        self.k = self.top_k
        self._prepare = self._tap = None

    def _compile(self, state: Any) -> None:
        """The jitted prepare / tap, their results replicated over the state's mesh; the prior's
        tokens, the features and the output in float32 (what the reference files hold)."""
        if self._tap is not None:
            return
        kwargs = {} if (sharding := _replicated(state)) is None else {"out_shardings": sharding}
        taps = self.taps

        def prepare(graph: nnx.GraphDef | None, state: Any, examples: dict) -> tuple[dict, jax.Array]:
            inputs, prior = taps.prepare(_merge(graph, state), examples)
            return inputs, prior.astype(jnp.float32)

        def tap(graph: nnx.GraphDef, state: Any, inputs: dict) -> tuple[jax.Array, jax.Array]:
            features, output = taps.tap(nnx.merge(graph, state), inputs)
            return features.astype(jnp.float32), output.astype(jnp.float32)

        self._prepare = jax.jit(prepare, static_argnums=0, **kwargs)
        self._tap = jax.jit(tap, static_argnums=0, **kwargs)

    def start(self, trainable: nnx.Module, frozen: nnx.Module | None, step: int, workdir: str | Path,
              rng: jax.Array) -> dict[str, float] | None:
        """Fresh start (`step` 0): choose and save the probe batch, record the pre-trained features
        and output, and return the step-0 numbers. Resume: read both files back (returns None).
        Without the files (the run began without the probe) the probe stays off for this run."""
        directory = Path(workdir) / "probe"
        graph, state = nnx.split(trainable)
        f_graph, f_state = _split(frozen)
        self._compile(state)
        if step == 0:
            examples = self.taps.examples(rng)
            _save(directory / BATCH_FILE, examples)
        elif not ((directory / BATCH_FILE).is_file() and (directory / REFERENCE_FILE).is_file()):
            log.warning("probe: %s has no %s and %s (the run began without the probe): no drift is measured "
                        "in this run", directory, BATCH_FILE, REFERENCE_FILE)
            return None
        else:
            examples = _load(directory / BATCH_FILE)
        self.inputs, self.prior = self._prepare(f_graph, f_state, _numeric(examples))
        features, output = self._tap(graph, state, self.inputs)
        self._choose_k(features.shape[-1])
        if step == 0:
            self.reference = {"features": np.asarray(features), "output": np.asarray(output)}
            _save(directory / REFERENCE_FILE, self.reference)
            metrics = self._metrics(features, output)
            metrics.pop("output_psnr", None)  # the output against itself: infinite by construction
            return metrics
        self.reference = _load(directory / REFERENCE_FILE, {"features": features, "output": output})
        return None

    def _choose_k(self, channels: int) -> None:
        _, gh, gw, prior_channels = self.prior.shape
        self.k = min(self.top_k, gh * gw, channels, prior_channels)
        if self.k < self.top_k:
            log.warning("probe: top_k=%d is more than min(tokens %d, channels %d, prior channels %d): using %d",
                        self.top_k, gh * gw, channels, prior_channels, self.k)

    def _metrics(self, features: jax.Array, output: jax.Array) -> dict[str, float]:
        ref = self.reference
        values = drift_metrics(features, output, ref["features"], ref["output"], self.prior, k=self.k,
                               image_output=self.taps.image_output)
        return {name: float(v) for name, v in jax.device_get(values).items()}

    def measure(self, trainable: nnx.Module) -> dict[str, float]:
        """The probe's numbers for the current parameters (empty when the probe is off for this run)."""
        if self.reference is None:
            return {}
        graph, state = nnx.split(trainable)
        features, output = self._tap(graph, state, self.inputs)
        return self._metrics(features, output)
