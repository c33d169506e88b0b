"""SAM2's Hiera trunk against transformers' `Sam2HieraDetModel` (and the trunk inside `Sam2Model`):
tiny random configs, fp32, saved with save_pretrained and loaded by our `sam2.load`."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from sga_jax import weights as W
from sga_jax.models import sam2
from tests.torch_reference import assert_close_relative, nchw_to_nhwc, randomize_, to_numpy

TINY = dict(
    hidden_size=16, num_attention_heads=1, blocks_per_stage=[1, 2, 3, 2], embed_dim_per_stage=[16, 32, 64, 128],
    num_attention_heads_per_stage=[1, 2, 2, 4], window_size_per_stage=[4, 2, 4, 2], global_attention_blocks=[4, 7],
    window_positional_embedding_background_size=[6, 6], image_size=[64, 64],
)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("sam2")
    reference = transformers.Sam2HieraDetModel(transformers.Sam2HieraDetConfig(**TINY))
    randomize_(reference, seed=7, scale=0.2)
    reference.save_pretrained(path, safe_serialization=True)
    return reference.eval(), sam2.load(path), path


def test_tiny_preset_is_the_reference_config(pair):
    assert pair[1].config == sam2.Sam2HieraConfig.tiny()


@pytest.mark.parametrize("size", [(64, 64), (96, 32)], ids=["configured", "tall"])
def test_every_stage_matches_transformers(pair, size):
    reference, ours, _ = pair
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = reference(pixel_values=pixels)
    stages = jax.jit(lambda m, x: m(x, all_stages=True))(ours, jnp.asarray(nchw_to_nhwc(pixels)))
    assert len(stages) == len(out.intermediate_hidden_states) == 4
    for i, (got, want) in enumerate(zip(stages, out.intermediate_hidden_states)):
        assert_close_relative(got, to_numpy(want), 1e-4, f"SAM2 stage {i + 1} at {size}")
    assert_close_relative(stages[-1], to_numpy(out.last_hidden_state), 1e-4, "SAM2 last_hidden_state")
    assert stages[-1].shape == (2, size[0] // 32, size[1] // 32, 128)


def test_loads_the_trunk_of_a_full_sam2_checkpoint(pair, tmp_path):
    reference, ours, _ = pair
    config = transformers.Sam2Config(
        vision_config=dict(model_type="sam2_vision_model", backbone_config=dict(model_type="sam2_hiera_det_model", **TINY),
                           backbone_channel_list=[128, 64, 32, 16])
    )
    full = transformers.Sam2Model(config)
    full.vision_encoder.backbone.load_state_dict(reference.state_dict())
    full.save_pretrained(tmp_path, safe_serialization=True)
    trunk = sam2.load(tmp_path)
    assert trunk.config == ours.config
    x = jax.random.normal(jax.random.key(1), (1, 64, 64, 3))
    run = jax.jit(lambda m, x: m(x))
    np.testing.assert_array_equal(np.asarray(run(trunk, x)), np.asarray(run(ours, x)))


def test_save_round_trips_and_loads_in_transformers(pair, tmp_path):
    reference, ours, _ = pair
    sam2.save(ours, tmp_path)
    back = transformers.Sam2HieraDetModel.from_pretrained(tmp_path).eval()
    theirs = reference.state_dict()
    for name, value in back.state_dict().items():
        np.testing.assert_array_equal(to_numpy(value), to_numpy(theirs[name]), err_msg=name)
    assert sam2.Sam2HieraConfig.from_dict(json.loads(json.dumps(ours.config.to_dict()))) == ours.config


def test_bad_grid_and_bad_checkpoint_are_named(pair):
    _, ours, path = pair
    with pytest.raises(ValueError, match=r"grid \(10, 16\) must be a multiple of the window position embedding \(4, 4\)"):
        ours(jnp.zeros((1, 40, 64, 3)))
    wrong = sam2.Sam2HieraConfig.tiny(blocks_per_stage=(1, 2, 2, 2), global_attention_blocks=(4,))
    with pytest.raises(W.CheckpointError, match=r"missing 2 tensors: blocks\.5\.proj\.bias, blocks\.5\.proj\.weight\n  unexpected 14 tensors: blocks\.6\.proj"):
        sam2.load(path, wrong)


def test_base_plus_parameter_count_matches_transformers():
    preset = sam2.Sam2HieraConfig.base_plus()
    hf = transformers.Sam2HieraDetConfig(
        hidden_size=112, num_attention_heads=2, blocks_per_stage=[2, 3, 16, 3], embed_dim_per_stage=[112, 224, 448, 896],
        num_attention_heads_per_stage=[2, 4, 8, 16], window_size_per_stage=[8, 4, 14, 7],
        global_attention_blocks=[12, 16, 20], window_positional_embedding_background_size=[14, 14],
    )
    assert sam2.Sam2HieraConfig.from_hf_config(hf.to_dict()) == preset
    with torch.device("meta"):
        theirs = sum(p.numel() for p in transformers.Sam2HieraDetModel(hf).parameters())
    abstract = nnx.eval_shape(lambda: sam2.Sam2Hiera(preset, rngs=nnx.Rngs(0)))
    ours = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert ours == theirs
