"""Pooling, grid helpers and projection heads of sga_jax.align, against PyTorch.

(The losses' contracts live in tests/test_align_losses.py.)
"""

from __future__ import annotations

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sga_jax.align import (
    IREPAHead,
    REPAHead,
    SGAHead,
    adaptive_avg_pool,
    grid_for_long_edge,
    grid_to_tokens,
    pool_tokens,
    tokens_to_grid,
)
from tests.torch_reference import assert_close_relative, nchw_to_nhwc, nhwc_to_nchw, randomize_


def _features(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _torch_pool(grid: np.ndarray, out_grid: tuple[int, int]) -> np.ndarray:
    return nchw_to_nhwc(F.adaptive_avg_pool2d(nhwc_to_nchw(grid), out_grid))


# ----------------------------------------------------------------------------- pooling


@pytest.mark.parametrize(
    "in_hw, out_hw",
    [
        ((7, 5), (3, 2)),  # uneven, overlapping bins
        ((10, 13), (4, 6)),
        ((64, 48), (32, 24)),  # divisible: reshape path
        ((9, 9), (9, 9)),  # identity
        ((5, 3), (7, 4)),  # upsampling replicates, as torch does
        ((12, 1), (5, 1)),
    ],
)
def test_adaptive_avg_pool_matches_torch(in_hw, out_hw):
    x = _features((2, *in_hw, 3))
    ours = jax.jit(adaptive_avg_pool, static_argnums=1)(x, out_hw)
    assert ours.shape == (2, *out_hw, 3)
    assert_close_relative(ours, _torch_pool(x, out_hw), tol=1e-6, what=f"pool {in_hw}->{out_hw}")


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(1, 20), w=st.integers(1, 20), oh=st.integers(1, 12), ow=st.integers(1, 12), seed=st.integers(0, 99)
)
@example(h=1, w=19, oh=1, ow=1, seed=1)  # a mean of 19 values that nearly cancel: 2e-6 of the output's scale
def test_adaptive_avg_pool_matches_torch_property(h, w, oh, ow, seed):
    """Within float32 rounding of the summed inputs: the error bound scales with the inputs, not
    with the means, which can nearly cancel."""
    x = _features((1, h, w, 2), seed)
    error = np.abs(np.asarray(adaptive_avg_pool(x, (oh, ow)), np.float64) - _torch_pool(x, (oh, ow))).max()
    assert error <= 1e-6 * np.abs(x).max(), error


def test_adaptive_avg_pool_keeps_dtype_and_leading_axes():
    x = _features((2, 3, 11, 7, 4))
    ours = adaptive_avg_pool(jnp.asarray(x, jnp.bfloat16), (4, 3))
    assert ours.dtype == jnp.bfloat16 and ours.shape == (2, 3, 4, 3, 4)
    reference = _torch_pool(x.reshape(6, 11, 7, 4), (4, 3)).reshape(2, 3, 4, 3, 4)
    assert_close_relative(ours.astype(jnp.float32), reference, tol=1e-2)


def test_adaptive_avg_pool_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(7, 5\)"):
        adaptive_avg_pool(jnp.zeros((7, 5)), (2, 2))
    with pytest.raises(ValueError, match="out_grid"):
        adaptive_avg_pool(jnp.zeros((1, 4, 4, 2)), (0, 2))


