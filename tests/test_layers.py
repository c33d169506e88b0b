"""Shared layers against PyTorch: the attention entry point and rotary embeddings."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sga_jax.models import layers as L


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
    ours = np.asarray(L.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), **kwargs))
    np.testing.assert_allclose(ours, _torch_sdpa(q, k, v, **theirs), rtol=1e-5, atol=1e-5)


def test_unknown_attention_implementation_is_refused():
    q, k, v = (jnp.asarray(x) for x in _qkv())
    with pytest.raises(ValueError, match="not one of"):
        L.attention(q, k, v, implementation="flash")


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_rotation_matches_a_complex_multiplication(interleaved):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 4, 3, 8)).astype(np.float32)
    angles = rng.uniform(-3, 3, size=(2, 4, 4)).astype(np.float32)
    out = np.asarray(L.apply_rope(jnp.asarray(x), jnp.cos(angles), jnp.sin(angles), interleaved=interleaved))
    if interleaved:
        z = x[..., 0::2] + 1j * x[..., 1::2]
    else:
        z = x[..., :4] + 1j * x[..., 4:]
    rotated = z * np.exp(1j * angles)[:, :, None, :]
    expected = (np.stack([rotated.real, rotated.imag], -1).reshape(x.shape) if interleaved
                else np.concatenate([rotated.real, rotated.imag], -1))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
