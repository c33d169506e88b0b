"""Stage 1's loss terms as pure functions: reconstruction, the patch GAN's generator and
discriminator objectives (taming's hinge / vanilla), moment anchoring, scale consistency, and the
adaptive weights at a last layer (taming's lambda_adv, VA-VAE's lambda_sga).

Per-example terms return (B,) so the task can weight examples (padding slots get 0). Images are
(B, H, W, 3) in [-1, 1]; discriminator logits (B, h, w, 1); everything is reduced in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

REC_KINDS = ("l1", "mse")
GAN_LOSSES = ("hinge", "vanilla")
ADAPTIVE_EPS = 1e-4  # taming's and VA-VAE's denominator offset


def _mean_per_example(x: jax.Array) -> jax.Array:
    return jnp.mean(x.astype(jnp.float32), axis=tuple(range(1, x.ndim)))


def reconstruction_loss(images: jax.Array, reconstructions: jax.Array, kind: str = "l1") -> jax.Array:
    """(B,) mean |x - x_rec| (taming's pixel loss, "l1") or mean (x - x_rec)^2 ("mse") per image."""
    diff = reconstructions.astype(jnp.float32) - images.astype(jnp.float32)
    if kind == "l1":
        return _mean_per_example(jnp.abs(diff))
    if kind == "mse":
        return _mean_per_example(jnp.square(diff))
    raise ValueError(f"reconstruction loss {kind!r}: expected one of {REC_KINDS}")


def generator_loss(logits_fake: jax.Array) -> jax.Array:
    """(B,) -mean D(x_rec) per image: the generator's objective for hinge and vanilla alike (taming)."""
    return -_mean_per_example(logits_fake)


def discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array, kind: str = "hinge") -> jax.Array:
    """(B,) taming's discriminator objective per image: hinge 0.5 (relu(1 - D(x)) + relu(1 + D(x_rec))),
    vanilla 0.5 (softplus(-D(x)) + softplus(D(x_rec))), each averaged over the patches."""
    real, fake = logits_real.astype(jnp.float32), logits_fake.astype(jnp.float32)
    if kind == "hinge":
        return 0.5 * (_mean_per_example(jax.nn.relu(1.0 - real)) + _mean_per_example(jax.nn.relu(1.0 + fake)))
    if kind == "vanilla":
        return 0.5 * (_mean_per_example(jax.nn.softplus(-real)) + _mean_per_example(jax.nn.softplus(fake)))
    raise ValueError(f"discriminator loss {kind!r}: expected one of {GAN_LOSSES}")


def moment_loss(mean: jax.Array, logvar: jax.Array, ref_mean: jax.Array, ref_logvar: jax.Array) -> jax.Array:
    """(B,) element-wise squared error of the posterior mean plus that of the log-variance against
    the frozen pre-trained encoder's, each averaged over the latent (h, w, C)."""
    return (_mean_per_example(jnp.square(mean.astype(jnp.float32) - ref_mean.astype(jnp.float32)))
            + _mean_per_example(jnp.square(logvar.astype(jnp.float32) - ref_logvar.astype(jnp.float32))))


def scale_consistency_loss(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """(B,) Diffusion-4K's SC-VAE term: mean squared error between the teacher's decoder features
    (F8, full size) and the student's (F16), the student's nearest-upsampled to the teacher's size
    when it is smaller (an integer factor, as PyTorch's `mode="nearest"`)."""
    factor_h, factor_w = teacher.shape[1] // student.shape[1], teacher.shape[2] // student.shape[2]
    if (student.shape[1] * factor_h, student.shape[2] * factor_w) != teacher.shape[1:3]:
        raise ValueError(f"student features {student.shape} do not upsample by an integer factor to {teacher.shape}")
    up = jnp.repeat(jnp.repeat(student, factor_h, axis=1), factor_w, axis=2)
    return _mean_per_example(jnp.square(up.astype(jnp.float32) - jax.lax.stop_gradient(teacher).astype(jnp.float32)))


def conv_with_kernel(conv: nnx.Conv, kernel: jax.Array, x: jax.Array) -> jax.Array:
    """`conv(x)` with its kernel replaced by `kernel` (the bias kept)."""
    graphdef, state = nnx.split(conv)
    params = nnx.to_pure_dict(state)
    params["kernel"] = kernel
    return nnx.merge(graphdef, params)(x)


def kernel_gradient(conv: nnx.Conv, inputs: jax.Array, output_grad: jax.Array) -> jax.Array:
    """d term / dW of the last layer `conv` (kernel W) for a term whose gradient with respect to
    `conv(inputs)` is `output_grad`, with `inputs` held fixed: the gradient backpropagates only
    through what follows the layer."""
    inputs = jax.lax.stop_gradient(inputs)
    kernel = jax.lax.stop_gradient(conv.kernel[...])
    out, pullback = jax.vjp(lambda k: conv_with_kernel(conv, k, inputs), kernel)
    return pullback(jax.lax.stop_gradient(output_grad).astype(out.dtype))[0]


def adaptive_weight(
    conv: nnx.Conv, inputs: jax.Array, numerator_grad: jax.Array, denominator_grad: jax.Array, *, clamp: float
) -> jax.Array:
    """clip(||d numerator / dW|| / (||d denominator / dW|| + 1e-4), 0, clamp), a constant (no
    gradient), with W the kernel of the last layer `conv` and each term given by its gradient with
    respect to the layer's output `conv(inputs)` (see `kernel_gradient`): taming's lambda_adv
    (W = the decoder's conv_out, the NLL over the generator loss, clamp 1e4) and VA-VAE's
    lambda_sga (the encoder's conv_out, the NLL over the alignment loss, clamp 1e8). Norms are
    Frobenius norms over the whole kernel, in float32."""

    def norm(output_grad: jax.Array) -> jax.Array:
        grad = kernel_gradient(conv, inputs, output_grad).astype(jnp.float32)
        return jnp.sqrt(jnp.sum(jnp.square(grad)))

    ratio = norm(numerator_grad) / (norm(denominator_grad) + ADAPTIVE_EPS)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, clamp))


def value_and_grad_at(term: Callable[[jax.Array], tuple[jax.Array, Any]], x: jax.Array) -> tuple[jax.Array, jax.Array, Any]:
    """(value, d term / dx, aux) of `term(x) -> (scalar, aux)` at x held fixed (a constant point)."""
    (value, aux), grad = jax.value_and_grad(term, has_aux=True)(jax.lax.stop_gradient(x))
    return value, grad, aux


def with_gradient(value: jax.Array, grad: jax.Array, x: jax.Array) -> jax.Array:
    """`value + <grad, x - stop_gradient(x)>`: equal to `value`, with gradient `grad` with respect
    to `x` (the term's own gradient, computed once by `value_and_grad_at`). A term of frozen
    networks (LPIPS, the discriminator seen by the generator) then needs one backward pass through
    them for both its adaptive weight and the total loss's gradient."""
    delta = x.astype(jnp.float32) - jax.lax.stop_gradient(x).astype(jnp.float32)
    return value + jnp.sum(jax.lax.stop_gradient(grad).astype(jnp.float32) * delta)
