"""The alignment losses against references nobody here wrote: float64 NumPy for SGA values,
float64 PyTorch autograd for SGA gradients, PyTorch for REPA / iREPA; plus dtype, bad-input,
zero-row, transform and sharding contracts."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from sga_jax.align import irepa_loss, normalize_rows, repa_loss, sga_loss, spatial_gram
from sga_jax.align.sga import choose_method, method_costs
from tests.torch_reference import assert_close_relative

EPS_F32 = float(np.finfo(np.float32).eps)
METHODS = ("gram", "channel", "auto")
# (B, N, C_gen, C_ref): N < C and N > C, batch 1 and > 1, equal and different widths.
SHAPES = [(1, 12, 40, 24), (3, 48, 8, 12), (2, 64, 16, 16), (2, 20, 20, 7)]


def np_normalize(x: np.ndarray) -> np.ndarray:
    """Float64 row normalisation; zero rows stay zero."""
    x = np.asarray(x, np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def np_sga(gen: np.ndarray, ref: np.ndarray) -> float:
    """Eq. 4 in float64 straight from its definition: batch mean of ||G_X - G_Y||_F^2 / N^2."""
    x, y = np_normalize(gen), np_normalize(ref)
    diff = x @ x.transpose(0, 2, 1) - y @ y.transpose(0, 2, 1)
    return float(np.mean(np.sum(diff**2, axis=(1, 2))) / gen.shape[1] ** 2)


def torch_sga_grads(gen: np.ndarray, ref: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Value and gradients (w.r.t. both inputs) of the SGA loss by float64 torch autograd."""
    g = torch.tensor(np.asarray(gen, np.float64), requires_grad=True)
    r = torch.tensor(np.asarray(ref, np.float64), requires_grad=True)
    x, y = F.normalize(g, dim=-1), F.normalize(r, dim=-1)
    diff = x @ x.transpose(1, 2) - y @ y.transpose(1, 2)
    loss = (diff**2).sum(dim=(1, 2)).mean() / gen.shape[1] ** 2
    loss.backward()
    return loss.item(), g.grad.numpy(), r.grad.numpy()