def test_adaptive_avg_pool_sharded_equals_single_device():
    devices = np.array(jax.devices()[:8])
    assert devices.size == 8, "conftest sets 8 simulated CPU devices"
    mesh = jax.sharding.Mesh(devices.reshape(4, 2), ("data", "tensor"))
    x = _features((8, 10, 13, 6))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None, None, "tensor")))
    pool = jax.jit(adaptive_avg_pool, static_argnums=1)
    np.testing.assert_allclose(pool(sharded, (4, 5)), pool(x, (4, 5)), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- grid helpers


def test_tokens_grid_round_trip_is_row_major():
    tokens = _features((2, 12, 5))
    grid = tokens_to_grid(tokens, (3, 4))
    # torch's flatten(2).transpose(1, 2) is the usual (B, C, H, W) -> (B, HW, C) layout
    reference = nhwc_to_nchw(np.asarray(grid)).flatten(2).transpose(1, 2).numpy()
    np.testing.assert_array_equal(reference, tokens)
    np.testing.assert_array_equal(grid_to_tokens(grid), tokens)


def test_tokens_to_grid_names_the_mismatch():
    with pytest.raises(ValueError, match=r"\(2, 12, 5\).*3x5"):
        tokens_to_grid(jnp.zeros((2, 12, 5)), (3, 5))
    with pytest.raises(ValueError, match=r"\(12, 5\)"):
        grid_to_tokens(jnp.zeros((12, 5)))


def test_pool_tokens_matches_torch():
    tokens = _features((2, 7 * 9, 4))
    ours = pool_tokens(tokens, (7, 9), (3, 4))
    reference = _torch_pool(tokens.reshape(2, 7, 9, 4), (3, 4)).reshape(2, 12, 4)
    assert_close_relative(ours, reference, tol=1e-6)


@pytest.mark.parametrize(
    "hw, long_edge, expected", [((64, 48), 32, (32, 24)), ((90, 160), 32, (18, 32)), ((64, 64), 32, (32, 32)), ((1, 300), 32, (1, 32))]
)
def test_grid_for_long_edge_examples(hw, long_edge, expected):
    assert grid_for_long_edge(*hw, long_edge) == expected


@settings(max_examples=50, deadline=None)
@given(h=st.integers(1, 512), w=st.integers(1, 512), long_edge=st.integers(1, 128))
def test_grid_for_long_edge_property(h, w, long_edge):
    gh, gw = grid_for_long_edge(h, w, long_edge)
    assert max(gh, gw) == long_edge
    for side, got in ((h, gh), (w, gw)):
        exact = Fraction(side * long_edge, max(h, w))
        assert got == max(1, int(exact + Fraction(1, 2))), (h, w, long_edge)


# ----------------------------------------------------------------------------- heads


def _torch_conv_from(head: SGAHead) -> torch.nn.Conv2d:
    kernel = np.asarray(head.conv.kernel[...])  # (kh, kw, in, out)
    conv = torch.nn.Conv2d(kernel.shape[2], kernel.shape[3], kernel.shape[0], stride=head.stride, padding=head.padding)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
        conv.bias.copy_(torch.from_numpy(np.array(head.conv.bias[...])))
    return conv


def _randomize_head(head: nnx.Module, seed: int) -> None:
    """Replace every parameter with seeded noise (the bias too, so that it is tested)."""
    rng = np.random.default_rng(seed)
    for _, param in nnx.iter_graph(head):
        if isinstance(param, nnx.Param):
            param.value = jnp.asarray(rng.normal(size=param.value.shape).astype(np.float32) * 0.2)


@pytest.mark.parametrize(
    "kernel, stride, grid, long_edge, out_grid",
    [
        (3, 2, (12, 9), 4, None),  # diffusion stage: stride 2, then pool to a long edge
        (3, 2, (7, 7), None, None),  # odd size: torch padding 1 gives ceil(7 / 2) = 4
        (3, 1, (8, 6), None, (3, 2)),  # call-time out_grid (the prior's grid) wins
        (4, 2, (8, 8), None, None),
        (1, 1, (5, 6), 32, None),  # pooling to a larger grid replicates, as torch
    ],
)
def test_sga_head_matches_torch_conv_then_pool(kernel, stride, grid, long_edge, out_grid):
    head = SGAHead(6, 5, kernel_size=kernel, stride=stride, long_edge=long_edge, rngs=nnx.Rngs(0))
    _randomize_head(head, seed=kernel + stride)
    x = _features((2, grid[0] * grid[1], 6), seed=1)
    ours, got_grid = head(jnp.asarray(x), grid, out_grid)

    conv_out = _torch_conv_from(head)(nhwc_to_nchw(x.reshape(2, *grid, 6)))
    assert tuple(conv_out.shape[2:]) == head.conv_grid(grid)
    expected_grid = out_grid or (grid_for_long_edge(*conv_out.shape[2:], long_edge) if long_edge else tuple(conv_out.shape[2:]))
    assert got_grid == tuple(expected_grid)
    reference = nchw_to_nhwc(F.adaptive_avg_pool2d(conv_out, expected_grid)).reshape(2, -1, 5)
    assert_close_relative(ours, reference, tol=1e-5, what="SGAHead")


def test_irepa_head_is_stride_one_conv():
    head = IREPAHead(4, 3, rngs=nnx.Rngs(1))
    assert head.kernel_size == 1 and head.stride == 1
    _randomize_head(head, seed=3)
    x = _features((2, 6 * 4, 4))
    ours, grid = head(jnp.asarray(x), (6, 4), (3, 2))
    conv_out = _torch_conv_from(head)(nhwc_to_nchw(x.reshape(2, 6, 4, 4)))
    reference = nchw_to_nhwc(F.adaptive_avg_pool2d(conv_out, (3, 2))).reshape(2, 6, 3)
    assert grid == (3, 2)
    assert_close_relative(ours, reference, tol=1e-5, what="IREPAHead")


def test_repa_head_matches_torch_mlp():
    torch_mlp = randomize_(
        torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.SiLU(), torch.nn.Linear(16, 16), torch.nn.SiLU(), torch.nn.Linear(16, 5)
        ),
        seed=4,
    )
    head = REPAHead(6, 5, hidden=16, rngs=nnx.Rngs(0))
    for ours, theirs in zip((head.fc1, head.fc2, head.fc3), (torch_mlp[0], torch_mlp[2], torch_mlp[4])):
        ours.kernel.value = jnp.asarray(theirs.weight.detach().numpy().T)
        ours.bias.value = jnp.asarray(theirs.bias.detach().numpy())
    x = _features((2, 4 * 3, 6))
    y, grid = head(jnp.asarray(x), (4, 3))
    assert grid == (4, 3)
    assert_close_relative(y, torch_mlp(torch.from_numpy(x)).detach().numpy(), tol=1e-5, what="REPAHead")
    pooled, grid = head(jnp.asarray(x), (4, 3), (2, 1))
    reference = _torch_pool(np.asarray(y).reshape(2, 4, 3, 5), (2, 1)).reshape(2, 2, 5)
    assert grid == (2, 1)
    assert_close_relative(pooled, reference, tol=1e-6)


