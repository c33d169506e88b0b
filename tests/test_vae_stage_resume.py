"""A stage-1 run killed (SIGKILL during a checkpoint save) and restarted is bitwise equal to the
straight run: both VAE halves, the SGA head, the discriminator and both players' optimizer states."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from test_train_resume import KILL_DURING_SAVE

ROOT = Path(__file__).resolve().parent.parent
TOTAL = 4
FLAGS = ("--config.data.buckets.fixed=32x32", "--config.eval.size=32", "--config.align.long_edge=2",
         "--config.batch_size=2", "--config.model.disc.ndf=8", "--config.loss.gan.start=1",
         f"--config.total_steps={TOTAL}", "--config.checkpoint_every=1", "--config.sample_every=0",
         "--config.eval_every=0", "--config.log_every=1", "--config.logging.progress_bar=False",
         "--config.checkpoint.max_to_keep=10")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """One process per run (one CPU device), a shared compilation cache and demo assets."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
            "SGA_DEMO_ASSETS": str(tmp_path_factory.mktemp("assets"))}


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000)


def _saved_state(workdir: Path, step: int) -> dict[str, np.ndarray]:
    path = workdir / "checkpoints" / str(step) / "state"
    checkpointer = ocp.StandardCheckpointer()
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one_device),
                          checkpointer.metadata(path).item_metadata)
    restored = checkpointer.restore(path, target)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(restored)}


def test_killed_and_resumed_run_is_bitwise_the_straight_run(tmp_path, env):
    train = [sys.executable, "-m", "sga_jax.train", "--config", "configs/demo_vae.py"]
    straight = _run(train + ["--workdir", str(tmp_path / "straight"), *FLAGS], env)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _run([sys.executable, "-c", KILL_DURING_SAVE, "3", "--config", "configs/demo_vae.py",
                   "--workdir", str(tmp_path / "resumed"), *FLAGS], env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "3" not in [p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()]
    again = _run(train + ["--workdir", str(tmp_path / "resumed"), *FLAGS], env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "at step 2" in again.stderr

    a, b = _saved_state(tmp_path / "straight", TOTAL), _saved_state(tmp_path / "resumed", TOTAL)
    assert a.keys() == b.keys()
    for part in ("params']['disc", "params']['head", "params']['ae']['encoder", "params']['ae']['decoder", "opt_state"):
        assert any(part in key for key in a), part
    assert any("disc" in key and "opt_state" in key for key in a)  # the discriminator's own AdamW moments
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    disc_kernel = "['params']['disc']['conv_in']['kernel']"
    assert not np.array_equal(a[disc_kernel], _saved_state(tmp_path / "straight", 1)[disc_kernel])  # D trained
