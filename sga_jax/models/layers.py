"""Building blocks shared by every model family: parameter factories with logical axis names,
norms, activations, attention, rotary embeddings, activation sharding constraints, and stacked
layers run with `jax.lax.scan` under a configurable remat policy.

Conventions: channels-last; `dtype` is the compute dtype, `param_dtype` the storage dtype of
parameters; every parameter carries logical axis names (see DESIGN.md) that
`sga_jax.parallel` maps onto a device mesh.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd

Axes = tuple[str | None, ...]
Dtype = Any
M = TypeVar("M", bound=nnx.Module)

ATTENTION_IMPLEMENTATIONS = ("xla", "chunked", "cudnn")
CHUNKED_QUERY_BLOCK = 128
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


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
) -> nnx.Linear:
    """A dense layer whose kernel (in, out) and bias (out,) carry logical axis names."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=logical(kernel_init, axes),
        bias_init=logical(nnx.initializers.zeros_init(), (axes[1],)),
        rngs=rngs,
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
        kernel_init=logical(nnx.initializers.lecun_normal(), (None, None) + tuple(axes)),
        bias_init=logical(nnx.initializers.zeros_init(), (axes[1],)),
        rngs=rngs,
    )


def layer_norm(
    dim: int,
    *,
    rngs: nnx.Rngs,
    eps: float = 1e-6,
    affine: bool = True,
    dtype: Dtype = None,
    param_dtype: Dtype = jnp.float32,
    axis_name: str | None = "embed",
) -> nnx.LayerNorm:
    """LayerNorm over the last axis (statistics in float32); `affine=False` has no parameters."""
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        use_bias=affine,
        use_scale=affine,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=logical(nnx.initializers.ones_init(), (axis_name,)),
        bias_init=logical(nnx.initializers.zeros_init(), (axis_name,)),
        use_fast_variance=False,
        rngs=rngs,
    )


