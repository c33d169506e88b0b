"""CLIP text encoder against transformers' CLIPTextModel: parity, pooling rules, layouts, preset."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from sga_jax import weights as W
from sga_jax.models import clip
from tests.torch_reference import assert_close_relative, randomize_, to_numpy

HF_TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
               max_position_embeddings=16, bos_token_id=125, eos_token_id=2, pad_token_id=126)


def _reference(tmp_path, **overrides):
    torch.manual_seed(0)
    model = randomize_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**{**HF_TINY, **overrides})), seed=2, scale=0.3)
    model.save_pretrained(tmp_path / "clip", safe_serialization=True)
    return model, tmp_path / "clip"


def _batch(eos: int, pad: int, bos: int = 125, length: int = 16, seed: int = 0):
    """BOS, random words below every special id, EOS, then padding (as CLIP's tokenizer pads)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 120, size=(3, length))
    mask = np.zeros_like(ids)
    for row, n in enumerate([length, 9, 4]):
        ids[row, 0], ids[row, n - 1], ids[row, n:] = bos, eos, pad
        mask[row, :n] = 1
    return ids, mask


def _run(ref, model, ids, mask):
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids), attention_mask=None if mask is None else torch.from_numpy(mask))
    hidden, pooled = jax.jit(lambda m, i, a: m(i, a))(model, jnp.asarray(ids), None if mask is None else jnp.asarray(mask))
    return (hidden, pooled), (to_numpy(out.last_hidden_state), to_numpy(out.pooler_output))


@pytest.mark.parametrize("eos_token_id", [2, 127])
def test_matches_transformers_with_padding_and_mask(tmp_path, eos_token_id):
    # eos_token_id 2 (legacy config, Flux's CLIP-L): pooled at the first largest id, the real EOS 127,
    # with padding by that same EOS as Flux's tokenizer pads; otherwise at the first EOS position.
    ref, folder = _reference(tmp_path, eos_token_id=eos_token_id)
    model = clip.load(folder)
    assert model.config.eos_token_id == eos_token_id
    ids, mask = _batch(eos=127, pad=127 if eos_token_id == 2 else 126)
    for attention_mask in (mask, None):
        (hidden, pooled), (want_hidden, want_pooled) = _run(ref, model, ids, attention_mask)
        assert_close_relative(hidden, want_hidden, 1e-4, "last_hidden_state")
        assert_close_relative(pooled, want_pooled, 1e-4, "pooled")
        rows = np.arange(3)
        positions = np.argmax(ids, -1) if eos_token_id == 2 else np.argmax(ids == eos_token_id, -1)
        np.testing.assert_array_equal(np.asarray(pooled), np.asarray(hidden)[rows, positions])


def test_hub_layout_and_full_clip_checkpoint_load(tmp_path):
    ref, folder = _reference(tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    hub = tmp_path / "hub"
    hub.mkdir()
    extra = {"vision_model.post_layernorm.weight": np.ones(8, np.float32), "logit_scale": np.zeros((), np.float32),
             "text_projection.weight": np.zeros((4, 32), np.float32), "text_model.embeddings.position_ids": np.arange(16)[None]}
    save_file({**{"text_model." + k: v for k, v in tensors.items()}, **extra}, str(hub / "model.safetensors"))
    (hub / "config.json").write_text(json.dumps({"model_type": "clip", "text_config": {**HF_TINY, "model_type": "clip_text_model"}}))
    model = clip.load(hub)
    ids, mask = _batch(eos=127, pad=126)
    (hidden, pooled), (want_hidden, want_pooled) = _run(ref, model, ids, mask)
    assert_close_relative(pooled, want_pooled, 1e-4, "pooled from hub layout")


@pytest.mark.parametrize("fmt", clip.FORMATS)
def test_save_loads_back_in_transformers(tmp_path, fmt):
    ref, folder = _reference(tmp_path)
    clip.save(clip.load(folder), tmp_path / fmt, format=fmt)
    keys = W.CheckpointReader(tmp_path / fmt).keys()
    assert all(k.startswith("text_model.") for k in keys) == (fmt == "hub")
    back = transformers.CLIPTextModel.from_pretrained(tmp_path / fmt).eval()
    ids, mask = _batch(eos=127, pad=126, seed=4)
    with torch.no_grad():
        a = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        b = back(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    np.testing.assert_array_equal(to_numpy(a.pooler_output), to_numpy(b.pooler_output))


def test_config_inference_and_round_trip(tmp_path):
    _, folder = _reference(tmp_path, hidden_size=128, num_attention_heads=2)
    inferred = clip.infer_config(W.CheckpointReader(folder), eos_token_id=2)
    from_json = clip.ClipTextConfig.from_hf_config(json.loads((folder / "config.json").read_text()))
    assert inferred == from_json
    assert clip.ClipTextConfig.from_dict(json.loads(json.dumps(from_json.to_dict()))) == from_json
    with pytest.raises(ValueError, match="not divisible"):
        clip.ClipTextConfig.tiny(num_attention_heads=5)


def test_vit_l_14_preset_has_transformers_parameter_count():
    hf = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                     num_attention_heads=12, max_position_embeddings=77, eos_token_id=2)
    with torch.device("meta"):
        reference = transformers.CLIPTextModel(hf)
    want = sum(p.numel() for p in reference.parameters())
    model = nnx.eval_shape(lambda: clip.ClipTextModel(clip.ClipTextConfig.vit_l_14(), rngs=nnx.Rngs(0)))
    got = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert got == want == 123_060_480
    assert clip.ClipTextConfig.from_hf_config(hf.to_dict()) == clip.ClipTextConfig.vit_l_14()


def test_too_long_input_is_refused(tmp_path):
    _, folder = _reference(tmp_path)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 16"):
        clip.load(folder)(jnp.zeros((1, 17), jnp.int32))
