"""Low-rank adapters (LoRA) on the linear layers that `nn.linear` makes, and weights that do not train.

A LoRA layer computes `y = x W + b + scale * x A B` with A (in, rank), B (rank, out) and
`scale = alpha / rank` (Hu et al. 2021; PEFT's convention). A linear layer whose output is several
projections side by side (Flux's fused qkv, its single block's q/k/v/mlp `linear1`) declares those
`parts`; each adapted part gets its own A and B, so the adapters map one to one onto the separate
modules of implementations that do not fuse them (diffusers' `to_q`, `to_k`, `to_v`, ...).

Which layers get adapters is a `LoRAConfig`'s `targets`: regular expressions fully matched
against a family's layer names (a part is `<layer>.<part>`, and a pattern naming the layer
covers all its parts). A model built with a `LoRAConfig` marks its other weights `Frozen`: a
Variable type that is not an `nnx.Param`, so the training engine gives it neither gradients nor
optimizer state and carries it with the frozen state instead of the checkpoint.

Dropout on the adapters' input needs randomness only while training: inside
`with lora.dropout_rng(key):` every adapter call draws its own key from `key` (folded with the
layer index in `scan_layers`); outside it, adapters are deterministic.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

Part = tuple[str, int]  # (name, output features)
WHOLE = "all"  # the part name of a layer that is not fused: the adapter covers all its outputs


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Settings of the adapters of one model.

    rank: inner dimension r of A (in, r) and B (r, out); alpha: numerator of `scale = alpha / rank`
    (None: alpha = rank, scale 1, as diffusers' Flux LoRA scripts do); dropout: rate on the
    adapters' input while training; targets: regular expressions fully matched against layer names
    (see the module docstring); param_dtype: storage dtype of A and B (float32 master weights for
    training).
    """

    rank: int
    alpha: float | None = None
    dropout: float = 0.0
    targets: tuple[str, ...] = ()
    param_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRAConfig.rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"LoRAConfig.alpha must be positive (or None for alpha = rank), got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise ValueError("LoRAConfig.targets is empty: name the layers to adapt (regular expressions)")
        for pattern in self.targets:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"LoRAConfig.targets: {pattern!r} is not a regular expression: {e}") from e

    @property
    def scale(self) -> float:
        """alpha / rank."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def adapted_parts(self, name: str, parts: Sequence[Part]) -> tuple[str, ...]:
        """The parts of layer `name` the targets select: all when a target matches the layer's name,
        else those whose `<name>.<part>` matches (a whole layer's one part is the layer itself)."""
        if any(re.fullmatch(t, name) for t in self.targets):
            return tuple(p for p, _ in parts)
        return tuple(p for p, _ in parts if p != WHOLE and any(re.fullmatch(t, f"{name}.{p}") for t in self.targets))


class Frozen(nnx.Variable):
    """A weight that does not train (e.g. the base weights under a LoRA). Not an `nnx.Param`: the
    engine gives it no gradient or optimizer state and loads it on every start like the frozen module."""


class LoRA(nnx.Module):
    """One adapter: `x -> x A B`, A (in, rank) and B (rank, out) as `nnx.LoRAParam`s."""

    def __init__(self, in_features: int, out_features: int, rank: int, *, a_init: Callable, b_init: Callable,
                 param_dtype: Any, rngs: nnx.Rngs):
        self.a = nnx.LoRAParam(a_init(rngs.params(), (in_features, rank), param_dtype))
        self.b = nnx.LoRAParam(b_init(rngs.params(), (rank, out_features), param_dtype))

    def __call__(self, x: jax.Array, dtype: Any) -> jax.Array:
        a, b = self.a[...], self.b[...]
        if dtype is not None:
            x, a, b = x.astype(dtype), a.astype(dtype), b.astype(dtype)
        return (x @ a) @ b

    def delta(self) -> jax.Array:
        """A B in float32, (..., in, out) for stacked adapters."""
        return jnp.einsum("...ir,...ro->...io", self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32))


