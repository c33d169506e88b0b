"""Full CLIP models (both towers and projections) against transformers' `CLIPModel`: a tiny random
config saved with save_pretrained and loaded by `clip.load_clip_model`, fp32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from sga_jax import metrics
from sga_jax.models import clip
from tests.torch_reference import assert_close_relative, nchw_to_nhwc, randomize_, to_numpy

TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16)
VISION = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3, image_size=28,
              patch_size=7)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    config = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=20)
    reference = transformers.CLIPModel(config).eval()
    randomize_(reference, seed=3, scale=0.2)
    reference.save_pretrained(path, safe_serialization=True)
    return reference, clip.load_clip_model(path), path


def test_image_and_text_features_match_transformers(pair):
    reference, ours, _ = pair
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 99, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        vision = reference.vision_model(pixel_values=pixels)
        want_image = to_numpy(reference.get_image_features(pixel_values=pixels).pooler_output)
        want_text = to_numpy(reference.get_text_features(input_ids=ids).pooler_output)
    x = jnp.asarray(nchw_to_nhwc(pixels))
    hidden, pooled = jax.jit(lambda m, x: m.vision_model(x))(ours, x)
    assert_close_relative(hidden, to_numpy(vision.last_hidden_state), 1e-4, "CLIP vision last_hidden_state")
    assert_close_relative(pooled, to_numpy(vision.pooler_output), 1e-4, "CLIP vision pooled")
    assert_close_relative(jax.jit(lambda m, x: m.image_features(x))(ours, x), want_image, 1e-4, "image features")
    text = jax.jit(lambda m, t: m.text_features(t))(ours, jnp.asarray(ids.numpy()))
    assert_close_relative(text, want_text, 1e-4, "text features")


def test_vision_tower_refuses_other_sizes_and_configs_read_hub_json(pair):
    _, ours, path = pair
    with pytest.raises(ValueError, match="resize images to config.image_size"):
        ours.vision_model(jnp.zeros((1, 35, 35, 3)))
    assert ours.vision_model.config.patch_size == 7 and ours.projection_dim == 20
    text_only = path / "text_only"
    text_only.mkdir()
    (text_only / "config.json").write_text('{"model_type": "clip_text_model"}')
    with pytest.raises(ValueError, match="not a full CLIPModel"):
        clip.load_clip_model(text_only)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        clip.ClipVisionConfig(image_size=30, patch_size=7)


def test_clip_score_is_100_times_the_clamped_cosine_of_transformers_features(pair):
    reference, ours, _ = pair
    rng = np.random.default_rng(4)
    images = rng.uniform(-1, 1, size=(3, 28, 28, 3)).astype(np.float32)
    ids = rng.integers(0, 99, size=(3, 16)).astype(np.int32)
    pixels = ((images + 1) / 2 - np.array(clip.IMAGE_MEAN)) / np.array(clip.IMAGE_STD)
    with torch.no_grad():
        image = reference.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)).float())
        text = reference.get_text_features(input_ids=torch.from_numpy(ids).long())
        cosine = torch.nn.functional.cosine_similarity(image.pooler_output, text.pooler_output)
    want = 100 * np.maximum(cosine.numpy(), 0)
    np.testing.assert_allclose(np.asarray(metrics.clip_score(ours, jnp.asarray(images), jnp.asarray(ids))), want,
                               rtol=1e-4, atol=1e-3)


def test_clip_pixels_centre_crop_the_long_side():
    images = np.random.default_rng(5).uniform(-1, 1, size=(1, 28, 40, 3)).astype(np.float32)
    crop = (images[:, :, 6:34] + 1) / 2
    want = (crop - np.array(clip.IMAGE_MEAN)) / np.array(clip.IMAGE_STD)
    np.testing.assert_allclose(np.asarray(metrics.clip_pixels(jnp.asarray(images), 28)), want, rtol=1e-5, atol=1e-5)
    assert metrics.clip_pixels(jnp.asarray(images), 14).shape == (1, 14, 14, 3)


def _laion_predictor(input_size, seed):
    """The LAION improved aesthetic predictor's layout (linears with dropouts between, no activations)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1),
    ).eval()


def test_aesthetic_score_matches_the_laion_predictor_on_transformers_embeddings(pair, tmp_path):
    reference, ours, _ = pair
    predictor = _laion_predictor(20, seed=6)
    safetensors.torch.save_file({f"layers.{k}": v for k, v in predictor.state_dict().items()},
                                tmp_path / "aesthetic.safetensors")
    images = np.random.default_rng(7).uniform(-1, 1, size=(2, 28, 28, 3)).astype(np.float32)
    pixels = ((images + 1) / 2 - np.array(clip.IMAGE_MEAN)) / np.array(clip.IMAGE_STD)
    with torch.no_grad():
        embedding = reference.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)).float())
        embedding = embedding.pooler_output / embedding.pooler_output.norm(dim=-1, keepdim=True)
        want = predictor(embedding)[:, 0].numpy()
    ours_predictor = metrics.load_aesthetic_predictor(tmp_path / "aesthetic.safetensors")
    got = metrics.aesthetic_score(ours, ours_predictor, jnp.asarray(images))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
    torch.save({f"layers.{k}": v for k, v in predictor.state_dict().items()}, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    from_pickle = metrics.load_aesthetic_predictor(tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    np.testing.assert_array_equal(np.asarray(metrics.aesthetic_score(ours, from_pickle, jnp.asarray(images))), np.asarray(got))