def group_norm(
    num_groups: int,
    dim: int,
    *,
    rngs: nnx.Rngs,
    eps: float = 1e-6,
    dtype: Dtype = None,
    param_dtype: Dtype = jnp.float32,
) -> nnx.GroupNorm:
    """GroupNorm over channels-last features with a learned per-channel scale and bias."""
    return nnx.GroupNorm(
        dim,
        num_groups=num_groups,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=logical(nnx.initializers.ones_init(), ("conv_out",)),
        bias_init=logical(nnx.initializers.zeros_init(), ("conv_out",)),
        use_fast_variance=False,
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """Root-mean-square norm with a learned `scale` (BFL's QK norm and T5's layer norm).

    Statistics are computed in float32; the result is cast back to the input dtype before scaling.
    """

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-6,
        param_dtype: Dtype = jnp.float32,
        axis_name: str | None = "embed",
    ):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(axis_name,), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * self.scale[...].astype(x.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU with the tanh approximation (PyTorch `approximate="tanh"`)."""
    return jax.nn.gelu(x, approximate=True)


def gelu_exact(x: jax.Array) -> jax.Array:
    """GELU with the exact erf form (PyTorch's default `nn.GELU()`)."""
    return jax.nn.gelu(x, approximate=False)


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's quick GELU: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu_exact,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_tanh": gelu_tanh,
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Look up an activation by its Hugging Face / PyTorch name."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    implementation: str = "xla",
) -> jax.Array:
    """Multi-head scaled dot-product attention, the one entry point every model uses.

    Args:
      q, k, v: (B, L, H, D) queries, keys and values (keys/values may have their own length).
      bias: additive logits bias broadcastable to (B, H, Lq, Lk), e.g. T5's relative positions.
      mask: boolean, broadcastable to (B, H, Lq, Lk); False positions are excluded.
      scale: logits scale; default 1/sqrt(D). T5 uses 1.0.
      is_causal: apply a causal mask (CLIP's text encoder).
      implementation: "xla" (portable, materialises the (B, H, Lq, Lk) logits), "chunked" (portable
        and memory-efficient: `CHUNKED_QUERY_BLOCK` queries at a time, never stores probabilities
        for the backward pass; no bias or mask) or "cudnn" (fused flash attention on NVIDIA GPUs,
        bf16/fp16).
    Returns:
      (B, Lq, H, D) in the dtype of `q`.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}"
        )
    if implementation == "xla":
        return _xla_attention(q, k, v, bias=bias, mask=mask, scale=scale, is_causal=is_causal)
    if implementation == "chunked":
        if bias is not None or mask is not None or is_causal:
            raise ValueError(
                'attention implementation "chunked" takes no bias, mask or is_causal; use "xla" for those'
            )
        return _chunked_attention(q, k, v, scale=scale)
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        bias=bias,
        mask=mask,
        scale=scale,
        is_causal=is_causal,
        implementation=implementation,
    )


def _xla_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None,
    mask: jax.Array | None,
    scale: float | None,
    is_causal: bool,
) -> jax.Array:
    """Portable attention with heads laid out before tokens for the two batched matmuls.

    Logits and softmax in float32. On XLA:CPU this layout runs forward+backward about 1.6x faster
    than `jax.nn.dot_product_attention`'s (B, L, H, D) einsums, with identical results.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    logits = jnp.einsum("bhqd,bhkd->bhqk", qh, kh, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if is_causal:
        causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", probs, vh), 1, 2).astype(q.dtype)


def _chunked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None, query_block: int = CHUNKED_QUERY_BLOCK
) -> jax.Array:
    """Exact attention computed `query_block` queries at a time (all batch rows and heads at once).

    The backward pass recomputes each block's probabilities from the saved log-sum-exp (as
    FlashAttention does), so a layer keeps only q, k, v, the output and (B, H, Lq) statistics instead
    of (B, H, Lq, Lk) probabilities: memory grows linearly with the image's token count. Queries are
    zero-padded to a whole number of blocks; padded rows are dropped and get no gradient.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    length = q.shape[1]
    block = min(query_block, length)
    padded = -(-length // block) * block
    qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    qh = jnp.pad(qh * jnp.asarray(scale, qh.dtype), ((0, 0), (0, 0), (0, padded - length), (0, 0)))
    out = _blockwise_attention(qh, kh, vh, block)
    return jnp.swapaxes(out[:, :, :length], 1, 2)


def _query_blocks(x: jax.Array, block: int) -> jax.Array:
    """(B, H, L, ...) -> (L / block, B, H, block, ...): the leading axis is scanned over."""
    b, h, length = x.shape[:3]
    return jnp.moveaxis(x.reshape(b, h, length // block, block, *x.shape[3:]), 2, 0)


def _merge_query_blocks(x: jax.Array) -> jax.Array:
    """Inverse of `_query_blocks`."""
    n, b, h, block = x.shape[:4]
    return jnp.moveaxis(x, 0, 2).reshape(b, h, n * block, *x.shape[4:])


def _block_logits(q_block: jax.Array, k: jax.Array) -> jax.Array:
    return jnp.einsum("bhqd,bhkd->bhqk", q_block, k, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int) -> jax.Array:
    """softmax(q k^T) v for heads-first (B, H, L, D) inputs, q already scaled, L a multiple of block."""
    return _blockwise_forward(q, k, v, block)[0]


def _blockwise_forward(q: jax.Array, k: jax.Array, v: jax.Array, block: int) -> tuple[jax.Array, tuple]:
    def one_block(q_block: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = _block_logits(q_block, k)
        peak = jnp.max(logits, axis=-1, keepdims=True)
        weights = jnp.exp(logits - peak)
        total = jnp.sum(weights, axis=-1, keepdims=True)
        out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return (out / total).astype(q.dtype), (peak + jnp.log(total))[..., 0]

    out, log_sum_exp = jax.lax.map(one_block, _query_blocks(q, block))
    out, log_sum_exp = _merge_query_blocks(out), _merge_query_blocks(log_sum_exp)
    return out, (q, k, v, out, log_sum_exp)


def _blockwise_backward(block: int, residuals: tuple, d_out: jax.Array) -> tuple[jax.Array, ...]:
    q, k, v, out, log_sum_exp = residuals
    f32 = jnp.float32
    delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1)

    def one_block(carry: tuple[jax.Array, jax.Array], inputs: tuple[jax.Array, ...]):
        d_k, d_v = carry
        q_block, lse_block, d_out_block, delta_block = inputs
        probs = jnp.exp(_block_logits(q_block, k) - lse_block[..., None])
        d_v = d_v + jnp.einsum("bhqk,bhqd->bhkd", probs.astype(v.dtype), d_out_block, preferred_element_type=f32)
        d_probs = jnp.einsum("bhqd,bhkd->bhqk", d_out_block, v, preferred_element_type=f32)
        d_logits = (probs * (d_probs - delta_block[..., None])).astype(q.dtype)
        d_q = jnp.einsum("bhqk,bhkd->bhqd", d_logits, k, preferred_element_type=f32)
        d_k = d_k + jnp.einsum("bhqk,bhqd->bhkd", d_logits, q_block, preferred_element_type=f32)
        return (d_k, d_v), d_q.astype(q.dtype)

    blocks = tuple(_query_blocks(x, block) for x in (q, log_sum_exp, d_out, delta))
    (d_k, d_v), d_q = jax.lax.scan(one_block, (jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32)), blocks)
    return _merge_query_blocks(d_q), d_k.astype(k.dtype), d_v.astype(v.dtype)


_blockwise_attention.defvjp(_blockwise_forward, _blockwise_backward)


def rope_angles(positions: jax.Array, dim: int, theta: float) -> jax.Array:
    """Rotary angles `positions[..., None] * theta^(-2j/dim)`, j < dim/2, in float32: (..., dim/2)."""
    if dim % 2:
        raise ValueError(f"rotary dimension must be even, got {dim}")
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    return positions.astype(jnp.float32)[..., None] * inv_freq


def axial_rope(ids: jax.Array, axes_dim: Sequence[int], theta: float) -> tuple[jax.Array, jax.Array]:
    """N-d rotary embedding as in Flux: each position axis rotates its own slice of the head dim.

    Args:
      ids: (B, L, n_axes) integer or float positions.
      axes_dim: rotary dims per axis (even, summing to the head dim).
    Returns:
      (cos, sin), each (B, L, head_dim / 2), for `apply_rope(..., interleaved=True)`.
    """
    if ids.shape[-1] != len(axes_dim):
        raise ValueError(f"ids have {ids.shape[-1]} position axes but axes_dim={tuple(axes_dim)}")
    angles = jnp.concatenate([rope_angles(ids[..., i], d, theta) for i, d in enumerate(axes_dim)], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, *, interleaved: bool) -> jax.Array:
    """Rotate (B, L, H, D) by angles whose cos/sin are (B, L, D/2) or (L, D/2), in float32.

    interleaved=True rotates adjacent pairs (x[2j], x[2j+1]) (Flux / BFL); False rotates the two
    halves (x[j], x[j + D/2]) as Hugging Face's `rotate_half` does (DINOv3).
    """
    cos = cos[..., None, :]
    sin = sin[..., None, :]
    x32 = x.astype(jnp.float32)
    if interleaved:
        pairs = x32.reshape(*x.shape[:-1], -1, 2)
        even, odd = pairs[..., 0], pairs[..., 1]
        out = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1).reshape(x.shape)
    else:
        first, second = jnp.split(x32, 2, axis=-1)
        out = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return out.astype(x.dtype)


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter `a`."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def torch_bicubic_matrix(in_size: int, out_size: int, *, antialias: bool = False) -> np.ndarray:
    """The (out_size, in_size) float64 matrix of PyTorch's 1-D bicubic resize, align_corners=False.

    Without antialias (PyTorch's default): a = -0.75, source coordinate
    `(i + 0.5) * in/out - 0.5`, four taps with indices clamped at the borders. With antialias
    (PyTorch's PIL-compatible path): a = -0.5, the kernel stretched by in/out when downsampling,
    taps truncated at the borders and the weights renormalised.
    """
    scale = in_size / out_size
    out = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    if not antialias:
        src = scale * (rows + 0.5) - 0.5
        floor = np.floor(src)
        for tap in range(-1, 3):
            index = np.clip(floor + tap, 0, in_size - 1).astype(np.int64)
            np.add.at(out, (rows, index), _cubic(src - floor - tap, -0.75))
        return out
    support = 2.0 * max(scale, 1.0)
    inv_scale = 1.0 / max(scale, 1.0)
    for i in rows:
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = np.arange(lo, hi)
        weights = _cubic((taps - center + 0.5) * inv_scale, -0.5)
        out[i, lo:hi] = weights / weights.sum()
    return out


def resize_bicubic_torch(x: jax.Array, size: tuple[int, int], *, antialias: bool = False) -> jax.Array:
    """Resize (..., H, W, C) to (..., size[0], size[1], C) exactly as PyTorch's
    `F.interpolate(mode="bicubic", align_corners=False, antialias=...)` does (pretrained position
    embeddings of DINOv2 and SAM2). Computed in float32 at full matmul precision; sizes are static.
    """
    h_in, w_in = x.shape[-3], x.shape[-2]
    if (h_in, w_in) == tuple(size):
        return x
    rows = jnp.asarray(torch_bicubic_matrix(h_in, size[0], antialias=antialias), jnp.float32)
    cols = jnp.asarray(torch_bicubic_matrix(w_in, size[1], antialias=antialias), jnp.float32)
    out = jnp.einsum(
        "oh,...hwc,pw->...opc", rows, x.astype(jnp.float32), cols, precision=jax.lax.Precision.HIGHEST
    )
    return out.astype(x.dtype)


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
    """Constrain an activation's sharding by logical axis names under the active mesh and rules.

    A no-op when no mesh is set (single-device use, tests, eval_shape), so models need not know
    whether they run sharded. Rules come from `flax.core.spmd.logical_axis_rules(...)`, which
    `sga_jax.parallel` installs from the config.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    rules = dict(spmd.get_logical_axis_rules() or ())
    spec = []
    used: set[str] = set()
    for name in axes:
        target = rules.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if n in mesh.axis_names and n not in used)
        used.update(names)
        spec.append(names if len(names) > 1 else (names[0] if names else None))
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


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
    bodies that act at one chosen layer (e.g. a hidden-state tap).
    """
    graphdef, state = nnx.split(stacked)
    count = jax.tree.leaves(state)[0].shape[0]

    def step(carry: Any, inputs: tuple[Any, jax.Array]) -> tuple[Any, None]:
        layer_state, index = inputs
        return body(nnx.merge(graphdef, layer_state), carry, index), None

    carry, _ = jax.lax.scan(remat(step, remat_policy), carry, (state, jnp.arange(count, dtype=jnp.int32)))
    return carry


def dtype_of(name: str | None) -> Dtype:
    """A config's dtype name ("float32", "bfloat16", None) as a jnp dtype (None stays None)."""
    return None if name is None else jnp.dtype(name)