class LoRALinear(nnx.Linear):
    """`nnx.Linear` (same `kernel` and `bias`) plus adapters on some of its output parts:
    `y = x W + b + scale * concat_p(x A_p B_p)`, parts without an adapter adding nothing."""

    def __init__(self, in_features: int, out_features: int, *, parts: Sequence[Part], adapted: Sequence[str],
                 lora: LoRAConfig, a_init: Callable, b_init: Callable, rngs: nnx.Rngs, **linear_kwargs: Any):
        super().__init__(in_features, out_features, rngs=rngs, **linear_kwargs)
        if sum(size for _, size in parts) != out_features:
            raise ValueError(f"LoRALinear: parts {tuple(parts)} do not add up to {out_features} output features")
        self.parts = tuple((str(name), int(size)) for name, size in parts)
        self.scale = lora.scale
        self.dropout = lora.dropout
        self.lora = nnx.Dict({
            name: LoRA(in_features, size, lora.rank, a_init=a_init, b_init=b_init,
                       param_dtype=jnp.dtype(lora.param_dtype), rngs=rngs)
            for name, size in self.parts if name in adapted
        })

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        y = super().__call__(inputs, out_sharding)
        x = _dropout(inputs, self.dropout)
        deltas = [self.lora[name](x, self.dtype) if name in self.lora else jnp.zeros((*y.shape[:-1], size), y.dtype)
                  for name, size in self.parts]
        delta = deltas[0] if len(deltas) == 1 else jnp.concatenate(deltas, axis=-1)
        return y + (self.scale * delta).astype(y.dtype)

    def merged_kernel(self, scale: float = 1.0) -> jax.Array:
        """The kernel plus `scale * self.scale * A_p B_p` on each adapted part's columns, summed in
        float32 one part at a time and stored in the kernel's dtype ((layers, in, out) when stacked)."""
        kernel = self.kernel[...]
        pieces, start = [], 0
        for name, size in self.parts:
            piece = kernel[..., start : start + size]
            if name in self.lora:
                piece = (piece.astype(jnp.float32) + scale * self.scale * self.lora[name].delta()).astype(kernel.dtype)
            pieces.append(piece)
            start += size
        return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=-1)


def adapted_layers(model: nnx.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(dotted path, layer) of every LoRALinear in `model`, in graph order."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, LoRALinear):
            yield ".".join(str(p) for p in path), node


def freeze(model: nnx.Module) -> None:
    """Mark every `nnx.Param` of `model` that is not an adapter (`nnx.LoRAParam`) as `Frozen`, in place,
    keeping its value and metadata (logical axes)."""
    for _, node in list(nnx.iter_graph(model)):
        if not isinstance(node, nnx.Module):
            continue
        for name, value in list(vars(node).items()):
            if isinstance(value, nnx.Param) and not isinstance(value, nnx.LoRAParam):
                setattr(node, name, Frozen(value.get_value(), **value.get_metadata()))


BASE_WEIGHTS = nnx.Any(Frozen, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))  # everything but the adapters


def merged_weights(model: nnx.Module, scale: float = 1.0) -> dict:
    """The weights of `model` without its adapters, as the pure dict a model without LoRA has (its
    Params), each adapted kernel replaced by its `merged_kernel(scale)`; `scale` multiplies the
    adapters' own alpha / rank."""
    flat = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, BASE_WEIGHTS))}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, LoRALinear):
            flat[(*path, "kernel")] = node.merged_kernel(scale)
    return traverse_util.unflatten_dict(flat)


class _KeySource:
    """A PRNG key and how many keys have been drawn from it."""

    def __init__(self, key: jax.Array):
        self.key, self.count = key, 0

    def draw(self) -> jax.Array:
        key = jax.random.fold_in(self.key, self.count)
        self.count += 1
        return key


_DROPOUT_KEYS: contextvars.ContextVar[_KeySource | None] = contextvars.ContextVar("lora_dropout_keys", default=None)


@contextlib.contextmanager
def dropout_rng(key: jax.Array | None) -> Iterator[None]:
    """Adapter dropout is on inside this block, each adapter call drawing its own key from `key`
    (None: off). Use it inside the traced function, around the forward."""
    token = _DROPOUT_KEYS.set(None if key is None else _KeySource(key))
    try:
        yield
    finally:
        _DROPOUT_KEYS.reset(token)


def next_dropout_key() -> jax.Array | None:
    """A fresh key from the enclosing `dropout_rng` block, or None outside one."""
    source = _DROPOUT_KEYS.get()
    return None if source is None else source.draw()


def _dropout(x: jax.Array, rate: float) -> jax.Array:
    key = next_dropout_key() if rate > 0 else None
    if key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)