def random_pair(shape: tuple[int, int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    b, n, cg, cf = shape
    rng = np.random.default_rng(seed)
    return rng.normal(size=(b, n, cg)).astype(np.float32), rng.normal(size=(b, n, cf)).astype(np.float32)


def near_orbit_pair(b: int, n: int, c: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """gen = ref Q + noise for a random orthogonal Q: close to SGA's zero set, far from REPA's."""
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(b, n, c))
    q, _ = np.linalg.qr(rng.normal(size=(c, c)))
    gen = ref @ q + noise * rng.normal(size=ref.shape)
    return gen.astype(np.float32), ref.astype(np.float32)


def sga_value_and_grads(gen, ref, method):
    return jax.jit(jax.value_and_grad(lambda g, r: sga_loss(g, r, method=method), argnums=(0, 1)))(gen, ref)


# --- values and gradients against float64 references -------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("method", METHODS)
def test_sga_matches_float64_reference(shape, method):
    gen, ref = random_pair(shape)
    expected = np_sga(gen, ref)
    assert expected >= 1e-4
    loss, (grad_gen, grad_ref) = sga_value_and_grads(gen, ref, method)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    assert abs(float(loss) - expected) / expected <= 1e-5
    torch_loss, torch_grad_gen, torch_grad_ref = torch_sga_grads(gen, ref)
    assert abs(torch_loss - expected) <= 1e-12 * max(1.0, expected)
    assert_close_relative(grad_gen, torch_grad_gen, tol=1e-5, what=f"d/dgen ({method})")
    assert_close_relative(grad_ref, torch_grad_ref, tol=1e-5, what=f"d/dref ({method})")


@pytest.mark.parametrize("noise", [0.1, 0.03])
def test_near_orbit_precision(noise):
    """Near the zero-loss orbit the Gram method keeps full relative precision, the channel identity
    stays within its documented absolute bound, and both gradients stay accurate."""
    gen, ref = near_orbit_pair(2, 128, 16, noise)
    expected = np_sga(gen, ref)
    assert 1e-4 <= expected <= 2e-3
    x, y = np_normalize(gen), np_normalize(ref)
    n = gen.shape[1]
    channel_terms = [np.sum((a.transpose(0, 2, 1) @ a) ** 2, axis=(1, 2)) for a in (x, y)]
    scale = np.mean(channel_terms[0] + channel_terms[1]) / n**2
    _, torch_grad_gen, _ = torch_sga_grads(gen, ref)
    for method in ("gram", "channel"):
        loss, (grad_gen, _) = sga_value_and_grads(gen, ref, method)
        if method == "gram":
            assert abs(float(loss) - expected) / expected <= 1e-5
        else:
            assert abs(float(loss) - expected) <= 64 * EPS_F32 * scale
        assert_close_relative(grad_gen, torch_grad_gen, tol=1e-5, what=f"d/dgen near the orbit ({method})")


def test_spatial_gram_matches_reference():
    gen, _ = random_pair((2, 10, 6, 6))
    gram = spatial_gram(gen)
    assert gram.shape == (2, 10, 10) and gram.dtype == jnp.float32
    x = np_normalize(gen)
    assert_close_relative(gram, x @ x.transpose(0, 2, 1), tol=1e-6, what="spatial_gram")


def test_methods_agree_and_auto_picks_the_cheaper():
    gen, ref = random_pair((2, 96, 24, 32), seed=3)
    values = [float(sga_loss(gen, ref, method=m)) for m in METHODS]
    assert max(values) - min(values) <= 1e-6 * max(values)
    # Multiply-adds alone: gram N^2 (Cg + Cf), channel N (Cg^2 + Cf^2 + Cg Cf). The N x N buffers
    # move the switch: on XLA:CPU channel wins forward from N ~ 0.85 C and with the gradient from
    # N ~ 1.2 C (bench/align.py); on a GPU the buffers cost less.
    for gradient in (False, True):
        assert choose_method(4096, 768, 768, gradient=gradient, backend="cpu") == "channel"
        assert choose_method(1024, 768, 768, gradient=gradient, backend="cpu") == "channel"
        assert choose_method(576, 768, 768, gradient=gradient, backend="cpu") == "gram"
        assert choose_method(1024, 3072, 768, gradient=gradient, backend="cpu") == "gram"
        assert choose_method(1024, 768, 768, gradient=gradient, backend="gpu") == "gram"
    assert choose_method(1024, 1024, 1024, backend="cpu") == "channel"
    assert choose_method(1024, 1024, 1024, gradient=True, backend="cpu") == "gram"
    costs = method_costs(1024, 768, 768, backend="gpu")
    assert costs["channel"] == 1024 * 3 * 768**2 and costs["gram"] == 1024**2 * (2 * 768 + 2 * 80)


def test_auto_evaluates_and_differentiates_with_the_faster_form_of_each():
    gen, ref = random_pair((2, 64, 160, 160), seed=5)  # on the CPU: channel forward, gram with the gradient
    assert (choose_method(64, 160, 160), choose_method(64, 160, 160, gradient=True)) == ("channel", "gram")
    loss = {m: jax.jit(functools.partial(sga_loss, method=m)) for m in METHODS}
    np.testing.assert_array_equal(loss["auto"](gen, ref), loss["channel"](gen, ref))
    grads = {m: jax.jit(jax.value_and_grad(functools.partial(sga_loss, method=m))) for m in METHODS}
    auto_value, auto_grad = grads["auto"](gen, ref)
    gram_value, gram_grad = grads["gram"](gen, ref)
    np.testing.assert_array_equal(auto_value, gram_value)
    np.testing.assert_array_equal(auto_grad, gram_grad)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_inputs_give_float32_loss(method):
    gen, ref = random_pair((2, 64, 16, 24), seed=1)
    full = sga_loss(gen, ref, method=method)
    half = sga_loss(jnp.asarray(gen, jnp.bfloat16), jnp.asarray(ref, jnp.bfloat16), method=method)
    assert half.dtype == jnp.float32
    assert abs(float(half) - float(full)) / float(full) <= 1e-2
    mixed = sga_loss(jnp.asarray(gen, jnp.bfloat16), ref, method=method)
    assert mixed.dtype == jnp.float32


# --- REPA / iREPA against PyTorch --------------------------------------------------------------


def torch_repa(gen: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return -F.cosine_similarity(gen, ref, dim=-1).mean()


def torch_irepa(gen: torch.Tensor, ref: torch.Tensor, alpha: float) -> torch.Tensor:
    target = ref - alpha * ref.mean(dim=1, keepdim=True)
    target = target / (target.std(dim=1, keepdim=True) + 1e-6)
    return torch_repa(gen, target)


@pytest.mark.parametrize("alpha", [None, 0.6, 0.8, 1.0])
def test_repa_and_irepa_match_torch(alpha):
    gen, ref = random_pair((3, 20, 12, 12), seed=2)
    ref = ref + 0.5  # a non-zero spatial mean, so alpha matters
    g = torch.tensor(gen, dtype=torch.float64, requires_grad=True)
    r = torch.tensor(ref, dtype=torch.float64)
    if alpha is None:
        fn = lambda a, b: repa_loss(a, b)  # noqa: E731
        expected = torch_repa(g, r)
    else:
        fn = lambda a, b: irepa_loss(a, b, alpha=alpha)  # noqa: E731
        expected = torch_irepa(g, r, alpha)
    expected.backward()
    loss, grad = jax.jit(jax.value_and_grad(fn))(gen, ref)
    assert loss.dtype == jnp.float32
    assert abs(float(loss) - expected.item()) <= 1e-6
    assert_close_relative(grad, g.grad.numpy(), tol=1e-5, what="d/dgen")


def test_irepa_default_alpha_and_bf16():
    gen, ref = random_pair((2, 16, 8, 8), seed=4)
    expected = torch_irepa(torch.tensor(gen), torch.tensor(ref), 0.6).item()
    assert abs(float(irepa_loss(gen, ref)) - expected) <= 1e-6
    half = irepa_loss(jnp.asarray(gen, jnp.bfloat16), jnp.asarray(ref, jnp.bfloat16))
    assert half.dtype == jnp.float32 and abs(float(half) - expected) <= 1e-2 * abs(expected)


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn",
    [lambda g, r: sga_loss(g, r), lambda g, r: sga_loss(g, r, method="channel"), repa_loss, irepa_loss],
    ids=["sga", "sga_channel", "repa", "irepa"],
)
@pytest.mark.parametrize(
    "gen_shape, ref_shape",
    [
        ((2, 5, 4), (2, 6, 4)),
        ((3, 5, 4), (2, 5, 4)),
        ((5, 4), (5, 4)),
        ((2, 5, 4), (2, 5, 4, 1)),
        ((2, 0, 4), (2, 0, 4)),
        ((2, 5, 0), (2, 5, 4)),
        ((0, 5, 4), (0, 5, 4)),
    ],
    ids=["N", "B", "rank2", "rank4", "emptyN", "emptyC", "emptyB"],
)
def test_bad_shapes_raise_value_error_naming_them(fn, gen_shape, ref_shape):
    gen, ref = jnp.ones(gen_shape), jnp.ones(ref_shape)
    with pytest.raises(ValueError) as info:
        fn(gen, ref)
    message = str(info.value)
    assert str(gen_shape) in message or str(ref_shape) in message
    with pytest.raises(ValueError):
        jax.jit(fn)(gen, ref)


def test_other_bad_input():
    gen = jnp.ones((2, 5, 4))
    with pytest.raises(ValueError, match="method"):
        sga_loss(gen, gen, method="svd")
    with pytest.raises(ValueError, match=r"\(2, 5, 3\)"):
        repa_loss(gen, jnp.ones((2, 5, 3)))
    with pytest.raises(ValueError, match=r"\(2, 1, 4\)"):
        irepa_loss(jnp.ones((2, 1, 4)), jnp.ones((2, 1, 4)))
    with pytest.raises(ValueError, match="floating"):
        sga_loss(jnp.ones((2, 5, 4), jnp.int32), gen)
    assert abs(float(sga_loss(gen, jnp.ones((2, 5, 7))))) <= 1e-6  # different widths are fine for SGA


# --- zero rows ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ("gram", "channel"))
def test_all_zero_rows_are_finite_and_defined(method):
    gen, ref = random_pair((2, 12, 6, 9), seed=5)
    gen[0, 3] = 0.0
    ref[1, 7] = 0.0
    loss, (grad_gen, grad_ref) = sga_value_and_grads(gen, ref, method)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(grad_gen)) and np.all(np.isfinite(grad_ref))
    # Defined as: a zero row normalises to zero, i.e. a zero row and column in its Gram matrix.
    assert abs(float(loss) - np_sga(gen, ref)) <= 1e-5 * np_sga(gen, ref)
    assert np.all(np.asarray(normalize_rows(gen))[0, 3] == 0.0)

    zeros = np.zeros_like(gen)
    loss, (grad_gen, _) = sga_value_and_grads(zeros, ref, method)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(grad_gen))
    assert abs(float(loss) - np_sga(zeros, ref)) <= 1e-5 * np_sga(zeros, ref)


