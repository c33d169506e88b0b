"""The image metrics against scikit-image, SciPy, Pillow and transformers: SSIM / PSNR / NMSE,
Diffusion-4K's GLCM score and compression ratio, and the Fréchet distance."""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import torch
import transformers
from PIL import Image
from skimage.feature import graycomatrix
from skimage.measure import shannon_entropy
from skimage.metrics import normalized_root_mse, peak_signal_noise_ratio, structural_similarity

from sga_jax import metrics
from sga_jax.metrics import texture
from sga_jax.models import dinov2
from tests.torch_reference import randomize_, to_numpy


def _pair(seed=0, shape=(2, 33, 40, 3)):
    rng = np.random.default_rng(seed)
    clean = np.clip(rng.normal(size=shape).cumsum(axis=2) / 6, -1, 1).astype(np.float32)
    noisy = np.clip(clean + 0.2 * rng.normal(size=shape), -1, 1).astype(np.float32)
    return noisy, clean


def test_ssim_psnr_nmse_match_scikit_image():
    noisy, clean = _pair()
    ssim = np.asarray(metrics.ssim(jnp.asarray(noisy), jnp.asarray(clean)))
    psnr = np.asarray(metrics.psnr(jnp.asarray(noisy), jnp.asarray(clean)))
    nmse = np.asarray(metrics.nmse(jnp.asarray(noisy), jnp.asarray(clean)))
    for i in range(noisy.shape[0]):
        want = structural_similarity(noisy[i], clean[i], gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, channel_axis=-1, data_range=2.0)
        np.testing.assert_allclose(ssim[i], want, rtol=1e-5)
        np.testing.assert_allclose(psnr[i], peak_signal_noise_ratio(clean[i], noisy[i], data_range=2.0), rtol=1e-5)
        np.testing.assert_allclose(nmse[i], normalized_root_mse(clean[i], noisy[i]) ** 2, rtol=1e-5)
    assert float(metrics.ssim(jnp.asarray(clean), jnp.asarray(clean))[0]) == pytest.approx(1.0, abs=1e-6)


def test_reconstruction_metrics_refuse_bad_shapes():
    noisy, clean = _pair()
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(jnp.asarray(noisy), jnp.asarray(clean[:1]))
    with pytest.raises(ValueError, match="at least 11 x 11"):
        metrics.ssim(jnp.zeros((1, 8, 32, 3)), jnp.zeros((1, 8, 32, 3)))


def test_grey64_follows_bt601_luma():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    luma = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.abs(metrics.grey64(image).astype(int) - np.floor(np.round(luma) / 4)) <= 1)
    assert metrics.grey64(np.full((1, 1, 3), 255, np.uint8))[0, 0] == 63


def _textured(seed, size=(128, 192)):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 200, size[1])[None, :, None] + rng.normal(0, 25, size=(*size, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def test_cooccurrence_and_glcm_score_match_scikit_image():
    image = _textured(2)
    grey = metrics.grey64(image)
    patch = grey[:64, 64:128]
    want = graycomatrix(patch, texture.DISTANCES, texture.ANGLES, levels=64, normed=True)
    np.testing.assert_array_equal(texture.cooccurrence(patch), want)
    expected = np.mean([shannon_entropy(graycomatrix(grey[i:i + 64, j:j + 64], texture.DISTANCES, texture.ANGLES,
                                                     levels=64, normed=True))
                        for i in (0, 64) for j in (0, 64, 128)])
    assert metrics.glcm_score(image) == pytest.approx(expected, rel=1e-12)
    flat = np.full((64, 64, 3), 90, np.uint8)
    assert metrics.glcm_score(flat) < metrics.glcm_score(image[:64, :64])
    with pytest.raises(ValueError, match="uint8 RGB"):
        metrics.glcm_score(image.astype(np.float32))


def test_compression_ratio_is_raw_over_jpeg_file_bytes(tmp_path):
    images = [_textured(3), np.full((128, 192, 3), 120, np.uint8)]
    files = []
    for i, image in enumerate(images):
        files.append(tmp_path / f"{i}.jpg")
        Image.fromarray(image).save(files[-1], quality=95)
    expected = sum(image.size for image in images) / sum(f.stat().st_size for f in files)
    assert metrics.compression_ratio(images) == pytest.approx(expected)
    assert metrics.compression_ratio(images[1:]) > metrics.compression_ratio(images[:1])


def test_frechet_distance_matches_the_scipy_sqrtm_formula_and_statistics_stream():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(250, 6)) @ rng.normal(size=(6, 6)) + 0.5
    stats = metrics.FeatureStatistics(6)
    for chunk in np.array_split(a, 7):
        stats.update(chunk)
    np.testing.assert_allclose(stats.mean, a.mean(0), rtol=1e-10)
    np.testing.assert_allclose(stats.covariance, np.cov(a, rowvar=False), rtol=1e-9, atol=1e-12)
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    want = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)
    assert metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="at least 2 samples"):
        metrics.FeatureStatistics(6).covariance


def test_feature_statistics_save_and_load(tmp_path):
    stats = metrics.FeatureStatistics(3)
    stats.update(np.arange(12.0).reshape(4, 3))
    other = metrics.FeatureStatistics(5)
    other.update(np.ones((2, 5)))
    metrics.save_statistics(tmp_path / "ref.npz", {"inception": stats, "dinov2": other})
    loaded = metrics.load_statistics(tmp_path / "ref.npz", "inception", 3)
    assert loaded.count == 4
    np.testing.assert_array_equal(loaded.covariance, stats.covariance)
    assert metrics.load_statistics(tmp_path / "ref.npz", "dinov2", 5).count == 2
    with pytest.raises(ValueError, match=r"ref.npz holds statistics for \['dinov2', 'inception'\], not 'clip'"):
        metrics.load_statistics(tmp_path / "ref.npz", "clip", 3)
    with pytest.raises(ValueError, match="the dinov2 statistics are 5-d, the network gives 7"):
        metrics.load_statistics(tmp_path / "ref.npz", "dinov2", 7)


def test_dinov2_features_are_transformers_cls_tokens(tmp_path):
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=224, patch_size=14)
    reference = transformers.Dinov2Model(config)
    randomize_(reference, seed=5, scale=0.2)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    images = np.random.default_rng(6).uniform(-1, 1, size=(2, 224, 224, 3)).astype(np.float32)
    pixels = ((images + 1) / 2 - np.array(dinov2.IMAGE_MEAN)) / np.array(dinov2.IMAGE_STD)
    with torch.no_grad():
        want = to_numpy(reference(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)).float()).pooler_output)
    got = np.asarray(metrics.dinov2_features(dinov2.load(tmp_path), jnp.asarray(images)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
