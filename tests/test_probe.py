"""The feature-drift probe (sga_jax.stages.probe): every number against float64 NumPy, zero drift at
the start, a channel rotation moving coordinates but not the orbit, its files and resume; on stage 2
through the engine: no parameter and no gradient added, a resumed run continuing the straight run's
curves exactly; and the compare report (python -m sga_jax.geometry compare)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.stats
from flax import nnx

from demo_fixtures import IMAGE
from sga_jax.geometry.__main__ import main as geometry_main
from sga_jax.stages import probe
from sga_jax.train import loop
from sga_jax.train.checkpoint import Checkpointer
from sga_jax.train.config import base_config
from sga_jax.train import state as state_lib

# ----------------------------------------------------------------------------- the numbers


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _top_eigvecs(gram: np.ndarray, k: int) -> np.ndarray:
    _, vecs = np.linalg.eigh(gram)
    return vecs[:, ::-1][:, :k]


def _numpy_metrics(f, o, f0, o0, prior, k):
    """Every probe number in float64 NumPy: Procrustes by SVD, Grams, eigh spectra, subspace angles."""
    f, o, f0, o0, prior = (np.asarray(a, np.float64) for a in (f, o, f0, o0, prior))
    b, h, w, c = f.shape
    gh, gw = prior.shape[1:3]
    x, x0 = f.reshape(-1, c), f0.reshape(-1, c)
    xn, x0n = _unit(x), _unit(x0)
    u, _, vt = np.linalg.svd(x0n.T @ xn)
    rows = np.sqrt(x.shape[0])

    def pool(a):  # the grids divide evenly here: block means
        return a.reshape(b, gh, h // gh, gw, w // gw, a.shape[-1]).mean(axis=(2, 4)).reshape(b, gh * gw, -1)

    def gram(a):
        an = _unit(a)
        return an @ an.T

    p, p0, y = pool(f), pool(f0), prior.reshape(b, gh * gw, -1)
    n = gh * gw
    structure, prior_gram, gap, angle, angle0 = [], [], [], [], []
    for i in range(b):
        gp, gp0, gy = gram(p[i]), gram(p0[i]), gram(y[i])
        structure.append(np.linalg.norm(gp - gp0) / n)
        prior_gram.append(np.linalg.norm(gp - gy) / n)
        lam_p, lam_y = np.linalg.eigvalsh(gp)[::-1][:k], np.linalg.eigvalsh(gy)[::-1][:k]
        gap.append(np.linalg.norm(lam_p - lam_y) / n)
        angle.append(np.degrees(scipy.linalg.subspace_angles(_top_eigvecs(gp, k), _top_eigvecs(gy, k)).max()))
        angle0.append(np.degrees(scipy.linalg.subspace_angles(_top_eigvecs(gp, k), _top_eigvecs(gp0, k)).max()))
    mse = ((o - o0) ** 2).reshape(b, -1).mean(axis=1)
    return {
        "drift_coord": np.linalg.norm(x - x0) / np.linalg.norm(x0),
        "drift_unit": np.linalg.norm(xn - x0n) / rows,
        "drift_orbit": np.linalg.norm(xn - x0n @ (u @ vt)) / rows,
        "drift_structure": np.mean(structure),
        "drift_angle": np.mean(angle0),
        "prior_gram": np.mean(prior_gram),
        "prior_eig_gap": np.mean(gap),
        "prior_angle": np.mean(angle),
        "drift_output": np.linalg.norm(o - o0) / np.linalg.norm(o0),
        "output_psnr": np.mean(10 * np.log10(4.0 / mse)),
    }


def _features(seed: int, b=2, h=4, w=6, c=5, cf=7, grid=(2, 3)):
    rng = np.random.default_rng(seed)
    f0 = rng.normal(size=(b, h, w, c)) + rng.normal(size=(1, 1, 1, c))
    f = f0 @ scipy.stats.ortho_group.rvs(c, random_state=seed) * 0.8 + 0.3 * rng.normal(size=f0.shape)
    prior = rng.normal(size=(b, *grid, cf))
    o0 = rng.uniform(-1, 1, size=(b, 8, 8, 3))
    o = np.clip(o0 + 0.05 * rng.normal(size=o0.shape), -1, 1)
    return [a.astype(np.float32) for a in (f, o, f0, o0, prior)]


@pytest.mark.parametrize("seed", [0, 1])
def test_drift_metrics_match_float64_numpy(seed):
    arrays = _features(seed)
    got = probe.drift_metrics(*arrays, k=3, image_output=True)
    want = _numpy_metrics(*arrays, k=3)
    assert set(got) == set(want) == set(probe.METRICS) | set(probe.IMAGE_METRICS)
    for name, value in want.items():
        tol = 2e-3 if "angle" in name else 1e-4  # degrees; float32 subspaces
        np.testing.assert_allclose(float(got[name]), value, rtol=tol, atol=tol, err_msg=name)
    assert float(got["prior_eig_gap"]) <= float(got["prior_gram"]) + 1e-6  # Prop. 2(i)
    assert float(got["drift_orbit"]) <= float(got["drift_unit"]) + 1e-6  # Q = I is one candidate


# ----------------------------------------------------------------------------- the probe on a small model


class Rotatable(nnx.Module):
    """Features X = inputs @ W + b on a 4 x 6 grid (full rank: the top-k spatial subspaces are
    well defined); the output is a function of |X| per token."""

    def __init__(self, cin: int, c: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(cin, c, rngs=rngs)

    def __call__(self, x):
        return self.linear(x)


def _taps():
    def examples(rng):
        return {"x": np.asarray(jax.random.normal(rng, (2, 4, 6, 8))), "caption": np.asarray(["a", "bb"])}

    def prepare(frozen, ex):
        pooled = ex["x"].reshape(2, 2, 2, 3, 2, 8).mean(axis=(2, 4))
        return {"x": ex["x"]}, frozen(pooled)

    def tap(trainable, inputs):
        features = trainable(inputs["x"])
        return features, jnp.tanh(jnp.sum(features**2, axis=-1, keepdims=True))

    return probe.Taps(examples=examples, prepare=prepare, tap=tap)


def _rotate(module: Rotatable, q: np.ndarray) -> None:
    module.linear.kernel.value = module.linear.kernel.value @ q
    module.linear.bias.value = module.linear.bias.value @ q


def test_probe_zero_at_start_rotation_moves_coordinates_not_the_orbit_and_resume_reads_the_files(tmp_path):
    config = probe.default_config()
    config.top_k = 4
    model, prior = Rotatable(8, 6, rngs=nnx.Rngs(0)), Rotatable(8, 5, rngs=nnx.Rngs(1))
    first = probe.FeatureProbe(config, _taps())
    at_start = first.start(model, prior, 0, tmp_path, jax.random.key(7))
    assert at_start["drift_coord"] == at_start["drift_output"] == 0.0  # X_t - X_0 is exactly zero
    for name in ("drift_unit", "drift_orbit", "drift_structure"):  # rows normalised apart: float32 rounding
        assert at_start[name] < 1e-6, name
    assert at_start["drift_angle"] < 0.1
    assert at_start["prior_gram"] > 0.05 and at_start["prior_angle"] > 1.0
    assert first.measure(model) == at_start

    batch = np.load(tmp_path / "probe" / "batch.npz", allow_pickle=False)
    assert sorted(batch.files) == ["caption", "x"] and list(batch["caption"]) == ["a", "bb"]
    reference = np.load(tmp_path / "probe" / "reference.npz", allow_pickle=False)
    assert reference["features"].shape == (2, 4, 6, 6) and reference["output"].shape == (2, 4, 6, 1)

    _rotate(model, scipy.stats.ortho_group.rvs(6, random_state=3).astype(np.float32))
    rotated = first.measure(model)
    assert rotated["drift_coord"] > 0.3 and rotated["drift_unit"] > 0.3
    assert rotated["drift_orbit"] < 1e-5 and rotated["drift_structure"] < 1e-5 and rotated["drift_angle"] < 0.1
    assert rotated["drift_output"] < 1e-5  # the output depends on |X| only
    for name in ("prior_gram", "prior_eig_gap", "prior_angle"):
        assert rotated[name] == pytest.approx(at_start[name], rel=1e-4, abs=1e-3), name

    resumed = probe.FeatureProbe(config, _taps())  # a restart: the files, not a new draw (other key)
    assert resumed.start(model, prior, 5, tmp_path, jax.random.key(99)) is None
    assert resumed.measure(model) == rotated


def test_probe_without_files_on_resume_stays_off_and_bad_reference_names_the_key(tmp_path, caplog):
    config = probe.default_config()
    model, prior = Rotatable(8, 6, rngs=nnx.Rngs(0)), Rotatable(8, 5, rngs=nnx.Rngs(1))
    late = probe.FeatureProbe(config, _taps())
    assert late.start(model, prior, 10, tmp_path, jax.random.key(0)) is None
    assert late.measure(model) == {} and "no drift is measured" in caplog.text
    probe.FeatureProbe(config, _taps()).start(model, prior, 0, tmp_path, jax.random.key(0))
    path = tmp_path / "probe" / "reference.npz"
    np.savez(path, features=np.zeros((2, 4, 6, 3), np.float32), output=np.zeros((2, 4, 6, 1), np.float32))
    with pytest.raises(ValueError, match=r"reference.npz: 'features' has shape \(2, 4, 6, 3\), expected \(2, 4, 6, 6\)"):
        probe.FeatureProbe(config, _taps()).start(model, prior, 10, tmp_path, jax.random.key(0))


def test_probe_config_is_checked():
    config = base_config()
    assert not probe.is_enabled(config)  # no section
    config.probe = probe.default_config()
    assert not probe.is_enabled(config)  # eval_every 0
    config.eval_every = 5
    assert probe.is_enabled(config)
    config.probe.top_k = 0
    with pytest.raises(ValueError, match=r"config.probe.top_k=0: expected a positive integer"):
        probe.is_enabled(config)


# ----------------------------------------------------------------------------- stage 2 through the engine

STAGE = {"total_steps": 4, "checkpoint_every": 2, "eval_every": 2, "sample_every": 0, "log_every": 1,
         "logging.progress_bar": False, "probe.top_k": 3}


def _stage(demo_config, arg=None, **overrides):
    """The test-size demo config for short probed runs (every 2 steps, 4 steps, checkpoints at 2 and 4)."""
    return demo_config(arg, **{**STAGE, **overrides})


def _run(config):
    return loop.build_run(config, jax.devices()[:1])


def _params(config, workdir, step):
    run = _run(config)
    target = state_lib.with_shardings(run.setup.abstract_state, run.setup.state_shardings)
    state, _, _, _ = Checkpointer(workdir / "checkpoints").restore(step, target)
    return jax.device_get(state.params)


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _evals(workdir):
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("eval_")} for r in _records(workdir)
            if any(k.startswith("eval_") for k in r)}


@pytest.fixture(scope="module")
def stage_runs(demo_config, tmp_path_factory):
    """Work directories: probe on for 4 steps straight; probe on, stopped at step 2 and resumed to 4
    (the second half reuses the straight run's compiled step and probe); probe off for 2 steps."""
    root = tmp_path_factory.mktemp("runs")
    off, straight, resumed = root / "off", root / "straight", root / "resumed"
    config = _stage(demo_config)
    run = _run(config)
    loop.train(config, straight, run=run)
    half = _stage(demo_config, total_steps=2)
    loop.train(half, resumed, run=_run(half))
    batch_file = resumed / "probe" / "batch.npz"
    first_bytes, first_mtime = batch_file.read_bytes(), batch_file.stat().st_mtime_ns
    loop.train(config, resumed, run=run)
    assert batch_file.read_bytes() == first_bytes and batch_file.stat().st_mtime_ns == first_mtime
    off_config = _stage(demo_config, total_steps=2, **{"probe.enabled": False})
    loop.train(off_config, off, run=_run(off_config))
    return {"off": off, "straight": straight, "resumed": resumed, "config": config, "off_config": off_config}


def test_stage2_probe_logs_zero_drift_at_step_0_then_curves(stage_runs):
    evals = _evals(stage_runs["straight"])
    assert sorted(evals) == [0, 2, 4]
    start = evals[0]
    assert set(start) == {f"eval_{name}" for name in probe.METRICS}
    assert start["eval_drift_coord"] == start["eval_drift_output"] == 0.0
    for name in ("drift_unit", "drift_orbit", "drift_structure"):
        assert start[f"eval_{name}"] < 1e-6, name
    assert start["eval_drift_angle"] < 0.1 and start["eval_prior_gram"] > 0
    assert evals[4]["eval_drift_coord"] > 0 and evals[4]["eval_drift_output"] > 0
    examples = np.load(stage_runs["straight"] / "probe" / "batch.npz", allow_pickle=False)
    assert examples["image"].shape == (2, IMAGE, IMAGE, 3) and examples["noise"].shape == (2, 8, 8, 16)
    assert examples["caption"].dtype.kind == "U" and {"t", "t5_ids", "clip_ids"} <= set(examples.files)
    reference = np.load(stage_runs["straight"] / "probe" / "reference.npz", allow_pickle=False)
    assert reference["features"].shape == (2, 4, 4, 64) and reference["output"].shape == (2, 16, 64)


def test_stage2_resumed_run_continues_the_curves_exactly(stage_runs):
    straight, resumed = _records(stage_runs["straight"]), _records(stage_runs["resumed"])
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == [0, 1, 2, 3, 4]
    assert _evals(stage_runs["resumed"]) == _evals(stage_runs["straight"])
    for a, b in zip(straight[1:], resumed[1:]):
        assert a["loss"] == b["loss"], a["step"]
    for name in ("batch.npz", "reference.npz"):
        a = np.load(stage_runs["straight"] / "probe" / name, allow_pickle=False)
        b = np.load(stage_runs["resumed"] / "probe" / name, allow_pickle=False)
        assert a.files == b.files
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}:{key}")


