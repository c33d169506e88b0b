"""Flux sharded over 8 simulated CPU devices (data=2, fsdp=4) against its one-device result."""

import functools

import jax
import numpy as np
from flax import nnx
from flux_reference import save_reference, tiny_reference
from jax.sharding import NamedSharding, PartitionSpec as P

from sga_jax import parallel
from sga_jax.models import flux


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _forward(graphdef, state, args):
    return nnx.merge(graphdef, state)(*args, hidden_block=1)


def test_fsdp_sharded_forward_equals_one_device(tmp_path):
    assert jax.device_count() == 8
    path = save_reference(tiny_reference(guidance=True), tmp_path)
    batch, grid, txt_len = 8, 12, 5
    rng = np.random.default_rng(0)
    args = (
        rng.normal(size=(batch, grid, 16)).astype(np.float32),
        np.stack([np.zeros(grid), np.arange(grid) // 4, np.arange(grid) % 4], -1).astype(np.float32),
        rng.normal(size=(batch, txt_len, 24)).astype(np.float32),
        np.zeros((txt_len, 3), np.float32),
        rng.uniform(size=batch).astype(np.float32),
        rng.normal(size=(batch, 12)).astype(np.float32),
        np.full(batch, 3.5, np.float32),
    )
    single = flux.load(path)
    expected_out, expected_hidden = jax.device_get(_forward(*nnx.split(single), args))

    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    rules = parallel.resolve_rules(None)
    model = flux.load(path, shardings=flux.shardings_for(single.config, mesh))
    qkv = model.double_blocks.img_attn.qkv.kernel[...]
    assert qkv.shape == (2, 32, 96) and qkv.sharding.spec == P(None, "fsdp")
    assert model.single_blocks.linear2.kernel[...].sharding.spec == P(None, None, "fsdp")
    assert qkv.addressable_shards[0].data.shape == (2, 8, 96)

    batched = NamedSharding(mesh, P(("data", "fsdp")))
    sharded_args = tuple(
        jax.device_put(a, batched) if a.shape[0] == batch else jax.device_put(a, parallel.replicated(mesh))
        for a in args
    )
    with parallel.activation_sharding(mesh, rules):
        out, hidden = _forward(*nnx.split(model), sharded_args)
    assert out.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(out), expected_out, rtol=0, atol=1e-5 * np.abs(expected_out).max())
    np.testing.assert_allclose(np.asarray(hidden), expected_hidden, rtol=0, atol=1e-5 * np.abs(expected_hidden).max())
