"""The loss-geometry toolkit (sga_jax.align.geometry) against SciPy / float64 NumPy, the paper's
Propositions 1-3 as hypothesis property tests, and the `python -m sga_jax.geometry` report."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from sga_jax.align import geometry as geo
from sga_jax.geometry.__main__ import main as geometry_main

PROPERTY = settings(max_examples=20, deadline=None)
# A few shapes only, so that jax compiles each op a handful of times: (N, C)
SHAPES = st.sampled_from([(4, 2), (9, 3), (16, 5), (6, 8), (12, 12)])


def _unit_rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _pair(shape: tuple[int, int], seed: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y) float32: unrelated, a perturbed copy, or a rotated copy of Y (with per-row scales)."""
    rng = np.random.default_rng(seed)
    n, c = shape
    y = rng.normal(size=(n, c)) * rng.uniform(0.2, 3.0, size=(n, 1))
    if kind == "random":
        x = rng.normal(size=(n, c))
    elif kind == "perturbed":
        x = y + 10 ** rng.uniform(-3, 0) * rng.normal(size=(n, c))
    else:
        x = y @ scipy.stats.ortho_group.rvs(c, random_state=seed) if c > 1 else -y
    return x.astype(np.float32), y.astype(np.float32)


def _np_sga(x: np.ndarray, y: np.ndarray) -> float:
    xn, yn = _unit_rows(x), _unit_rows(y)
    return float(np.sum((xn @ xn.T - yn @ yn.T) ** 2) / x.shape[0] ** 2)


def _np_top_eigvecs(a: np.ndarray, k: int) -> np.ndarray:
    an = _unit_rows(a)
    _, vecs = np.linalg.eigh(an @ an.T)
    return vecs[:, ::-1][:, :k]


# ----------------------------------------------------------------------------- toolkit vs references


@pytest.mark.parametrize("cx, cy", [(5, 5), (7, 4)])
def test_procrustes_matches_scipy(cx, cy):
    rng = np.random.default_rng(cx + cy)
    x = rng.normal(size=(20, cx)).astype(np.float32)
    y = rng.normal(size=(20, cy)).astype(np.float32)
    y_padded = np.pad(y, ((0, 0), (0, cx - cy))).astype(np.float64)  # extends Q to a square orthogonal matrix
    r, _ = scipy.linalg.orthogonal_procrustes(y_padded, x.astype(np.float64))
    q, dist = geo.procrustes(x, y)
    np.testing.assert_allclose(dist, np.linalg.norm(y_padded @ r - x), rtol=1e-5)
    np.testing.assert_allclose(q, r[:cy], atol=1e-4)
    np.testing.assert_allclose(np.asarray(q) @ np.asarray(q).T, np.eye(cy), atol=1e-5)
    np.testing.assert_allclose(geo.orbit_distance(x, y), dist, rtol=1e-6)


def test_procrustes_rejects_wider_y():
    with pytest.raises(ValueError, match=r"\(6, 2\).*\(6, 3\)"):
        geo.procrustes(np.ones((6, 2), np.float32), np.ones((6, 3), np.float32))


def test_gram_spectra_match_numpy_eigvalsh():
    x, y = _pair((10, 3), 0, "random")
    y = np.concatenate([y, y[:, :2]], axis=1)  # a different, rank-deficient width
    lam_x, lam_y = geo.gram_spectra(x, y)
    assert lam_x.shape == lam_y.shape == (5,)
    for ours, a in ((lam_x, x), (lam_y, y)):
        an = _unit_rows(a)
        reference = np.sort(np.linalg.eigvalsh(an @ an.T))[::-1][:5]
        np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_principal_angles_match_scipy():
    x, y = _pair((14, 6), 3, "perturbed")
    for k in (1, 3):
        reference = np.sort(scipy.linalg.subspace_angles(_np_top_eigvecs(x, k), _np_top_eigvecs(y, k)))
        np.testing.assert_allclose(geo.principal_angles(x, y, k), reference, atol=2e-3)


def test_subspace_bound_matches_float64_formula():
    x, y = _pair((12, 4), 5, "perturbed")
    k = 2
    sin_theta, bound = geo.subspace_bound(x, y, k)
    xn, yn = _unit_rows(x), _unit_rows(y)
    e = xn @ xn.T - yn @ yn.T
    lam = np.sort(np.linalg.eigvalsh(yn @ yn.T))[::-1]
    expected = 2 * min(np.sqrt(k) * np.abs(np.linalg.eigvalsh(e)).max(), np.linalg.norm(e)) / (lam[k - 1] - lam[k])
    angles = scipy.linalg.subspace_angles(_np_top_eigvecs(x, k), _np_top_eigvecs(y, k))
    np.testing.assert_allclose(bound, expected, rtol=1e-4)
    np.testing.assert_allclose(sin_theta, np.linalg.norm(np.sin(angles)), atol=2e-3)


def test_containment_values_match_float64():
    x, y = _pair((9, 3), 2, "random")
    l_sga, four_repa = geo.containment(x, y)
    np.testing.assert_allclose(l_sga, _np_sga(x, y), rtol=1e-5)
    np.testing.assert_allclose(four_repa, 4 * np.sum((_unit_rows(x) - _unit_rows(y)) ** 2) / 9, rtol=1e-5)


