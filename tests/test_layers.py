"""Shared layers against PyTorch: the attention entry point, rotary embeddings and pooling; and the
RNGs that models are built with inside a trace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from sga_jax.models import nn
from sga_jax.models.nn.attention import _chunked_attention


def _qkv(seed=0, b=2, lq=5, lk=7, h=3, d=8):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(b, n, h, d)).astype(np.float32) for n in (lq, lk, lk)]


def _torch_sdpa(q, k, v, **kw):
    t = [torch.from_numpy(x).transpose(1, 2) for x in (q, k, v)]
    return F.scaled_dot_product_attention(*t, **kw).transpose(1, 2).numpy()


@pytest.mark.parametrize("case", ["plain", "scale", "bias", "mask", "causal"])
def test_attention_matches_torch_sdpa(case):
    q, k, v = _qkv(lq=6, lk=6) if case == "causal" else _qkv()
    rng = np.random.default_rng(1)
    kwargs, theirs = {}, {}
    if case == "scale":
        kwargs["scale"] = theirs["scale"] = 1.0
    if case == "bias":
        bias = rng.normal(size=(1, q.shape[2], q.shape[1], k.shape[1])).astype(np.float32)
        kwargs["bias"], theirs["attn_mask"] = jnp.asarray(bias), torch.from_numpy(bias)
    if case == "mask":
        mask = rng.random((q.shape[0], 1, 1, k.shape[1])) > 0.3
        mask[..., 0] = True
        kwargs["mask"], theirs["attn_mask"] = jnp.asarray(mask), torch.from_numpy(mask)
    if case == "causal":
        kwargs["is_causal"] = theirs["is_causal"] = True
    ours = np.asarray(nn.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), **kwargs))
    np.testing.assert_allclose(ours, _torch_sdpa(q, k, v, **theirs), rtol=1e-5, atol=1e-5)


def _torch_sdpa_with_grads(q, k, v, weights, scale=None):
    t = [torch.from_numpy(x).transpose(1, 2).requires_grad_(True) for x in (q, k, v)]
    out = F.scaled_dot_product_attention(*t, scale=scale).transpose(1, 2)
    (out * torch.from_numpy(weights)).sum().backward()
    return out.detach().numpy(), [x.grad.transpose(1, 2).numpy() for x in t]


@pytest.mark.parametrize(("lq", "lk", "block", "scale"), [(10, 7, 4, None), (8, 13, 8, 0.5), (5, 5, 128, None)])
def test_chunked_attention_values_and_gradients_match_torch(lq, lk, block, scale):
    q, k, v = _qkv(lq=lq, lk=lk)
    weights = np.random.default_rng(3).normal(size=q.shape).astype(np.float32)

    def loss(q, k, v):
        return jnp.sum(_chunked_attention(q, k, v, scale=scale, query_block=block) * weights)

    out = _chunked_attention(*(jnp.asarray(x) for x in (q, k, v)), scale=scale, query_block=block)
    grads = jax.grad(loss, argnums=(0, 1, 2))(*(jnp.asarray(x) for x in (q, k, v)))
    expected_out, expected_grads = _torch_sdpa_with_grads(q, k, v, weights, scale)
    np.testing.assert_allclose(np.asarray(out), expected_out, rtol=1e-5, atol=1e-5)
    for name, ours, theirs in zip("qkv", grads, expected_grads):
        np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")


def test_chunked_attention_in_bfloat16_follows_float32():
    q, k, v = (jnp.asarray(x) for x in _qkv(lq=40, lk=40))
    exact = nn.attention(q, k, v, implementation="chunked")
    half = nn.attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), implementation="chunked")
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), np.asarray(exact), atol=3e-2)


@pytest.mark.parametrize("argument", ["bias", "mask", "is_causal"])
def test_chunked_attention_refuses_bias_and_masks(argument):
    q, k, v = (jnp.asarray(x) for x in _qkv())
    shape = (1, 1, q.shape[1], k.shape[1])
    value = {"bias": jnp.zeros(shape), "mask": jnp.ones(shape, bool), "is_causal": True}[argument]
    with pytest.raises(ValueError, match='"chunked" takes no bias, mask or is_causal'):
        nn.attention(q, k, v, implementation="chunked", **{argument: value})


def test_unknown_attention_implementation_is_refused():
    q, k, v = (jnp.asarray(x) for x in _qkv())
    with pytest.raises(ValueError, match="not one of"):
        nn.attention(q, k, v, implementation="flash")


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_rotation_matches_a_complex_multiplication(interleaved):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 4, 3, 8)).astype(np.float32)
    angles = rng.uniform(-3, 3, size=(2, 4, 4)).astype(np.float32)
    out = np.asarray(nn.apply_rope(jnp.asarray(x), jnp.cos(angles), jnp.sin(angles), interleaved=interleaved))
    if interleaved:
        z = x[..., 0::2] + 1j * x[..., 1::2]
    else:
        z = x[..., :4] + 1j * x[..., 4:]
    rotated = z * np.exp(1j * angles)[:, :, None, :]
    expected = (np.stack([rotated.real, rotated.imag], -1).reshape(x.shape) if interleaved
                else np.concatenate([rotated.real, rotated.imag], -1))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size,stride,padding", [(3, 2, 0), (3, 1, 1), (2, 2, 0), (3, 2, 1)])
@pytest.mark.parametrize("kind", ["max", "avg", "avg_exclude_pad"])
def test_pooling_matches_torch(kind, size, stride, padding):
    x = np.random.default_rng(2).normal(size=(2, 11, 8, 3)).astype(np.float32)
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    if kind == "max":
        want = F.max_pool2d(t, size, stride, padding)
        got = nn.max_pool(jnp.asarray(x), size, stride, padding)
    else:
        include = kind == "avg"
        want = F.avg_pool2d(t, size, stride, padding, count_include_pad=include)
        got = nn.avg_pool(jnp.asarray(x), size, stride, padding, count_include_pad=include)
    np.testing.assert_allclose(np.asarray(got), want.permute(0, 2, 3, 1).numpy(), rtol=1e-6, atol=1e-6)



def _two_layers(rngs: nnx.Rngs) -> nnx.Module:
    return nnx.List([nn.conv(3, 4, 3, rngs=rngs), nn.linear(4, 5, ("embed", "mlp"), rngs=rngs)])


def test_construction_rngs_draw_the_keys_of_nnx_rngs_and_stay_concrete_in_a_trace():
    """The same parameters as `nnx.Rngs(key)` (eagerly and inside jit); under eval_shape the
    stream's counter is a concrete array after the draws (the traced one makes building quadratic)."""
    key = jax.random.key(3)
    plain = nnx.Rngs(key)
    reference = jax.tree.leaves(nnx.state(_two_layers(plain), nnx.Param))
    eager = jax.tree.leaves(nnx.state(_two_layers(nn.construction_rngs(key)), nnx.Param))
    jitted = jax.tree.leaves(jax.jit(lambda: nnx.state(_two_layers(nn.construction_rngs(key)), nnx.Param))())
    assert len(reference) == 4
    for a, b, c in zip(reference, eager, jitted):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    counts = []

    def build():
        rngs = nn.construction_rngs(key)
        layers = _two_layers(rngs)
        counts.append(rngs.default.count[...])
        return layers

    abstract = nnx.eval_shape(build)
    assert not isinstance(counts[0], jax.core.Tracer) and int(counts[0]) == int(plain.default.count[...]) > 0
    assert [x.shape for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))] == [x.shape for x in reference]