def test_stage2_probe_adds_no_parameter_and_no_gradient(stage_runs):
    on, off = _run(stage_runs["config"]), _run(stage_runs["off_config"])
    assert jax.tree.structure(on.setup.abstract_state) == jax.tree.structure(off.setup.abstract_state)
    assert jax.tree.leaves(on.setup.abstract_state) == jax.tree.leaves(off.setup.abstract_state)
    assert not any(k.startswith("eval_") for r in _records(stage_runs["off"]) for k in r)
    assert not (stage_runs["off"] / "probe").exists()
    a, b = _params(stage_runs["off_config"], stage_runs["off"], 2), _params(stage_runs["config"], stage_runs["straight"], 2)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    losses = [[r["loss"] for r in _records(stage_runs[name]) if "loss" in r][:2] for name in ("off", "straight")]
    assert losses[0] == losses[1]


def test_vanilla_run_probes_with_the_prior_built_for_it(demo_config):
    on = _run(_stage(demo_config, "dinov2,vanilla,wlf,layer=1"))
    off = _run(_stage(demo_config, "dinov2,vanilla,wlf,layer=1", **{"probe.enabled": False}))
    assert on.setup.abstract_frozen.module.get("prior") is not None and off.setup.abstract_frozen.module.get("prior") is None
    assert jax.tree.leaves(on.setup.abstract_state) == jax.tree.leaves(off.setup.abstract_state)
    with pytest.raises(ValueError, match=r"config.align.block=5: Flux has 2 double blocks"):
        _run(_stage(demo_config, "dinov2,vanilla,wlf,layer=5"))


