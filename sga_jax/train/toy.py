"""A tiny task for exercising the engine: a residual MLP student (stacked, scanned blocks) learns a
frozen random teacher from deterministic synthetic data.

It has everything a real stage has at toy size: logical axes on every parameter, a frozen module,
a two-term loss with its metrics, per-step randomness, host-side string values in the batch, a
resumable iterator, and sample / eval callbacks. `config.toy.nan_batches` lists batch indices
whose inputs are NaN, to drive the NaN guard end to end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sga_jax import parallel
from sga_jax.models import nn


class ResidualBlock(nnx.Module):
    """x + down(gelu(up(norm(x))))."""

    def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs):
        self.norm = nn.layer_norm(width, rngs=rngs)
        self.up = nn.linear(width, hidden, ("embed", "mlp"), rngs=rngs)
        self.down = nn.linear(hidden, width, ("mlp", "embed"), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.down(nn.gelu_tanh(self.up(self.norm(x))))


class Student(nnx.Module):
    """features -> width -> `depth` stacked residual blocks -> features."""

    def __init__(self, features: int, width: int, hidden: int, depth: int, *, rngs: nnx.Rngs):
        self.inp = nn.linear(features, width, (None, "embed"), rngs=rngs)
        self.blocks = nn.stack_layers(lambda r: ResidualBlock(width, hidden, rngs=r), depth, rngs)
        self.out = nn.linear(width, features, ("embed", None), rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = nn.constrain(self.inp(x), ("batch", "embed"))
        h = nn.scan_layers(self.blocks, h, lambda block, carry, _: block(carry))
        return self.out(h), h


class Teacher(nnx.Module):
    """A fixed random two-layer MLP, the regression target."""

    def __init__(self, features: int, hidden: int, *, rngs: nnx.Rngs):
        self.up = nn.linear(features, hidden, (None, "mlp"), rngs=rngs)
        self.down = nn.linear(hidden, features, ("mlp", None), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jnp.tanh(self.up(x)))


class ToyBatches:
    """Deterministic batches {"x": (B, features) float32, "caption": list[str]}; batch i depends
    only on (seed, i), so the state is just the next index."""

    def __init__(self, config: Any, mesh: Mesh, *, seed: int):
        self.batch_size = int(config.batch_size)
        self.features = int(config.toy.features)
        self.nan_batches = frozenset(int(i) for i in config.toy.nan_batches)
        self.mesh = mesh
        self.rules = parallel.resolve_rules(config.sharding_rules)
        self.seed = int(seed)
        self.index = 0

    def __iter__(self) -> ToyBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, self.index])
        x = rng.standard_normal((self.batch_size, self.features), dtype=np.float32)
        if self.index in self.nan_batches:
            x[0, 0] = np.nan
        per_process = self.batch_size // jax.process_count()
        rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
        local = {"x": x[rows], "caption": [f"batch {self.index} row {i}" for i in range(rows.start, rows.stop)]}
        self.index += 1
        return parallel.host_to_global(local, self.mesh, self.rules)

    def get_state(self) -> dict[str, Any]:
        return {"index": self.index, "seed": self.seed}

    def set_state(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"toy iterator state has seed {state['seed']}, this run uses {self.seed}")
        self.index = int(state["index"])


class ToyTask:
    """Student regresses the teacher on noisy inputs; loss = mse + activation_weight * mean(h^2)."""

    images_per_example = 1

    def __init__(self) -> None:
        self.noise = 0.0
        self.activation_weight = 0.0

    def configure(self, config: Any) -> None:
        """Read the loss settings of `config.toy` (called by the engine before tracing)."""
        self.noise = float(config.toy.noise)
        self.activation_weight = float(config.toy.activation_weight)

    def build(self, config: Any, rngs: nnx.Rngs) -> tuple[Student, Teacher]:
        t = config.toy
        student = Student(t.features, t.width, t.hidden, t.depth, rngs=rngs)
        return student, Teacher(t.features, t.hidden, rngs=rngs)

    def loss(self, trainable: Student, frozen: Teacher, batch: dict, rng: jax.Array, *, step: jax.Array | None = None):
        x = batch["x"]
        target = frozen(x)
        x_in = x + self.noise * jax.random.normal(rng, x.shape, x.dtype)
        pred, hidden = trainable(x_in)
        mse = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))
        act = jnp.mean(jnp.square(hidden.astype(jnp.float32)))
        return mse + self.activation_weight * act, {"loss_mse": mse, "loss_act": act}

    def batches(self, config: Any, mesh: Mesh, *, seed: int) -> ToyBatches:
        return ToyBatches(config, mesh, seed=seed)

    def batch_shapes(self, config: Any, bucket: None) -> dict[str, jax.ShapeDtypeStruct]:
        """{"x": (batch_size, features) float32}: the arrays of every batch (there are no buckets)."""
        return {"x": jax.ShapeDtypeStruct((int(config.batch_size), int(config.toy.features)), jnp.float32)}

    def _probe(self, features: int) -> jax.Array:
        return jnp.asarray(np.random.default_rng(12345).standard_normal((16, features), dtype=np.float32))

    def sample(self, trainable: Student, frozen: Teacher, step: int, workdir: Path, rng: jax.Array) -> dict:
        """Save the student's predictions on a fixed probe to samples/step_XXXXXXXX.npy."""
        probe = self._probe(trainable.inp.in_features)
        pred, _ = trainable(probe)
        out = Path(workdir) / "samples"
        if jax.process_index() == 0:
            out.mkdir(parents=True, exist_ok=True)
            np.save(out / f"step_{step:08d}.npy", np.asarray(jax.device_get(pred)))
        return {"rms": float(jnp.sqrt(jnp.mean(jnp.square(pred))))}

    def evaluate(self, trainable: Student, frozen: Teacher, step: int, workdir: Path, rng: jax.Array) -> dict:
        """Mean squared error against the teacher on the fixed probe (no input noise)."""
        probe = self._probe(trainable.inp.in_features)
        pred, _ = trainable(probe)
        return {"mse": float(jnp.mean(jnp.square(pred - frozen(probe))))}
