"""LPIPS-VGG16 against the lpips package's `LPIPS(net="vgg")` holding the same random trunk (saved as
torchvision's file and as a timm-style safetensors) and the package's real lin weights (read through
the safe pickle reader): distances, input gradients, the gradient-safe norm, jit, bf16, sharding,
the converters and the metric."""

import copy
import functools
import os

import jax
import jax.numpy as jnp
import lpips as reference_lpips
import numpy as np
import pytest
import torch
import torchvision
from flax import nnx
from safetensors.torch import save_file

from sga_jax import convert, metrics, parallel
from sga_jax import weights as W
from sga_jax.models import lpips
from torch_reference import assert_close_relative, nchw_to_nhwc, nhwc_to_nchw

LIN = os.path.join(os.path.dirname(reference_lpips.__file__), "weights", "v0.1", "vgg.pth")
TOL = 1e-4


def _random_vgg16() -> torch.nn.Module:
    """torchvision's VGG16 with every parameter random (He-scaled convs, so activations keep a sane
    scale through 13 layers); the classifier keeps torchvision's names at a small width."""
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None)
    vgg.classifier = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Dropout(),
                                         torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Dropout(), torch.nn.Linear(4, 3))
    with torch.no_grad():
        for name, param in vgg.named_parameters():
            fan_in = param[0].numel() if param.ndim > 1 else 10
            param.copy_(torch.randn_like(param) * (2.0 / fan_in) ** 0.5)
    return vgg.eval()