def test_zero_rows_in_patchwise_losses_are_finite():
    gen, ref = random_pair((2, 8, 5, 5), seed=6)
    gen[1, 2] = 0.0
    ref[0, 4] = 0.0
    for fn in (repa_loss, irepa_loss):
        loss, grads = jax.value_and_grad(fn, argnums=(0, 1))(gen, ref)
        assert np.isfinite(float(loss))
        assert all(np.all(np.isfinite(g)) for g in grads)
    constant = np.ones((1, 6, 4), np.float32)  # zero spatial std: target (1 - alpha) / 1e-6, finite
    loss, grads = jax.value_and_grad(irepa_loss, argnums=(0, 1))(constant, constant)
    assert abs(float(loss) + 1.0) <= 1e-6
    assert all(np.all(np.isfinite(g)) for g in grads)


# --- transforms and sharding -------------------------------------------------------------------


def test_vmap_equals_loop():
    rng = np.random.default_rng(7)
    gen = rng.normal(size=(3, 2, 40, 8)).astype(np.float32)
    ref = rng.normal(size=(3, 2, 40, 6)).astype(np.float32)
    for method in ("gram", "channel"):
        mapped = jax.vmap(lambda g, r: sga_loss(g, r, method=method))(gen, ref)
        looped = [float(sga_loss(gen[i], ref[i], method=method)) for i in range(3)]
        np.testing.assert_allclose(np.asarray(mapped), looped, rtol=1e-6)
    mapped = jax.vmap(irepa_loss)(gen[..., :6], ref)
    looped = [float(irepa_loss(gen[i, ..., :6], ref[i])) for i in range(3)]
    np.testing.assert_allclose(np.asarray(mapped), looped, rtol=1e-6)