def test_repa_head_default_width_is_2048():
    head = nnx.eval_shape(lambda: REPAHead(8, 3, rngs=nnx.Rngs(0)))
    assert head.fc1.kernel.value.shape == (8, 2048) and head.fc2.kernel.value.shape == (2048, 2048)
    assert head.fc3.kernel.value.shape == (2048, 3)


def test_head_parameters_carry_logical_axes():
    sga = SGAHead(8, 4, stride=2, rngs=nnx.Rngs(0))
    assert sga.conv.kernel.out_sharding == (None, None, "conv_in", "conv_out")
    assert sga.conv.bias.out_sharding == ("conv_out",)
    repa = nnx.eval_shape(lambda: REPAHead(8, 4, hidden=16, rngs=nnx.Rngs(0)))
    assert repa.fc1.kernel.out_sharding == ("embed", "mlp")
    assert repa.fc3.kernel.out_sharding == ("mlp", "embed")


def test_heads_reject_tokens_that_do_not_fill_the_grid():
    head = SGAHead(4, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\(1, 10, 4\).*3x4"):
        head(jnp.zeros((1, 10, 4)), (3, 4))
    with pytest.raises(ValueError, match="kernel_size and stride"):
        SGAHead(4, 4, stride=0, rngs=nnx.Rngs(0))


def test_head_under_jit_grad_split_merge_and_sharding():
    """The functional NNX pattern: split, then merge inside a plain jax.jit; gradients and 8-way
    batch sharding give the single-device result."""
    head = SGAHead(6, 4, stride=2, long_edge=3, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(head, nnx.Param)
    x = _features((8, 6 * 6, 6))
    target = _features((8, 9, 4), seed=2)

    @jax.jit
    def loss(params, x, target):
        y, _ = nnx.merge(graphdef, params)(x, (6, 6))
        return jnp.mean((y - target) ** 2)

    value, grads = jax.value_and_grad(loss)(params, x, target)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    sharded_value, sharded_grads = jax.value_and_grad(loss)(params, jax.device_put(x, batch), jax.device_put(target, batch))
    np.testing.assert_allclose(sharded_value, value, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sharded_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
