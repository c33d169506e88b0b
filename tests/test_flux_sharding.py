"""Flux sharded over 8 simulated CPU devices against its one-device result: (data=2, fsdp=4) for the
forward pass, (data=2, fsdp=2, tensor=2) for training gradients through the chunked attention."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flux_reference import save_reference, tiny_reference
from jax.sharding import NamedSharding, PartitionSpec as P

from sga_jax import parallel
from sga_jax.models import flux


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _forward(graphdef, state, args):
    return nnx.merge(graphdef, state)(*args, hidden_block=1)


def _inputs(batch=8, grid=12, txt_len=5):
    rng = np.random.default_rng(0)
    return (
        rng.normal(size=(batch, grid, 16)).astype(np.float32),
        np.stack([np.zeros(grid), np.arange(grid) // 4, np.arange(grid) % 4], -1).astype(np.float32),
        rng.normal(size=(batch, txt_len, 24)).astype(np.float32),
        np.zeros((txt_len, 3), np.float32),
        rng.uniform(size=batch).astype(np.float32),
        rng.normal(size=(batch, 12)).astype(np.float32),
        np.full(batch, 3.5, np.float32),
    )


def _shard_inputs(args, mesh, batch_axes):
    batched = NamedSharding(mesh, P(batch_axes))
    return tuple(
        jax.device_put(a, batched) if a.shape[0] == args[0].shape[0] else jax.device_put(a, parallel.replicated(mesh))
        for a in args
    )


def test_fsdp_sharded_forward_equals_one_device(tmp_path):
    assert jax.device_count() == 8
    path = save_reference(tiny_reference(guidance=True), tmp_path)
    args = _inputs()
    single = flux.load(path)
    expected_out, expected_hidden = jax.device_get(_forward(*nnx.split(single), args))

    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    rules = parallel.resolve_rules(None)
    model = flux.load(path, shardings=flux.shardings_for(single.config, mesh))
    qkv = model.double_blocks.img_attn.qkv.kernel[...]
    assert qkv.shape == (2, 32, 96) and qkv.sharding.spec == P(None, "fsdp")
    assert model.single_blocks.linear2.kernel[...].sharding.spec == P(None, None, "fsdp")
    assert qkv.addressable_shards[0].data.shape == (2, 8, 96)

    with parallel.activation_sharding(mesh, rules):
        out, hidden = _forward(*nnx.split(model), _shard_inputs(args, mesh, ("data", "fsdp")))
    assert out.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(out), expected_out, rtol=0, atol=1e-5 * np.abs(expected_out).max())
    np.testing.assert_allclose(np.asarray(hidden), expected_hidden, rtol=0, atol=1e-5 * np.abs(expected_hidden).max())


def _jit_loss_and_grads(graphdef, state, args):
    """Mean-square output and its gradients, traced afresh on every call: the logical-axis rules
    are read while tracing and are not part of jit's cache key (which holds the function object),
    so a shared function would keep an earlier test's activation layout."""

    def loss_and_grads(state, args):
        def loss(state):
            return jnp.mean(jnp.square(nnx.merge(graphdef, state)(*args)))

        return jax.value_and_grad(loss)(state)

    return jax.jit(loss_and_grads)(state, args)


def _sharded_loss_and_grads(path, config, mesh_axes, batch_rule, args):
    mesh = parallel.make_mesh(mesh_axes)
    rules = parallel.resolve_rules({"batch": batch_rule})
    model = flux.load(path, shardings=flux.shardings_for(config, mesh))
    with parallel.activation_sharding(mesh, rules):
        return _jit_loss_and_grads(*nnx.split(model), _shard_inputs(args, mesh, batch_rule))


def _assert_same_loss_and_grads(got, want):
    (loss, grads), (expected_loss, expected_grads) = got, want
    np.testing.assert_allclose(float(loss), float(expected_loss), rtol=1e-5)
    for (path_, ref), value in zip(jax.tree_util.tree_leaves_with_path(expected_grads), jax.tree.leaves(grads)):
        scale = max(float(np.abs(ref).max()), 1e-12)
        np.testing.assert_allclose(np.asarray(value), ref, rtol=0, atol=1e-4 * scale, err_msg=jax.tree_util.keystr(path_))


@pytest.fixture(scope="module")
def reference_grads(tmp_path_factory):
    path = save_reference(tiny_reference(guidance=True), tmp_path_factory.mktemp("flux"))
    single = flux.load(path)
    assert single.config.attention == "chunked"
    args = _inputs()
    return path, single.config, args, jax.device_get(_jit_loss_and_grads(*nnx.split(single), args))


def test_tensor_parallel_gradients_through_chunked_attention_equal_one_device(reference_grads):
    path, config, args, want = reference_grads
    got = _sharded_loss_and_grads(path, config, {"data": 2, "fsdp": 2, "tensor": 2}, ("fsdp", "data"), args)
    _assert_same_loss_and_grads(got, want)


@pytest.mark.xfail(strict=True, reason="XLA computes wrong results for batch over (data, fsdp) on a 3-axis mesh; "
                                       "parallel.check_batch_layout refuses it (flips when XLA is fixed)")
def test_batch_over_data_then_fsdp_on_a_three_axis_mesh(reference_grads):
    path, config, args, want = reference_grads
    got = _sharded_loss_and_grads(path, config, {"data": 2, "fsdp": 2, "tensor": 2}, ("data", "fsdp"), args)
    _assert_same_loss_and_grads(got, want)


def test_the_miscompiled_layout_is_refused_and_its_alternative_accepted():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with pytest.raises(ValueError, match=r"sharding_rules.batch=\('fsdp', 'data'\)"):
        parallel.check_batch_layout(mesh, parallel.resolve_rules(None))
    parallel.check_batch_layout(mesh, parallel.resolve_rules({"batch": ("fsdp", "data")}))
    parallel.check_batch_layout(parallel.make_mesh({"data": 2, "fsdp": 4}), parallel.resolve_rules(None))