@pytest.mark.parametrize("spec", [P("data"), P("data", "fsdp")], ids=["batch", "batch_and_tokens"])
def test_sharded_inputs_match_single_device(spec):
    assert jax.device_count() == 8, "tests/conftest.py sets 8 simulated CPU devices"
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    gen, ref = random_pair((4, 64, 12, 12), seed=8)
    sharding = NamedSharding(mesh, spec)
    gen_s, ref_s = jax.device_put(gen, sharding), jax.device_put(ref, sharding)
    losses = {
        "gram": lambda g, r: sga_loss(g, r, method="gram"),
        "channel": lambda g, r: sga_loss(g, r, method="channel"),
        "repa": repa_loss,
        "irepa": irepa_loss,
    }
    for name, fn in losses.items():
        step = jax.jit(jax.value_and_grad(fn))
        single_loss, single_grad = step(gen, ref)
        loss, grad = step(gen_s, ref_s)
        np.testing.assert_allclose(float(loss), float(single_loss), rtol=1e-6, atol=1e-7, err_msg=name)
        assert_close_relative(grad, single_grad, tol=1e-6, what=f"sharded gradient ({name})")


@pytest.mark.parametrize("method", ("gram", "channel"))
def test_forward_mode_and_hessian_vector_products_match_torch(method):
    gen, ref = random_pair((2, 10, 6, 5), seed=9)
    tangent = np.random.default_rng(10).normal(size=gen.shape).astype(np.float32)
    g = torch.tensor(gen, dtype=torch.float64, requires_grad=True)
    r = torch.tensor(ref, dtype=torch.float64, requires_grad=True)
    x, y = F.normalize(g, dim=-1), F.normalize(r, dim=-1)
    diff = x @ x.transpose(1, 2) - y @ y.transpose(1, 2)
    loss = (diff**2).sum(dim=(1, 2)).mean() / gen.shape[1] ** 2
    (grad_gen,) = torch.autograd.grad(loss, g, create_graph=True)
    (hvp,) = torch.autograd.grad((grad_gen * torch.tensor(tangent, dtype=torch.float64)).sum(), g)

    fn = lambda a: sga_loss(a, ref, method=method)  # noqa: E731
    _, directional = jax.jvp(fn, (gen,), (tangent,))
    expected_directional = float((grad_gen.detach().numpy() * tangent).sum())
    assert abs(float(directional) - expected_directional) <= 1e-5 * abs(expected_directional)
    _, ours_hvp = jax.jvp(jax.grad(fn), (gen,), (tangent,))
    assert_close_relative(ours_hvp, hvp.numpy(), tol=1e-4, what=f"Hessian-vector product ({method})")
