"""The FID InceptionV3 against pytorch-fid's network and torch-fidelity's feature extractor (same
random weights, BatchNorm statistics included, fp32), through each input protocol; FID against
pytorch-fid's `calculate_frechet_distance`; loading, converting and bad inputs."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from pytorch_fid.fid_score import calculate_frechet_distance
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from flax import nnx
from torchvision.transforms import functional as TF

from sga_jax import convert, evaluate, metrics
from sga_jax import weights as W
from sga_jax.models import inception
from sga_jax.weights.converted import load_model
from tests.inception_reference import pytorch_fid_network, random_inception_state
from tests.torch_reference import assert_close_relative, nhwc_to_nchw

BATCH = 2


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    root = tmp_path_factory.mktemp("inception")
    state = random_inception_state(seed=0)
    safetensors.torch.save_file(state, str(root / "inception.safetensors"))
    torch.save(state, root / inception.WEIGHTS_FILE)
    fidelity = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits"],
                                           feature_extractor_weights_path=str(root / inception.WEIGHTS_FILE)).eval()
    return {"ours": inception.load(root / "inception.safetensors"), "pytorch_fid": pytorch_fid_network(state),
            "torch_fidelity": fidelity, "root": root}


def _uint8(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(BATCH, *shape, 3), dtype=np.uint8)


def _model_range(pixels):
    return jnp.asarray(pixels.astype(np.float32) / 127.5 - 1.0)


@pytest.mark.parametrize("shape", [(299, 299), (200, 340)], ids=["299", "200x340"])
def test_pytorch_fid_protocol_equals_pytorch_fid(nets, shape):
    unit = np.random.default_rng(1).uniform(size=(BATCH, *shape, 3)).astype(np.float32)
    with torch.inference_mode():
        (want,) = nets["pytorch_fid"](nhwc_to_nchw(unit))
    got = metrics.inception_features(nets["ours"], jnp.asarray(2 * unit - 1), protocol="pytorch-fid")
    assert np.abs(want.numpy()).max() > 1e-2  # the random network keeps a useful signal
    assert_close_relative(got, want.numpy()[:, :, 0, 0], 1e-4, f"pool features {shape}")


@pytest.mark.parametrize("shape", [(299, 299), (256, 384)], ids=["299", "256x384"])
def test_diffusion_4k_protocol_equals_torch_fidelity(nets, shape):
    pixels = _uint8(shape, seed=2)
    with torch.inference_mode():
        want, want_logits = nets["torch_fidelity"](torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous())
    got = metrics.inception_features(nets["ours"], _model_range(pixels))
    assert_close_relative(got, want.numpy(), 1e-4, f"pool features {shape}")
    assert_close_relative(nets["ours"].logits(got), want_logits.numpy(), 1e-4, "logits")


def test_diffusion_4k_evaluation_is_their_fid_preprocess_then_torch_fidelity(nets):
    """Diffusion-4K's whole FID input: `fid_preprocess` (torchvision short-side resize + center
    crop on uint8), then torchmetrics <= 1.7 / torch-fidelity."""
    pixels = _uint8((300, 420), seed=3)
    tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    with torch.inference_mode():
        want, _ = nets["torch_fidelity"](TF.center_crop(TF.resize(tensor, 256), (256, 256)))
    squared = np.stack([evaluate.square(image, 256) for image in pixels])
    got = metrics.inception_features(nets["ours"], _model_range(squared))
    assert_close_relative(got, want.numpy(), 1e-4, "pool features after resize and crop")


def test_streaming_statistics_equal_torch_fidelity_features(nets):
    images = [_uint8((64, 96), seed=4)[:1], _uint8((80, 80), seed=5)]  # 3 images, two sizes
    stream = metrics.InceptionStatistics(nets["ours"], batch_size=BATCH)
    for batch in images:
        stream.add(_model_range(batch))
    stats = stream.finish()
    with torch.inference_mode():
        want = np.concatenate([nets["torch_fidelity"](torch.from_numpy(b).permute(0, 3, 1, 2).contiguous())[0].numpy()
                               for b in images]).astype(np.float64)
    assert stats.count == 3
    assert_close_relative(stats.mean, want.mean(axis=0), 1e-4, "mean")
    assert_close_relative(stats.covariance, np.cov(want, rowvar=False), 1e-4, "covariance")


@pytest.mark.parametrize("samples", [700, 40], ids=["full-rank", "fewer-samples-than-dims"])
def test_fid_equals_pytorch_fid_calculate_frechet_distance(samples):
    rng = np.random.default_rng(6)
    dim = 256
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    a = rng.normal(size=(samples, dim)) @ mixing
    b = (rng.normal(size=(samples + 200, dim)) + 0.3) @ (mixing + 0.1 * rng.normal(size=(dim, dim)) / np.sqrt(dim))
    sa, sb = metrics.FeatureStatistics(dim), metrics.FeatureStatistics(dim)
    for chunk in np.array_split(a, 4):
        sa.update(chunk)
    for chunk in np.array_split(b, 3):
        sb.update(chunk)
    want = calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert sa.frechet_distance(sb) == pytest.approx(want, rel=1e-6)
    assert sa.frechet_distance(sa) == pytest.approx(0.0, abs=1e-6 * np.trace(sa.covariance))


def _assert_same_params(a, b):
    ours, theirs = W.flat_params(nnx.state(a, nnx.Param)), W.flat_params(nnx.state(b, nnx.Param))
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(np.asarray(ours[name].get_value()), np.asarray(theirs[name].get_value()))


def test_pytorch_fid_pth_file_loads_through_the_safe_reader(nets, tmp_path):
    """pytorch-fid's weights ship as a `torch.save` pickle: zip format, and the legacy format too."""
    _assert_same_params(inception.load(nets["root"] / inception.WEIGHTS_FILE), nets["ours"])
    torch.save(random_inception_state(seed=0), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    _assert_same_params(inception.load(tmp_path / "legacy.pth"), nets["ours"])


def test_convert_cli_and_converted_directory(nets, tmp_path, capsys):
    assert convert.main(["inception", str(nets["root"] / inception.WEIGHTS_FILE), str(tmp_path / "conv")]) == 0
    assert json.loads((tmp_path / "conv" / "sga_config.json").read_text())["family"] == "inception"
    _assert_same_params(load_model("inception", tmp_path / "conv"), nets["ours"])
    assert convert.main(["inception", str(tmp_path / "conv"), str(tmp_path / "out"), "--export", "torchvision"]) == 2
    assert capsys.readouterr().err == "error: the inception family is import-only: it has no export format\n"


def test_bad_inputs_are_named(nets, tmp_path):
    with pytest.raises(ValueError, match=r"takes \(B, 299, 299, 3\).*got shape \(1, 64, 64, 3\)"):
        nets["ours"](jnp.zeros((1, 64, 64, 3)))
    with pytest.raises(ValueError, match="unknown FID protocol 'clean-fid'"):
        inception.inception_input(jnp.zeros((1, 8, 8, 3)), "clean-fid")
    with pytest.raises(ValueError, match="batch_size must be positive"):
        metrics.InceptionStatistics(nets["ours"], batch_size=0)
    state = random_inception_state(seed=1)
    safetensors.torch.save_file({"features.0.weight": state["fc.weight"]}, str(tmp_path / "vgg.safetensors"))
    with pytest.raises(W.CheckpointError, match="vgg.safetensors: not an InceptionV3 checkpoint"):
        inception.load(tmp_path / "vgg.safetensors")
    state["Mixed_6b.branch7x7_2.conv.weight"] = state["Mixed_6b.branch7x7_2.conv.weight"][:, :, :, :3].contiguous()
    safetensors.torch.save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(W.CheckpointError, match=r"'Mixed_6b.branch7x7_2.conv.weight' has shape \(128, 128, 1, 3\), "
                                                r"expected \(128, 128, 1, 7\)"):
        inception.load(tmp_path / "bad.safetensors")