def test_drift_quantities_match_float64():
    """The probe's building blocks: coordinate drift, Gram distance and the top-k spectrum gap."""
    x, y = _pair((12, 5), 4, "perturbed")
    np.testing.assert_allclose(geo.coordinate_drift(x, y), np.linalg.norm(x.astype(np.float64) - y) / np.linalg.norm(
        y.astype(np.float64)), rtol=1e-5)
    np.testing.assert_allclose(geo.gram_distance(x, y), np.sqrt(_np_sga(x, y)), rtol=1e-5)
    assert float(geo.gram_distance(x, x)) == 0.0
    xn, yn = _unit_rows(x), _unit_rows(y)
    for k in (1, 3, 12):
        lam_x = np.sort(np.linalg.eigvalsh(xn @ xn.T))[::-1][:k]
        lam_y = np.sort(np.linalg.eigvalsh(yn @ yn.T))[::-1][:k]
        np.testing.assert_allclose(geo.eigenvalue_gap(x, y, k), np.linalg.norm(lam_x - lam_y) / 12, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match=r"k must be in \[1, N\] = \[1, 12\]"):
        geo.eigenvalue_gap(x, y, 13)
    with pytest.raises(ValueError, match=r"equal shapes: x \(12, 5\) vs x0 \(12, 4\)"):
        geo.coordinate_drift(x, y[:, :4])


def test_geometry_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(3,\)"):
        geo.gram_spectra(np.ones(3, np.float32), np.ones((3, 2), np.float32))
    with pytest.raises(ValueError, match=r"\(4, 2\).*\(5, 2\)"):
        geo.containment(np.ones((4, 2), np.float32), np.ones((5, 2), np.float32))
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        geo.top_eigenspace(np.ones((4, 2), np.float32), 3)


# ----------------------------------------------------------------------------- Propositions 1-3


@PROPERTY
@given(shape=SHAPES, seed=st.integers(0, 10_000), kind=st.sampled_from(["random", "perturbed"]))
def test_prop1_gauge_invariance(shape, seed, kind):
    x, y = _pair(shape, seed, kind)
    q = scipy.stats.ortho_group.rvs(shape[1], random_state=seed + 1) if shape[1] > 1 else -np.eye(1)
    gap = float(geo.gauge_invariance_gap(x, y, q.astype(np.float32)))
    assert gap <= 2e-6 * max(1.0, _np_sga(x, y)), gap


@PROPERTY
@given(
    shape=SHAPES,
    seed=st.integers(0, 10_000),
    kind=st.sampled_from(["random", "perturbed", "rotated"]),
    k_fraction=st.floats(0.0, 1.0),
)
def test_prop2_spectral_and_subspace_bounds(shape, seed, kind, k_fraction):
    x, y = _pair(shape, seed, kind)
    spec, frob = geo.spectral_bound(x, y)
    assert float(spec) <= float(frob) * (1 + 1e-4) + 1e-5
    top_k = 1 + int(k_fraction * (shape[0] - 1))  # the probe's top-k part of the same gap, per token
    assert float(geo.eigenvalue_gap(x, y, top_k)) <= float(frob) / shape[0] * (1 + 1e-4) + 1e-6
    k = 1 + int(k_fraction * (min(shape) - 2))  # 1 .. min(N, C) - 1
    sin_theta, bound = geo.subspace_bound(x, y, k)
    assert float(sin_theta) <= float(bound) * (1 + 1e-4) + 1e-3, (k, float(sin_theta), float(bound))


@PROPERTY
@given(shape=SHAPES, seed=st.integers(0, 10_000), kind=st.sampled_from(["random", "perturbed", "rotated"]))
def test_prop3_containment_bound(shape, seed, kind):
    x, y = _pair(shape, seed, kind)
    l_sga, four_repa = geo.containment(x, y)
    assert float(l_sga) <= float(four_repa) * (1 + 1e-5) + 1e-6
    to_repa, to_sga = geo.zero_set_distances(x, y)
    assert float(to_sga) <= float(to_repa) + 1e-4


@PROPERTY
@given(shape=SHAPES, seed=st.integers(0, 10_000))
def test_prop3_zero_sets(shape, seed):
    """The orbit {Y Q} is SGA's zero set; REPA is zero only at Y, and 4 at the antipode -Y."""
    x, y = _pair(shape, seed, "rotated")
    l_sga, four_repa = geo.containment(x, y)
    _, to_sga = geo.zero_set_distances(x, y)
    assert float(l_sga) <= 1e-5 and float(to_sga) <= 1e-5 * np.sqrt(shape[0])
    l_sga, four_repa = geo.containment(-y, y)
    assert float(l_sga) <= 1e-5
    np.testing.assert_allclose(four_repa, 16.0, rtol=1e-5)
    l_sga, four_repa = geo.containment(y, y)
    assert float(l_sga) <= 1e-6 and float(four_repa) <= 1e-5


# ----------------------------------------------------------------------------- report CLI


def test_geometry_cli_writes_report(tmp_path):
    assert geometry_main(["--out", str(tmp_path), "--grid", "5", "--channels", "6", "--steps", "20", "--pairs", "4"]) == 0
    report = (tmp_path / "report.md").read_text()
    for heading in ("Proposition 1", "Proposition 2", "Proposition 3", "How far each loss"):
        assert heading in report
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["prop1_gauge.png", "prop2_bounds.png", "prop3_containment.png", "prop3_displacement.png"]
    for name in pngs:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in report


def test_geometry_cli_rejects_odd_channels(tmp_path, capsys):
    assert geometry_main(["--out", str(tmp_path), "--channels", "7"]) == 2
    assert capsys.readouterr().err == "error: need --grid >= 3 and an even --channels >= 6, got 16 and 7\n"
    assert not (tmp_path / "report.md").exists()
