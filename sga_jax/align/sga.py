"""Spatial Gram Alignment (SGA): the paper's Eq. 3-4 as jitted pure functions.

    X = normalize_rows(gen),  Y = normalize_rows(ref)          (B, N, C) each, any widths
    L_SGA = mean_b (1 / N^2) || X X^T - Y Y^T ||_F^2

Two exact ways to compute it:

* "gram": build both (N, N) spatial Gram matrices, O(N^2 C) work and an N x N buffer per sample.
* "channel": the identity ||X X^T - Y Y^T||^2 = ||X^T X||^2 + ||Y^T Y||^2 - 2 ||X^T Y||^2, O(N C^2)
  work and only (C, C) buffers. It subtracts large terms, so every product runs in float32 at
  the highest matmul precision (no TF32 / bf16 passes on GPU or TPU).

Precision. "gram" forms the difference G_X - G_Y before squaring, so its float32 result keeps a
relative error near 1e-7 however small the loss. "channel" squares first and subtracts after: its
absolute error is a small multiple of eps_f32 * (||X^T X||^2 + ||Y^T Y||^2) / N^2 (about
eps_f32 * 2 / C for unrelated features), which is far below any loss met in training but
dominates as the loss approaches zero (X close to the orbit {Y Q}). Its gradient,
(4 / N^2) (X X^T X - Y Y^T X), is formed as a difference of (N, C) products and stays accurate.
Use method="gram" to evaluate losses near zero to full relative precision.

Derivatives. Both methods carry a JVP rule built on d||D||^2 = 4 <D X, dX> - 4 <D Y, dY> with
D = X X^T - Y Y^T, where D X is formed once: (G_X - G_Y) X for "gram" (one N x N by N x C product,
where plain autodiff of X X^T takes two) and X (X^T X) - Y (Y^T X) for "channel" (two N x C by
C x C products instead of three). Reverse mode transposes that rule, so a gradient with respect to
gen alone costs 3 N^2 C (gram) or 5 N C^2 (channel) multiply-adds in all; the gradient for an
input that is not differentiated (a frozen prior) is never built. Forward mode and higher
derivatives work as usual.

"auto" picks, from the static shapes and the backend, the one the cost model of `method_costs`
says is faster: multiply-adds plus the cost of the N x N buffers the gram form materialises
(a per-backend constant; on XLA:CPU measured, see `BACKEND_COSTS`). The choice is made separately
for the forward pass and for forward + gradient (they differ near the crossover: the gradient
costs the channel form more), so an "auto" loss evaluates with the form that is faster
forward and differentiates with the form that is faster with its gradient, both exact; it
compiles once per shape. Inputs of any float dtype are cast to float32 first, so a bf16 forward
still gives a float32 loss.

Zero rows: normalisation is x * rsqrt(max(|x|^2, eps^2)), so a row with norm below `eps` is
divided by `eps` instead of its norm. An all-zero row stays exactly zero, contributes a zero row
and column to its Gram matrix, and the loss and its gradient are finite (the gradient with respect
to a zero row is the upstream gradient scaled by 1/eps). `eps` is far below the norm of any real
feature row, so it changes nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

Method = Literal["auto", "gram", "channel"]
METHODS = ("auto", "gram", "channel")
NORM_EPS = 1e-6
_HIGHEST = jax.lax.Precision.HIGHEST


def _check_tokens(name: str, x: jax.Array) -> None:
    if x.ndim != 3:
        raise ValueError(f"{name} must be (B, N, C) tokens, got shape {tuple(x.shape)} (rank {x.ndim})")
    if 0 in x.shape:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}; B, N and C must all be positive")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")


def check_pair(gen: jax.Array, ref: jax.Array, *, same_width: bool = False) -> None:
    """Raise a ValueError naming both shapes unless gen and ref are (B, N, C) tokens that match.

    Batch and token counts must agree; widths too when `same_width` (patch-wise losses).
    """
    _check_tokens("gen", gen)
    _check_tokens("ref", ref)
    if gen.shape[:2] != ref.shape[:2]:
        raise ValueError(
            f"gen {tuple(gen.shape)} and ref {tuple(ref.shape)} must share batch and token count (B, N); "
            "pool them to one grid first (sga_jax.align.adaptive_avg_pool)"
        )
    if same_width and gen.shape[-1] != ref.shape[-1]:
        raise ValueError(
            f"gen {tuple(gen.shape)} and ref {tuple(ref.shape)} must have the same width C for a "
            "patch-wise loss; project gen with a head first"
        )


def normalize_rows(x: jax.Array, eps: float = NORM_EPS) -> jax.Array:
    """L2-normalise the last axis in float32: x * rsqrt(max(|x|^2, eps^2)); zero rows stay zero."""
    x = x.astype(jnp.float32)
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def spatial_gram(x: jax.Array, eps: float = NORM_EPS) -> jax.Array:
    """(B, N, C) tokens -> (B, N, N) float32 Gram matrix X X^T of the row-normalised tokens."""
    _check_tokens("x", x)
    xn = normalize_rows(x, eps)
    return jnp.einsum("bnc,bmc->bnm", xn, xn, precision=_HIGHEST)


def _dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, precision=_HIGHEST)


def _jvp_from_gradients(
    value: jax.Array, gradients: tuple[Callable[[], jax.Array], ...], tangents: tuple[Any, ...]
) -> tuple[jax.Array, jax.Array]:
    """(value, sum_i <grad_i, tangent_i>) per sample, building only the gradients that are needed."""
    tangent_out = jnp.zeros_like(value)
    for gradient, tangent in zip(gradients, tangents):
        if not isinstance(tangent, SymbolicZero):
            tangent_out = tangent_out + jnp.sum(gradient() * tangent, axis=(1, 2))
    return value, tangent_out


def _gram_diff(x: jax.Array, y: jax.Array) -> jax.Array:
    return _dot("bnc,bmc->bnm", x, x) - _dot("bnc,bmc->bnm", y, y)


def _channel_products(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    return _dot("bnc,bnd->bcd", x, x), _dot("bnc,bnd->bcd", y, y), _dot("bnc,bnd->bcd", x, y)


def _channel_terms(xx: jax.Array, yy: jax.Array, xy: jax.Array) -> jax.Array:
    return jnp.sum(xx * xx, axis=(1, 2)) + jnp.sum(yy * yy, axis=(1, 2)) - 2.0 * jnp.sum(xy * xy, axis=(1, 2))


def _gram_value(x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-sample ||X X^T - Y Y^T||_F^2 through the (N, N) Gram matrices."""
    diff = _gram_diff(x, y)
    return jnp.sum(diff * diff, axis=(1, 2))


