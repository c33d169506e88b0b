"""The persistent compilation cache of training: on by default in WORKDIR/compilation_cache, off
by a config switch, JAX's settings restored after the run, and a cache warmed by the planner that
the training run then loads its train step from (toy task, 8 simulated CPU devices)."""

import sys
from pathlib import Path

import jax
import pytest

from sga_jax import plan as plan_lib
from sga_jax.train import compile_cache, loop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "configs"))
import toy  # noqa: E402


def _config(steps: int = 2):
    config = toy.get_config("sharded")
    config.total_steps, config.checkpoint_every = steps, steps
    config.sample_every = config.eval_every = 0
    config.logging.progress_bar = False
    return config


def _steps(directory: Path) -> set[str]:
    return {p.name for p in directory.glob("jit_train_step-*")}


def test_directory_follows_the_config(tmp_path, monkeypatch):
    config = _config()
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    assert compile_cache.cache_directory(config, tmp_path) == tmp_path.absolute() / "compilation_cache"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
    assert compile_cache.cache_directory(config, tmp_path) == tmp_path / "env"
    config.compilation_cache.directory = str(tmp_path / "shared")
    assert compile_cache.cache_directory(config, tmp_path) == tmp_path / "shared"
    config.compilation_cache.enabled = False
    assert compile_cache.cache_directory(config, tmp_path) is None


def test_training_caches_its_step_by_default_and_not_when_switched_off(tmp_path, monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    before = {name: getattr(jax.config, name) for name in compile_cache._SETTINGS}
    loop.train(_config(), tmp_path / "on")
    assert len(_steps(tmp_path / "on" / "compilation_cache")) == 1
    assert {name: getattr(jax.config, name) for name in compile_cache._SETTINGS} == before

    off = _config()
    off.compilation_cache.enabled = False
    loop.train(off, tmp_path / "off")
    assert not (tmp_path / "off" / "compilation_cache").exists()


@pytest.mark.slow
def test_a_cache_warmed_by_the_planner_serves_the_training_step(tmp_path, monkeypatch):
    """`python -m sga_jax.plan --warm_cache` compiles the step on this machine's devices into the
    run's cache; the training run that follows finds it there and writes no step of its own."""
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    config = _config()
    directory = compile_cache.cache_directory(config, tmp_path)
    with compile_cache.persistent_cache(directory):
        plan_lib.plan(config, plan_lib.get_target("local"), plan_lib.choose_buckets(config, [], True), suggest=False)
    warmed = _steps(directory)
    assert len(warmed) == 1
    hits = []

    def listen(event, **_):
        hits.append(event)

    jax.monitoring.register_event_listener(listen)
    try:
        loop.train(config, tmp_path)
    finally:
        jax.monitoring.unregister_event_listener(listen)
    assert _steps(directory) == warmed
    assert "/jax/compilation_cache/cache_hits" in hits
