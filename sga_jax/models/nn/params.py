"""Parameter factories whose parameters carry logical axis names, and the dtype settings of configs.

Conventions: channels-last; `dtype` is the compute dtype, `param_dtype` the storage dtype of
parameters; every parameter carries logical axis names (see DESIGN.md) that `sga_jax.parallel`
maps onto a device mesh. Sharding is applied later, never eagerly at construction.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sga_jax.models.nn.lora import WHOLE, LoRAConfig, LoRALinear, Part


Axes = tuple[str | None, ...]
Dtype = Any


def logical(init: Callable, axes: Axes) -> Callable:
    """Wrap an initializer so that its parameter carries the logical axis names `axes`.

    Sharding is applied later by `sga_jax.parallel` (never eagerly at construction), so modules can
    be built without a mesh, under `nnx.eval_shape`, or inside a jitted sharded initialiser.
    """
    return nnx.with_partitioning(init, axes, eager_sharding=False)


def linear(
    in_features: int,
    out_features: int,
    axes: tuple[str | None, str | None] = ("embed", "mlp"),
    *,
    rngs: nnx.Rngs,
    use_bias: bool = True,
    dtype: Dtype = None,
    param_dtype: Dtype = jnp.float32,
    kernel_init: Callable = nnx.initializers.lecun_normal(),
    lora: LoRAConfig | None = None,
    name: str = "",
    parts: Sequence[Part] | None = None,
) -> nnx.Linear:
    """A dense layer whose kernel (in, out) and bias (out,) carry logical axis names.

    With `lora`, a layer whose `name` (or one of whose `parts`, see `LoRAConfig.adapted_parts`) the
    targets select is a `LoRALinear`: the same kernel and bias plus adapters A (in, rank) and B
    (rank, part) with the kernel's input and output axis names (A is Gaussian with std 1 / rank and B
    zero, PEFT's "gaussian" start, so the layer starts as the base). `parts`: the (name, size) of the
    projections a fused layer's output concatenates; default one part covering all outputs.
    """
    common = dict(
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=logical(kernel_init, axes),
        bias_init=logical(nnx.initializers.zeros_init(), (axes[1],)),
        rngs=rngs,
    )
    parts = tuple(parts) if parts is not None else ((WHOLE, out_features),)
    adapted = lora.adapted_parts(name, parts) if lora is not None else ()
    if not adapted:
        return nnx.Linear(in_features, out_features, **common)
    return LoRALinear(
        in_features,
        out_features,
        parts=parts,
        adapted=adapted,
        lora=lora,
        a_init=logical(nnx.initializers.normal(stddev=1.0 / lora.rank), (axes[0], None)),
        b_init=logical(nnx.initializers.zeros_init(), (None, axes[1])),
        **common,
    )


def conv(
    in_features: int,
    out_features: int,
    kernel_size: int | Sequence[int] = 3,
    *,
    rngs: nnx.Rngs,
    strides: int | Sequence[int] = 1,
    padding: str | int | Sequence[tuple[int, int]] = "SAME",
    use_bias: bool = True,
    dtype: Dtype = None,
    param_dtype: Dtype = jnp.float32,
    axes: tuple[str | None, str | None] = ("conv_in", "conv_out"),
    kernel_init: Callable = nnx.initializers.lecun_normal(),
) -> nnx.Conv:
    """A 2-D channels-last convolution; kernel (kh, kw, in, out) with logical axes on in/out.

    An integer `padding` pads every side by that much, as PyTorch's `padding=p` does.
    """
    if isinstance(kernel_size, int):
        kernel_size = (kernel_size, kernel_size)
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nnx.Conv(
        in_features,
        out_features,
        kernel_size=tuple(kernel_size),
        strides=strides,
        padding=padding,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=logical(kernel_init, (None, None) + tuple(axes)),
        bias_init=logical(nnx.initializers.zeros_init(), (axes[1],)),
        rngs=rngs,
    )


def dtype_of(name: str | None) -> Dtype:
    """A config's dtype name ("float32", "bfloat16", None) as a jnp dtype (None stays None)."""
    return None if name is None else jnp.dtype(name)


class _ConcreteStream(nnx.RngStream):
    """An RngStream whose draw counter is a NumPy array, so it stays concrete while a module is
    built inside a trace (`nnx.eval_shape`, `jax.jit`); the keys are those of `nnx.RngStream`.
    Nothing runs on a device (the planner builds under meshes of devices that cannot run here).
    Inside a transform that batches the stream (`nnx.split_rngs` + `nnx.vmap`), it counts as
    flax does."""

    def __init__(self, key: jax.Array | int, *, tag: str):
        super().__init__(key, tag=tag)
        self.count = nnx.RngCount(np.zeros(self.key.shape, np.uint32), tag=tag)

    def __call__(self) -> jax.Array:
        count = self.count[...]
        if isinstance(count, jax.core.Tracer):
            return super().__call__()
        key = jax.random.fold_in(self.key[...], count)
        self.count.set_value(count + np.uint32(1))  # a new array: traces may hold the old one
        return key


def construction_rngs(key: jax.Array | int) -> nnx.Rngs:
    """`nnx.Rngs(key)` for building models inside a trace: the same keys, counted on the host.

    With a plain `nnx.Rngs` every draw inside a trace updates a traced counter, and flax 0.12's
    `Variable.set_value` then reads `.sharding` of that tracer, which makes JAX build an error
    message by walking every equation traced so far: building a model under `nnx.eval_shape`
    costs time quadratic in its number of parameters (tens of seconds for the tiny demo networks).
    Here the counter is a NumPy array; the keys and the initialisers still run traced.
    """
    rngs = nnx.Rngs()
    setattr(rngs, "default", _ConcreteStream(key, tag="default"))
    return rngs
