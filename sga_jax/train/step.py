"""The train step: a pure function (state, frozen, batch) -> (state, metrics), jitted with shardings.

Mixed precision: trainable parameters are fp32 masters; the loss sees them cast to the compute
dtype (so FSDP gathers half the bytes in bf16), and the gradients come back in fp32 through that
cast. Frozen variables (the frozen module, the trainable module's `nn.Frozen` weights) are used in
the dtype the task stored them in (e.g. a bf16 text encoder, a LoRA's bf16 base) and get no gradient. Gradient accumulation splits the global batch
into k micro-batches and scans over them. A NaN/Inf loss or gradient skips the update (params,
optimizer state and EMA are kept), counts it, and leaves the decision to stop to the loop.

The update is one `lax.cond` on that check, and the check is the finiteness of the loss and of the
gradients' global norm (a NaN or Inf in any element makes the norm non-finite; so would a finite
gradient whose squares overflow float32, which no sane step has). Per-leaf checks and per-leaf
`where(finite, new, old)` selections of parameters, both Adam moments and the EMA would be a few
small XLA fusions for every parameter tensor: a third of the compile time of the VAE stage's step
on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from sga_jax import parallel
from sga_jax.train.optim import DEFAULT_GROUP
from sga_jax.train.state import FrozenState, Graphs, Setup, TrainState, cast_floating, merge_frozen, merge_trainable
from sga_jax.train.task import Task

StepFn = Callable[[TrainState, Any, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]


def split_micro_batches(batch: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
    """(B, ...) -> (k, B/k, ...), micro-batch i holding rows i, i+k, i+2k, ...

    Every device keeps its own rows (a device's contiguous block of B rows splits evenly into the k
    micro-batches), so no data moves between devices.
    """

    def split(x: jax.Array) -> jax.Array:
        if x.shape[0] % k:
            raise ValueError(f"batch dimension {x.shape[0]} is not divisible by grad_accum_steps={k}")
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def make_train_step(
    task: Task,
    graphs: Graphs,
    optimizer: optax.GradientTransformation,
    schedules: dict[str, optax.Schedule],
    *,
    compute_dtype: str = "float32",
    grad_accum_steps: int = 1,
    ema_decay: float = 0.0,
    mesh: Mesh | None = None,
    rules: dict | None = None,
) -> StepFn:
    """The un-jitted train step. With `mesh` and `rules`, micro-batches are constrained to the batch
    sharding. The task's loss gets `step=state.step` (the iteration, counted from 0). Metrics: loss,
    the task's metrics, grad_norm, lr (of this update; `lr_<group>` for each further parameter
    group), skipped (0/1), nan_skips and nan_streak (after this step)."""
    dtype = jnp.dtype(compute_dtype)
    k = int(grad_accum_steps)

    def loss_fn(params: dict, model_state: dict, frozen: FrozenState, batch: dict, rng: jax.Array, step: jax.Array):
        trainable = merge_trainable(graphs.trainable, cast_floating(params, dtype), frozen, model_state)
        loss, metrics = task.loss(trainable, merge_frozen(graphs, frozen), batch, rng, step=step)
        return loss.astype(jnp.float32), {name: v.astype(jnp.float32) for name, v in metrics.items()}

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def constrain(batch: dict) -> dict:
        if mesh is None or rules is None:
            return batch
        return {
            name: jax.lax.with_sharding_constraint(x, parallel.batch_sharding(mesh, rules))
            for name, x in batch.items()
        }

    def grads_and_metrics(state: TrainState, frozen: Any, batch: dict, rng: jax.Array):
        if k == 1:
            (loss, metrics), grads = grad_fn(state.params, state.model_state, frozen, batch, rng, state.step)
            return loss, metrics, grads
        micro = split_micro_batches(batch, k)

        def micro_step(index: jax.Array, micro_batch: dict):
            rng_i = jax.random.fold_in(rng, index)
            return grad_fn(state.params, state.model_state, frozen, constrain(micro_batch), rng_i, state.step)

        shapes = jax.eval_shape(micro_step, jnp.int32(0), jax.tree.map(lambda x: x[0], micro))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def body(carry, inputs):
            return jax.tree.map(jnp.add, carry, micro_step(*inputs)), None

        total, _ = jax.lax.scan(body, zeros, (jnp.arange(k, dtype=jnp.int32), micro))
        (loss, metrics), grads = jax.tree.map(lambda x: x / k, total)
        return loss, metrics, grads

    def train_step(state: TrainState, frozen: Any, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        loss, metrics, grads = grads_and_metrics(state, frozen, batch, rng)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(_: None) -> tuple[Any, Any, Any]:
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            ema = state.ema
            if ema is not None:
                ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
            return params, opt_state, ema

        def skip(_: None) -> tuple[Any, Any, Any]:
            return state.params, state.opt_state, state.ema

        params, opt_state, ema = jax.lax.cond(finite, update, skip, None)
        skipped = (~finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            ema=ema,
            nan_skips=state.nan_skips + skipped,
            nan_streak=jnp.where(finite, 0, state.nan_streak + 1),
        )
        updates_applied = state.step - state.nan_skips
        rates = {"lr" if name == DEFAULT_GROUP else f"lr_{name}": jnp.asarray(schedule(updates_applied), jnp.float32)
                 for name, schedule in schedules.items()}
        out = {
            "loss": loss,
            **metrics,
            "grad_norm": grad_norm,
            **rates,
            "skipped": skipped,
            "nan_skips": new_state.nan_skips,
            "nan_streak": new_state.nan_streak,
        }
        return new_state, out

    return train_step


def jit_train_step(step: StepFn, setup: Setup) -> StepFn:
    """`jax.jit` of the step with the state's shardings in and out and the state's buffers donated;
    the batch keeps the sharding it arrives with."""
    mesh = jax.tree.leaves(setup.state_shardings)[0].mesh
    rep = parallel.replicated(mesh)
    return jax.jit(
        step,
        in_shardings=(setup.state_shardings, setup.frozen_shardings, None),
        out_shardings=(setup.state_shardings, rep),
        donate_argnums=(0,),
    )
