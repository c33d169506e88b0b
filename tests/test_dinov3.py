"""DINOv3 ViT against transformers' `DINOv3ViTModel` in eval mode: tiny random configs, fp32,
saved with save_pretrained and loaded by our `dinov3.load`."""

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
from sga_jax.models import dinov3
from tests.torch_reference import assert_close_relative, nchw_to_nhwc, randomize_, to_numpy

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, num_register_tokens=4)
VARIANTS = {
    "plain": {},
    "gated-all-biases": dict(use_gated_mlp=True, key_bias=True, hidden_act="silu"),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("dinov3")
    reference = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**TINY, **VARIANTS[request.param]))
    randomize_(reference, seed=5, scale=0.2)
    reference.save_pretrained(path, safe_serialization=True)
    return reference.eval(), dinov3.load(path), path


@pytest.mark.parametrize("size", [(32, 32), (40, 64)], ids=["configured", "wide"])
def test_last_hidden_state_matches_transformers(pair, size):
    reference, ours, _ = pair
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = to_numpy(reference(pixel_values=pixels).last_hidden_state)
    got = jax.jit(lambda m, x: m(x))(ours, jnp.asarray(nchw_to_nhwc(pixels)))
    assert_close_relative(got, want, 1e-4, f"DINOv3 last_hidden_state at {size}")


def test_masked_patches_match_transformers(pair):
    reference, ours, _ = pair
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, 1::4] = True
    with torch.no_grad():
        want = to_numpy(reference(pixel_values=pixels, bool_masked_pos=mask).last_hidden_state)
    got = jax.jit(lambda m, x, k: m(x, k))(ours, jnp.asarray(nchw_to_nhwc(pixels)), jnp.asarray(mask.numpy()))
    assert_close_relative(got, want, 1e-4, "DINOv3 with masked patches")


def test_save_round_trips_and_loads_in_transformers(pair, tmp_path):
    reference, ours, _ = pair
    dinov3.save(ours, tmp_path)
    back = transformers.DINOv3ViTModel.from_pretrained(tmp_path).eval()
    theirs = reference.state_dict()
    for name, value in back.state_dict().items():
        np.testing.assert_array_equal(to_numpy(value), to_numpy(theirs[name]), err_msg=name)
    assert dinov3.Dinov3Config.from_dict(json.loads(json.dumps(ours.config.to_dict()))) == ours.config


def test_missing_tensor_is_named(pair):
    _, ours, path = pair
    wrong = dataclasses.replace(ours.config, key_bias=not ours.config.key_bias)
    with pytest.raises(W.CheckpointError, match=r"layer\.0\.attention\.k_proj\.bias"):
        dinov3.load(path, wrong)


def test_preset_parameter_count_matches_transformers():
    preset = dinov3.Dinov3Config.vitb16()
    hf = transformers.DINOv3ViTConfig(
        hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
        num_register_tokens=4, patch_size=16, rope_theta=100.0, layerscale_value=1.0,
    )
    assert dinov3.Dinov3Config.from_hf_config(hf.to_dict()) == preset
    with torch.device("meta"):
        theirs = sum(p.numel() for p in transformers.DINOv3ViTModel(hf).parameters())
    abstract = nnx.eval_shape(lambda: dinov3.Dinov3(preset, rngs=nnx.Rngs(0)))
    ours = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert ours == theirs