def _reference_with(features: dict[str, torch.Tensor]) -> torch.nn.Module:
    """lpips.LPIPS(net="vgg") with its real lin weights and the trunk `features` (torchvision names)."""
    model = reference_lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    trunk = {}
    for key in model.net.state_dict():
        index, leaf = key.split(".")[1:]  # "slice2.5.weight"
        trunk[key] = features[f"features.{index}.{leaf}"]
    model.net.load_state_dict(trunk)
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The random trunk as torchvision saves it (`torch.save(state_dict)`, zip pickle) and as a
    timm-style safetensors (torchvision's `features.*` names beside timm's head names)."""
    vgg = _random_vgg16()
    folder = tmp_path_factory.mktemp("lpips")
    state = vgg.state_dict()
    torch.save(state, folder / "vgg16-397923af.pth")
    timm_like = {k: v for k, v in state.items() if k.startswith("features.")}
    timm_like.update({"pre_logits.fc1.weight": torch.zeros(4, 8, 1, 1), "head.fc.weight": torch.zeros(3, 4)})
    save_file(timm_like, folder / "vgg16.tv_in1k.safetensors")
    return folder, state


@pytest.fixture(scope="module")
def reference(files):
    return _reference_with(files[1])


@pytest.fixture(scope="module")
def model(files):
    return lpips.load(files[0] / "vgg16-397923af.pth", LIN)


def _pair(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, shape).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.3, shape), -1, 1).astype(np.float32)
    return x, y


@functools.partial(jax.jit, static_argnums=0)
def _grads(graphdef, state, x, y):
    return jax.grad(lambda a, b: nnx.merge(graphdef, state)(a, b).sum(), argnums=(0, 1))(x, y)


def _input_grads(model, x, y):
    """d sum(LPIPS) / d (x, y), jitted with the parameters as arguments (not folded constants)."""
    graphdef, state = nnx.split(model)
    return _grads(graphdef, state, x, y)


def _torch_distances(reference, x, y):
    with torch.no_grad():
        return reference(nhwc_to_nchw(x), nhwc_to_nchw(y)).numpy().reshape(-1)


@pytest.mark.parametrize("trunk", ["vgg16-397923af.pth", "vgg16.tv_in1k.safetensors"])
@pytest.mark.parametrize("shape", [(2, 64, 64, 3), (2, 44, 60, 3)])
def test_distances_match_the_lpips_package(files, reference, trunk, shape):
    model = lpips.load(files[0] / trunk, LIN)
    x, y = _pair(shape)
    want = _torch_distances(reference, x, y)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(metrics.lpips_distance(model, x, y))
    assert got.shape == (shape[0],) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=TOL, atol=0)


def test_lin_weights_are_the_packages_and_the_trunk_is_torchvisions(files, model):
    lins = torch.load(LIN, map_location="cpu", weights_only=False)
    for k in range(5):
        np.testing.assert_array_equal(np.asarray(getattr(model, f"lin{k}").kernel[...])[:, 0],
                                      lins[f"lin{k}.model.1.weight"].numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(model.features["28"].kernel[...]),
                                  files[1]["features.28.weight"].numpy().transpose(2, 3, 1, 0))


def test_input_gradients_match_torch_autograd(reference, model):
    x, y = _pair((2, 40, 48, 3), seed=1)
    tx, ty = nhwc_to_nchw(x).requires_grad_(), nhwc_to_nchw(y).requires_grad_()
    reference(tx, ty).sum().backward()
    with jax.default_matmul_precision("highest"):
        gx, gy = _input_grads(model, x, y)
    assert_close_relative(gx, nchw_to_nhwc(tx.grad), TOL, "d lpips / d x")
    assert_close_relative(gy, nchw_to_nhwc(ty.grad), TOL, "d lpips / d y")


def test_gradients_are_finite_at_all_zero_images_and_features(files, model):
    naive = lambda t: t / (jnp.sqrt(jnp.sum(t**2, axis=-1, keepdims=True)) + 1e-10)
    zero = jnp.zeros((1, 2, 2, 4))
    assert np.isnan(np.asarray(jax.grad(lambda t: naive(t).sum())(zero))).all()  # what the safe norm avoids
    assert np.isfinite(np.asarray(jax.grad(lambda t: lpips.unit_normalize(t).sum())(zero))).all()

    x = np.zeros((1, 32, 32, 3), np.float32)
    _, y = _pair((1, 32, 32, 3), seed=2)
    assert all(np.isfinite(np.asarray(g)).all() for g in _input_grads(model, x, y))
    assert all(np.isfinite(np.asarray(g)).all() for g in _input_grads(model, x, x))

    # a trunk whose relu5_3 is zero everywhere: every normalised tap-5 vector has a zero norm
    dead = copy.deepcopy(model)
    dead.features["28"].bias[...] = jnp.full((512,), -1e3)
    features = dict(files[1], **{"features.28.bias": torch.full((512,), -1e3)})
    np.testing.assert_allclose(np.asarray(metrics.lpips_distance(dead, x, y)),
                               _torch_distances(_reference_with(features), x, y), rtol=1e-4)
    assert all(np.isfinite(np.asarray(g)).all() for g in _input_grads(dead, x, y))


def test_jit_equals_eager(model):
    x, y = _pair((1, 32, 32, 3), seed=3)
    np.testing.assert_allclose(np.asarray(metrics.lpips_distance(model, x, y)), np.asarray(model(x, y)), rtol=1e-6)


def test_bf16_compute_is_close_to_fp32(files, model):
    x, y = _pair((2, 32, 32, 3), seed=4)
    bf16 = lpips.load(files[0] / "vgg16-397923af.pth", LIN, dtype="bfloat16")
    got = np.asarray(metrics.lpips_distance(bf16, x, y))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, np.asarray(metrics.lpips_distance(model, x, y)), rtol=5e-2)


def test_a_batch_sharded_over_eight_devices_equals_one_device(files, model):
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    rules = parallel.resolve_rules(None)
    sharded = lpips.load(files[0] / "vgg16-397923af.pth", LIN,
                         shardings=lambda abstract: parallel.state_shardings(abstract, mesh, rules))
    assert len(sharded.features["26"].kernel[...].sharding.device_set) == 8
    x, y = _pair((8, 32, 32, 3), seed=5)
    batch = parallel.batch_sharding(mesh, rules)
    with parallel.activation_sharding(mesh, rules):
        got = metrics.lpips_distance(sharded, jax.device_put(x, batch), jax.device_put(y, batch))
    assert len(got.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(got), np.asarray(metrics.lpips_distance(model, x, y)), rtol=1e-5)


def _assert_same_params(a: nnx.Module, b: nnx.Module) -> None:
    for left, right in zip(jax.tree.leaves(nnx.state(a, nnx.Param)), jax.tree.leaves(nnx.state(b, nnx.Param)), strict=True):
        np.testing.assert_array_equal(np.asarray(left), np.asarray(right))


def test_convert_cli_both_ways(files, model, tmp_path):
    trunk = files[0] / "vgg16-397923af.pth"
    assert convert.main(["lpips", str(trunk), str(tmp_path / "converted"), "--lin", LIN]) == 0
    _assert_same_params(lpips.load(tmp_path / "converted"), model)
    assert W.converted.load_model("lpips", tmp_path / "converted", dtype="bfloat16").config.dtype == "bfloat16"
    assert convert.main(["lpips", str(tmp_path / "converted"), str(tmp_path / "out.safetensors"), "--export", "lpips"]) == 0
    exported = W.CheckpointReader(tmp_path / "out.safetensors")
    assert "features.0.weight" in exported and exported.shape("lin2.model.1.weight") == (1, 256, 1, 1)
    _assert_same_params(lpips.load(tmp_path / "out.safetensors"), model)
    with pytest.raises(ValueError, match="already holds the lin weights"):
        lpips.load(tmp_path / "converted", LIN)
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["vae", str(trunk), str(tmp_path / "x"), "--lin", LIN])
    assert exit_info.value.code == 2


def test_lin_files_and_directories(files, reference, model, tmp_path):
    trunk = files[0] / "vgg16-397923af.pth"
    with pytest.raises(W.CheckpointError, match=r"no LPIPS lin weights \('lin0\.model\.1\.weight'\); pass lin="):
        lpips.load(trunk)
    lins = torch.load(LIN, map_location="cpu", weights_only=False)
    torch.save({k.replace("model.1", "model.0"): v for k, v in lins.items()}, tmp_path / "no_dropout.pth")
    _assert_same_params(lpips.load(trunk, tmp_path / "no_dropout.pth"), model)  # PerceptualSimilarity #93's names
    both = tmp_path / "both"
    both.mkdir()
    (both / "vgg16-397923af.pth").write_bytes(trunk.read_bytes())
    (both / "vgg.pth").write_bytes(open(LIN, "rb").read())
    _assert_same_params(lpips.load(both), model)
    whole = {f"features.{k.split('.')[1]}.{k.split('.')[2]}": v for k, v in reference.net.state_dict().items()}
    torch.save({**whole, **reference.state_dict()}, tmp_path / "lpips_module.pth")  # + lins.{k}, scaling_layer.*
    _assert_same_params(lpips.load(tmp_path / "lpips_module.pth"), model)


def test_checkpoints_that_do_not_fit_are_clear_errors(files, tmp_path):
    state = dict(files[1])
    state["features.1.running_mean"] = torch.zeros(64)  # a vgg16_bn trunk is not vgg16
    torch.save(state, tmp_path / "bn.pth")
    with pytest.raises(W.CheckpointError, match=r"unexpected 1 tensors: features\.1\.running_mean"):
        lpips.load(tmp_path / "bn.pth", LIN)
    state = dict(files[1])
    state["features.0.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(state, tmp_path / "wide.pth")
    with pytest.raises(W.CheckpointError, match=r"'features\.0\.weight' has shape \(64, 3, 5, 5\), expected \(64, 3, 3, 3\)"):
        lpips.load(tmp_path / "wide.pth", LIN)


def test_model_refuses_mismatched_inputs(model):
    with pytest.raises(ValueError, match=r"two \(B, H, W, 3\) batches of one shape"):
        model(jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 16, 3)))


def test_mean_lpips_averages_over_every_image_of_uneven_batches(model):
    a, b = _pair((3, 32, 32, 3), seed=6)
    c, d = _pair((1, 40, 40, 3), seed=7)
    per_image = np.concatenate([np.asarray(metrics.lpips_distance(model, a, b)), np.asarray(metrics.lpips_distance(model, c, d))])
    assert metrics.mean_lpips(model, [(a, b), (c, d)]) == pytest.approx(float(per_image.astype(np.float64).mean()), rel=1e-12)
    with pytest.raises(ValueError, match="no image pairs"):
        metrics.mean_lpips(model, [])
