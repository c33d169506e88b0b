"""Flow-matching objectives against PyWavelets' Haar transform and direct NumPy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import pywt

from sga_jax.stages.flux import flow_matching as fm


def test_haar_dwt_equals_pywavelets():
    x = np.random.default_rng(0).normal(size=(2, 6, 8, 3))
    ours = [np.asarray(b) for b in fm.haar_dwt(jnp.asarray(x, jnp.float32))]
    for b in range(2):
        for c in range(3):
            ll, (lh, hl, hh) = pywt.dwt2(x[b, :, :, c], "haar")
            for got, want in zip(ours, (ll, lh, hl, hh)):
                np.testing.assert_allclose(got[b, :, :, c], want, rtol=1e-5, atol=1e-5)


def test_wavelet_loss_equal_weights_is_x0_mse_and_unequal_is_not():
    rng = np.random.default_rng(1)
    pred, target = (jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32) for _ in range(2))
    mse = np.mean((np.asarray(pred) - np.asarray(target)) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(fm.wavelet_loss(pred, target, (1, 1, 1, 1)), mse, rtol=1e-6)
    np.testing.assert_allclose(fm.velocity_mse(pred, target), mse, rtol=1e-6)
    weighted = np.asarray(fm.wavelet_loss(pred, target, (1.0, 2.0, 2.0, 4.0)))
    assert np.all(np.abs(weighted - mse) > 0.1 * mse)
    ll, (lh, hl, hh) = pywt.dwt2(np.asarray(pred - target, np.float64), "haar", axes=(1, 2))
    per_example = [np.sum(ll[i] ** 2) + 2 * np.sum(lh[i] ** 2) + 2 * np.sum(hl[i] ** 2) + 4 * np.sum(hh[i] ** 2)
                   for i in range(pred.shape[0])]
    np.testing.assert_allclose(weighted, np.asarray(per_example) / (pred.size // pred.shape[0]), rtol=1e-5)


def test_noisy_sample_and_x0_recovery():
    rng = np.random.default_rng(2)
    x0, eps = rng.normal(size=(3, 4, 5)), rng.normal(size=(3, 4, 5))
    t = np.array([0.1, 0.5, 0.9])
    x_t, v = fm.noisy_sample(jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(t))
    np.testing.assert_allclose(x_t, (1 - t[:, None, None]) * x0 + t[:, None, None] * eps, rtol=1e-6)
    np.testing.assert_allclose(v, eps - x0, rtol=1e-6)
    np.testing.assert_allclose(fm.predicted_x0(x_t, v, jnp.asarray(t)), x0, rtol=1e-5, atol=1e-6)


def test_timestep_sampling_ranges_and_errors():
    t = fm.sample_timesteps(jax.random.key(0), 4096, kind="logit_normal", mean=0.0, std=1.0)
    assert 0.0 < float(t.min()) and float(t.max()) < 1.0
    assert abs(float(jnp.median(t)) - 0.5) < 0.03
    with pytest.raises(ValueError, match="logit_normal"):
        fm.sample_timesteps(jax.random.key(0), 2, kind="cosine")
    shifted = fm.shift_timesteps(jnp.asarray([0.5]), jnp.log(3.0))
    assert float(shifted[0]) == pytest.approx(0.75)
