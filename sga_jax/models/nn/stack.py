"""Stacked layers: copies of a block on a leading `layers` axis, run by `jax.lax.scan` (one compile
whatever the depth) under a configurable rematerialisation policy."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from sga_jax.models.nn.lora import dropout_rng, next_dropout_key


M = TypeVar("M", bound=nnx.Module)

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


def stack_layers(make: Callable[[nnx.Rngs], M], count: int, rngs: nnx.Rngs) -> M:
    """Build `count` copies of a module with independent random init, stacked on a leading axis.

    Every parameter gains a leading axis of size `count` whose logical name is "layers"; run the
    stack with `scan_layers`, which compiles the block once.
    """

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(layer_rngs: nnx.Rngs) -> M:
        return make(layer_rngs)

    return build(rngs)


def remat(fn: Callable, policy: str) -> Callable:
    """Apply a named rematerialisation policy to `fn`.

    none: keep every activation; full: recompute everything in the backward pass; dots: save
    matmul outputs only; dots_no_batch: save matmuls without batch dimensions (weights-like).
    """
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat policy {policy!r} is not one of {REMAT_POLICIES}")
    if policy == "none":
        return fn
    policies = {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }
    return jax.checkpoint(fn, policy=policies[policy], prevent_cse=False)


def scan_layers(
    stacked: nnx.Module,
    carry: Any,
    body: Callable[[nnx.Module, Any, jax.Array], Any],
    *,
    remat_policy: str = "none",
) -> Any:
    """Run `carry = body(layer, carry, index)` over a stack built by `stack_layers`, with lax.scan.

    The block compiles once whatever the depth; `index` is the layer number (an int32 scalar), for
    bodies that act at one chosen layer (e.g. a hidden-state tap). Inside a `lora.dropout_rng`
    block, each layer's adapters draw their dropout keys from a key folded with the layer number.
    """
    graphdef, state = nnx.split(stacked)
    count = jax.tree.leaves(state)[0].shape[0]
    dropout_key = next_dropout_key()

    def step(carry: Any, inputs: tuple[Any, jax.Array]) -> tuple[Any, None]:
        layer_state, index = inputs
        with dropout_rng(None if dropout_key is None else jax.random.fold_in(dropout_key, index)):
            return body(nnx.merge(graphdef, layer_state), carry, index), None

    carry, _ = jax.lax.scan(remat(step, remat_policy), carry, (state, jnp.arange(count, dtype=jnp.int32)))
    return carry