# ----------------------------------------------------------------------------- the compare report


def test_compare_report_of_two_runs(stage_runs, tmp_path, capsys):
    assert geometry_main(["compare", str(stage_runs["straight"]), str(stage_runs["resumed"]), "--out", str(tmp_path),
                          "--note", "tiny random networks"]) == 0
    assert "wrote" in capsys.readouterr().out
    report = (tmp_path / "report.md").read_text()
    assert (tmp_path / "drift.png").is_file() and (tmp_path / "prior.png").is_file()
    assert "**tiny random networks**" in report and "random weights" in report
    final = _evals(stage_runs["straight"])[4]
    finals = report.split("## Final values")[1].split("##")[0]
    row = next(line for line in finals.splitlines() if line.startswith("| straight (sga, layer 1, weight 0.5) | 4 |"))
    assert f"| {final['eval_drift_coord']:.4g} | {final['eval_drift_orbit']:.4g} | {final['eval_drift_structure']:.4g} |" in row
    for name in probe.METRICS:
        assert f"`{name}`" in report


def test_compare_refuses_a_run_without_probe_records(stage_runs, tmp_path, capsys):
    assert geometry_main(["compare", str(stage_runs["off"]), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "metrics.jsonl has no probe records" in err
    assert geometry_main(["compare", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err
