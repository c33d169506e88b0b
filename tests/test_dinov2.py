"""DINOv2 (with and without registers) against transformers' PyTorch models: tiny random
configs, fp32, saved with save_pretrained and loaded by our `dinov2.load`."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from sga_jax import weights as W
from sga_jax.models import dinov2
from sga_jax.models import nn
from tests.torch_reference import assert_close_relative, nchw_to_nhwc, randomize_, to_numpy

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=7)


def _reference(registers: bool, tmp_path):
    if registers:
        config = transformers.Dinov2WithRegistersConfig(**TINY, num_register_tokens=4)
        model = transformers.Dinov2WithRegistersModel(config)
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**TINY))
    randomize_(model, seed=1 + registers, scale=0.2)
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "registers"])
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("dinov2")
    reference = _reference(request.param, path)
    return reference, dinov2.load(path), path


@pytest.mark.parametrize("size", [(28, 28), (35, 56), (21, 42)], ids=["configured", "wide", "downsampled-pos"])
def test_last_hidden_state_matches_transformers(pair, size):
    reference, ours, _ = pair
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = to_numpy(reference(pixel_values=pixels).last_hidden_state)
    got = jax.jit(lambda m, x: m(x))(ours, jnp.asarray(nchw_to_nhwc(pixels)))
    assert_close_relative(got, want, 1e-4, f"DINOv2 last_hidden_state at {size}")


def test_masked_patches_match_transformers(pair):
    reference, ours, _ = pair
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, ::3] = True
    with torch.no_grad():
        want = to_numpy(reference(pixel_values=pixels, bool_masked_pos=mask).last_hidden_state)
    got = jax.jit(lambda m, x, k: m(x, k))(ours, jnp.asarray(nchw_to_nhwc(pixels)), jnp.asarray(mask.numpy()))
    assert_close_relative(got, want, 1e-4, "DINOv2 with masked patches")


def test_save_round_trips_and_loads_in_transformers(pair, tmp_path):
    reference, ours, _ = pair
    dinov2.save(ours, tmp_path)
    cls = transformers.Dinov2WithRegistersModel if ours.config.num_register_tokens else transformers.Dinov2Model
    back = cls.from_pretrained(tmp_path).eval()
    for (name, a), (_, b) in zip(reference.state_dict().items(), back.state_dict().items()):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b), err_msg=name)
    config = dinov2.Dinov2Config.from_dict(json.loads(json.dumps(ours.config.to_dict())))
    assert config == ours.config


def test_bfloat16_load_is_close(pair):
    _, ours, path = pair
    fast = dinov2.load(path, dtype="bfloat16", param_dtype="bfloat16")
    assert fast.encoder.layer.mlp.fc1.kernel[...].dtype == jnp.bfloat16
    x = jax.random.normal(jax.random.key(0), (1, 28, 28, 3))
    run = jax.jit(lambda m, x: m(x).astype(jnp.float32))
    want = np.asarray(run(ours, x))
    got = np.asarray(run(fast, x))
    assert np.abs(got - want).max() / np.abs(want).max() < 5e-2


def test_wrong_shape_is_named(pair, tmp_path):
    _, ours, path = pair
    config = ours.config
    wrong = dataclasses.replace(config, hidden_size=48)
    with pytest.raises(W.CheckpointError, match=r"'embeddings.cls_token' has shape \(1, 1, 32\), expected \(1, 1, 48\)"):
        dinov2.load(path, wrong)


@pytest.mark.parametrize("registers", [False, True], ids=["base", "registers-base"])
def test_preset_parameter_count_matches_transformers(registers):
    preset = dinov2.Dinov2Config.vitb14(registers=registers)
    if registers:
        hf = transformers.Dinov2WithRegistersConfig(image_size=518, patch_size=14, num_register_tokens=4)
        cls = transformers.Dinov2WithRegistersModel
    else:
        hf = transformers.Dinov2Config(image_size=518)
        cls = transformers.Dinov2Model
    assert dinov2.Dinov2Config.from_hf_config(hf.to_dict()) == preset
    with torch.device("meta"):
        theirs = sum(p.numel() for p in cls(hf).parameters())
    abstract = nnx.eval_shape(lambda: dinov2.Dinov2(preset, rngs=nnx.Rngs(0)))
    ours = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert ours == theirs


@pytest.mark.parametrize("antialias", [False, True], ids=["plain", "antialias"])
@pytest.mark.parametrize("sizes", [(37, 32), (4, 7), (6, 3), (14, 64)])
def test_bicubic_resize_is_pytorch_interpolate(sizes, antialias):
    (n_in, n_out) = sizes
    table = torch.randn(1, 3, n_in, n_in + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = torch.nn.functional.interpolate(table, size=(n_out, n_out + 2), mode="bicubic", align_corners=False, antialias=antialias)
    got = nn.resize_torch(jnp.asarray(nchw_to_nhwc(table)), (n_out, n_out + 2), "bicubic", antialias=antialias)
    assert_close_relative(got, nchw_to_nhwc(want), 1e-6, f"bicubic {sizes} antialias={antialias}")
