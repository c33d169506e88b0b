"""TextEncoder against diffusers' FluxPipeline.encode_prompt, with tokenizers trained here (no downloads)."""

import numpy as np
import pytest
import torch
import transformers
from diffusers import FluxPipeline
from flax import nnx

from sga_jax import text
from sga_jax.models import clip, t5
from tests.torch_reference import assert_close_relative, randomize_, to_numpy

CORPUS = [
    "a photo of a cat sitting on a red chair",
    "an oil painting of snowy mountains at sunset, highly detailed",
    "the quick brown fox jumps over the lazy dog",
    "a watercolor map of an old harbour town with boats",
    "close-up portrait of an astronaut, 35mm film, soft light",
] * 10
PROMPTS = [
    "a photo of a cat",
    "an oil painting of mountains at sunset, highly detailed, with a quick brown fox and a lazy dog " * 3,
    "Zürich harbour!",
]
T5_LENGTH = 24


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tokenizers trained on CORPUS and random transformers encoders sized to them, saved to disk."""
    root = tmp_path_factory.mktemp("flux_text")
    t5_tok_dir, clip_tok_dir = text.build_demo_tokenizers(root, CORPUS)
    t5_tok = transformers.T5TokenizerFast.from_pretrained(t5_tok_dir)
    clip_tok = transformers.CLIPTokenizerFast.from_pretrained(clip_tok_dir)
    torch.manual_seed(0)
    t5_ref = randomize_(transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8, relative_attention_max_distance=16)), seed=3, scale=0.3)
    clip_ref = randomize_(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, eos_token_id=2)), seed=4, scale=0.3)
    t5_ref.save_pretrained(root / "text_encoder_2", safe_serialization=True)
    clip_ref.save_pretrained(root / "text_encoder", safe_serialization=True)
    return dict(root=root, t5_tok=t5_tok, clip_tok=clip_tok, t5_ref=t5_ref, clip_ref=clip_ref)


def _encoder(assets, **kw):
    root = assets["root"]
    return text.TextEncoder.from_pretrained(root / "text_encoder_2", root / "text_encoder", root / "tokenizer_2",
                                            root / "tokenizer", t5_length=T5_LENGTH, dtype="float32", **kw)


def test_tokenize_pads_and_truncates_as_flux(assets):
    tokens = _encoder(assets).tokenize(PROMPTS)
    t5_want = assets["t5_tok"](PROMPTS, padding="max_length", max_length=T5_LENGTH, truncation=True, return_tensors="np")
    clip_want = assets["clip_tok"](PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np")
    np.testing.assert_array_equal(tokens["t5_ids"], t5_want["input_ids"])
    np.testing.assert_array_equal(tokens["t5_mask"], t5_want["attention_mask"])
    np.testing.assert_array_equal(tokens["clip_ids"], clip_want["input_ids"])
    assert tokens["t5_ids"].shape == (3, T5_LENGTH) and tokens["clip_ids"].shape == (3, 77)
    t5_ids, clip_ids = tokens["t5_ids"], tokens["clip_ids"]
    assert t5_ids[1, -1] == 1 and tokens["t5_mask"][1].all()  # truncated: </s> kept last
    n = tokens["t5_mask"][0].sum()
    assert t5_ids[0, n - 1] == 1 and (t5_ids[0, n:] == 0).all()  # short: </s> then <pad>
    eos, bos = assets["clip_tok"].eos_token_id, assets["clip_tok"].bos_token_id
    assert (clip_ids[:, 0] == bos).all() and clip_ids[1, -1] == eos and eos == clip_ids.max()
    assert (clip_ids != assets["clip_tok"].unk_token_id).sum(axis=1).min() > 0


def test_matches_diffusers_flux_encode_prompt(assets):
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=assets["clip_ref"], tokenizer=assets["clip_tok"],
                        text_encoder_2=assets["t5_ref"], tokenizer_2=assets["t5_tok"], transformer=None)
    with torch.no_grad():
        want_txt, want_vec, want_ids = pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=T5_LENGTH)
    txt, txt_ids, vec = _encoder(assets)(PROMPTS)
    assert txt.shape == (3, T5_LENGTH, 32) and vec.shape == (3, 32) and txt_ids.shape == (3, T5_LENGTH, 3)
    assert_close_relative(txt, to_numpy(want_txt), 1e-4, "txt")
    assert_close_relative(vec, to_numpy(want_vec), 1e-4, "vec")
    np.testing.assert_array_equal(np.asarray(txt_ids), np.broadcast_to(to_numpy(want_ids), (3, T5_LENGTH, 3)))


def test_mask_t5_option_masks_padding_as_transformers(assets):
    te = _encoder(assets, mask_t5=True)
    tokens = te.tokenize(PROMPTS)
    txt, _, _ = te.encode_tokens(tokens)
    with torch.no_grad():
        want = assets["t5_ref"](input_ids=torch.from_numpy(tokens["t5_ids"]).long(),
                                attention_mask=torch.from_numpy(tokens["t5_mask"]).long()).last_hidden_state
    assert_close_relative(txt, to_numpy(want), 1e-4, "masked txt")


def test_missing_tokenizer_names_the_path(assets, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        text.load_tokenizer("t5", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty holds no clip tokenizer"):
        text.load_tokenizer("clip", tmp_path / "empty")


def test_fingerprint_tracks_weights_tokenizers_and_lengths(assets, tmp_path):
    te = _encoder(assets)
    base = te.fingerprint()
    assert _encoder(assets).fingerprint() == base
    longer = text.TextEncoder(te.t5_model, te.clip_model, te.t5_tokenizer, te.clip_tokenizer, t5_length=T5_LENGTH + 1)
    assert longer.fingerprint() != base
    other_tok_dir, _ = text.build_demo_tokenizers(tmp_path, CORPUS[:3], t5_vocab_size=30)
    other_tok = transformers.T5TokenizerFast.from_pretrained(other_tok_dir)
    assert text.TextEncoder(te.t5_model, te.clip_model, other_tok, te.clip_tokenizer,
                            t5_length=T5_LENGTH).fingerprint() != base
    nudged = t5.load(assets["root"] / "text_encoder_2")
    kernel = nudged.encoder.block.layer[0].SelfAttention.q.kernel
    kernel[...] = kernel[...].at[1, 3, 5].add(1e-3)
    assert text.TextEncoder(nudged, te.clip_model, te.t5_tokenizer, te.clip_tokenizer,
                            t5_length=T5_LENGTH).fingerprint() != base


def test_vocabulary_mismatch_is_refused(assets):
    te = _encoder(assets)
    small = nnx.eval_shape(lambda: clip.ClipTextModel(clip.ClipTextConfig.tiny(max_position_embeddings=77), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=f"clip tokenizer has {len(te.clip_tokenizer)} tokens but the model's vocabulary has 128"):
        text.TextEncoder(te.t5_model, small, te.t5_tokenizer, te.clip_tokenizer)