def _gram_jvp(primals: tuple[jax.Array, jax.Array], tangents: tuple[Any, Any]):
    x, y = primals
    diff = _gram_diff(x, y)
    return _jvp_from_gradients(
        jnp.sum(diff * diff, axis=(1, 2)),
        (lambda: 4.0 * _dot("bnm,bmc->bnc", diff, x), lambda: -4.0 * _dot("bnm,bmc->bnc", diff, y)),
        tangents,
    )


def _channel_value(x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-sample ||X^T X||^2 + ||Y^T Y||^2 - 2 ||X^T Y||^2 through (C, C) products only."""
    return _channel_terms(*_channel_products(x, y))


def _channel_jvp(primals: tuple[jax.Array, jax.Array], tangents: tuple[Any, Any]):
    x, y = primals
    xx, yy, xy = _channel_products(x, y)
    return _jvp_from_gradients(
        _channel_terms(xx, yy, xy),
        (
            lambda: 4.0 * (_dot("bnc,bcd->bnd", x, xx) - _dot("bne,bce->bnc", y, xy)),
            lambda: 4.0 * (_dot("bne,bef->bnf", y, yy) - _dot("bnc,bce->bne", x, xy)),
        ),
        tangents,
    )


_VALUES = {"gram": _gram_value, "channel": _channel_value}
_JVPS = {"gram": _gram_jvp, "channel": _channel_jvp}


@functools.cache
def _sq_dist(forward: str, gradient: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Per-sample ||X X^T - Y Y^T||_F^2 computed by the `forward` form, differentiated (forward
    and reverse mode) by the `gradient` form's JVP rule."""
    fn = jax.custom_jvp(_VALUES[forward])
    fn.defjvp(_JVPS[gradient], symbolic_zeros=True)
    return fn


@dataclasses.dataclass(frozen=True)
class BufferCost:
    """What one element of an N x N buffer of the gram form costs, in multiply-adds, on a backend:
    for the forward pass (two Gram matrices) and for forward + gradient (the two and their
    difference D)."""

    forward: float
    gradient: float


BACKEND_COSTS: dict[str, BufferCost] = {
    # XLA:CPU, measured (bench/align.py, 2-core Xeon): the N x N-output products and the passes over
    # them cost far more than their multiply-adds. Fitted to where the faster form changes:
    # forward between N = 0.75 C and N = C, forward + gradient between N = C and N = 1.33 C.
    "cpu": BufferCost(forward=640.0, gradient=400.0),
    # Not measured here: one element written and read once over HBM, at the peak fp32 FMA rate and
    # bandwidth (H100: 33.5 T MAC/s over 0.84 T floats/s; TPU v5e: 6-pass fp32 matmuls, 16 T MAC/s
    # over 0.2 T floats/s).
    "gpu": BufferCost(forward=80.0, gradient=80.0),
    "tpu": BufferCost(forward=160.0, gradient=160.0),
}


def method_costs(n: int, c_gen: int, c_ref: int, *, gradient: bool = False,
                 backend: str | None = None) -> dict[str, float]:
    """Modelled cost of each exact method, in multiply-adds, for N tokens and widths (c_gen, c_ref).

    Forward: gram N^2 (c_gen + c_ref) + 2 N^2 t, channel N (c_gen^2 + c_ref^2 + c_gen c_ref).
    With the gradient with respect to gen: gram N^2 (2 c_gen + c_ref) + 3 N^2 t, channel
    N (2 c_gen^2 + c_ref^2 + 2 c_gen c_ref). t is `BACKEND_COSTS[backend]` (default: the default
    backend's; unknown backends are costed as GPUs); the channel form's C x C buffers are small
    against its multiply-adds and are left out.
    """
    buffer = BACKEND_COSTS.get(backend or jax.default_backend(), BACKEND_COSTS["gpu"])
    if gradient:
        gram = n * n * (2 * c_gen + c_ref) + 3 * n * n * buffer.gradient
        channel = n * (2 * c_gen * c_gen + c_ref * c_ref + 2 * c_gen * c_ref)
    else:
        gram = n * n * (c_gen + c_ref) + 2 * n * n * buffer.forward
        channel = n * (c_gen * c_gen + c_ref * c_ref + c_gen * c_ref)
    return {"gram": float(gram), "channel": float(channel)}


def choose_method(n: int, c_gen: int, c_ref: int, *, gradient: bool = False,
                  backend: str | None = None) -> Literal["gram", "channel"]:
    """The faster exact method by `method_costs`; ties go to gram, which has no cancellation."""
    costs = method_costs(n, c_gen, c_ref, gradient=gradient, backend=backend)
    return "channel" if costs["channel"] < costs["gram"] else "gram"


def sga_loss(gen: jax.Array, ref: jax.Array, *, method: Method = "auto", eps: float = NORM_EPS) -> jax.Array:
    """Spatial Gram Alignment loss, the batch mean of (1/N^2) ||G(gen) - G(ref)||_F^2.

    Args:
      gen: (B, N, C_gen) projected generative tokens.
      ref: (B, N, C_ref) foundation-prior tokens on the same N-token grid (widths may differ).
      method: "gram" (N x N matrices), "channel" (C x C identity, no N x N buffer) or "auto"
        (the faster of the two for these static shapes on this backend, chosen apart for the
        forward pass and for the gradient). All give the same value.
      eps: rows with L2 norm below eps are scaled by 1/eps instead (zero rows stay zero).
    Returns:
      A float32 scalar, whatever the input dtypes.
    Raises:
      ValueError: wrong rank, empty arrays, mismatched (B, N), or an unknown method.
    """
    check_pair(gen, ref)
    if method not in METHODS:
        raise ValueError(f"unknown SGA method {method!r}; expected one of {METHODS}")
    n = gen.shape[1]
    if method == "auto":
        widths = (n, gen.shape[-1], ref.shape[-1])
        sq_dist = _sq_dist(choose_method(*widths), choose_method(*widths, gradient=True))
    else:
        sq_dist = _sq_dist(method, method)
    x = normalize_rows(gen, eps)
    y = normalize_rows(ref, eps)
    return jnp.mean(sq_dist(x, y)) / float(n * n)
