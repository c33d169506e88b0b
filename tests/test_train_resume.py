"""Process-level behaviour of `python -m sga_jax.train` with the toy config: bit-exact resume after
a SIGKILL during a checkpoint save, SIGTERM saves and exits 0, --dry_run and config errors."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = Path(__file__).resolve().parent.parent
TOTAL = 8  # 2N with N = 4
COMMON = ("--config.logging.progress_bar=False", "--config.sample_every=0", "--config.eval_every=0",
          "--config.log_every=1", "--config.checkpoint.max_to_keep=10")

# Runs the real CLI, but SIGKILLs the process right after the save of step `argv[1]` has started
# (orbax is writing it asynchronously in its temporary directory).
KILL_DURING_SAVE = """
import os, signal, sys
from sga_jax.train import checkpoint
from sga_jax.train.__main__ import main
kill_step = int(sys.argv.pop(1))
original = checkpoint.Checkpointer.save
def save(self, step, *args, **kwargs):
    original(self, step, *args, **kwargs)
    if step == kill_step:
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.Checkpointer.save = save
main()
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """The test session's environment (8 CPU devices) plus a persistent compilation cache shared
    by this module's subprocesses: a restart loads the executables the first run compiled."""
    cache = tmp_path_factory.mktemp("jax_cache")
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def cli(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "sga_jax.train", "--config", "configs/toy.py:sharded",
            "--workdir", str(workdir), *COMMON, *args]


def run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def saved_state(workdir: Path, step: int) -> list[np.ndarray]:
    """Leaves of the saved train state, read onto one device by orbax without any of our code."""
    path = workdir / "checkpoints" / str(step) / "state"
    checkpointer = ocp.StandardCheckpointer()
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one_device),
                          checkpointer.metadata(path).item_metadata)
    return [np.asarray(x) for x in jax.tree.leaves(checkpointer.restore(path, target))]


OVERRIDES = (f"--config.total_steps={TOTAL}", "--config.checkpoint_every=2")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, env) -> Path:
    """Work directory of an uninterrupted 2N-step run (one process, 8 devices)."""
    workdir = tmp_path_factory.mktemp("straight")
    done = run(cli(workdir, *OVERRIDES), env)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


def test_sigkill_during_save_then_restart_is_bit_exact(tmp_path, env, straight):
    resumed = tmp_path / "resumed"
    overrides = OVERRIDES

    killed = run([sys.executable, "-c", KILL_DURING_SAVE, "6", "--config", "configs/toy.py:sharded",
                  "--workdir", str(resumed), *COMMON, *overrides], env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    leftovers = sorted(p.name for p in (resumed / "checkpoints").iterdir())
    assert "2" in leftovers and "4" in leftovers and "6" not in leftovers
    assert any(name.startswith("6.orbax-checkpoint-tmp") for name in leftovers), leftovers
    assert max(r["step"] for r in metrics(resumed)) >= 6  # steps past the last checkpoint were logged
    with (resumed / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "loss": 0.')  # a record cut short by the kill

    again = run(cli(resumed, *overrides), env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "at step 4" in again.stderr
    assert f"finished at step {TOTAL}" in again.stdout
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["2", "4", "6", "8"]

    a, b = metrics(straight), metrics(resumed)
    assert [r["step"] for r in b] == list(range(1, TOTAL + 1))  # no step twice after the rewind
    for ra, rb in zip(a, b):
        for key in ("loss", "loss_mse", "loss_act", "grad_norm", "lr"):
            assert ra[key] == rb[key], (ra["step"], key)
    leaves_a, leaves_b = saved_state(straight, TOTAL), saved_state(resumed, TOTAL)
    assert len(leaves_a) == len(leaves_b) > 10
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)
    data = json.loads((resumed / "checkpoints" / "8" / "data" / "metadata").read_text())
    assert data == {"index": TOTAL, "seed": 0}


def test_two_processes_match_one(tmp_path, env, straight):
    """Two processes with 4 CPU devices each (jax.distributed over localhost, gloo collectives) train
    the same (data=2, fsdp=4) run as one process with 8 devices: same losses, same parameters."""
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    workdir = tmp_path / "two"
    procs = []
    for rank in range(2):
        rank_env = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                    "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
                    "JAX_PROCESS_ID": str(rank)}
        procs.append(subprocess.Popen(cli(workdir, *OVERRIDES), cwd=ROOT, env=rank_env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-3000:]
        assert f"finished at step {TOTAL}" in stdout
    a, b = metrics(straight), metrics(workdir)
    assert [r["step"] for r in b] == list(range(1, TOTAL + 1))  # process 0 alone writes metrics
    for ra, rb in zip(a, b):
        np.testing.assert_allclose(rb["loss"], ra["loss"], rtol=1e-6, err_msg=str(ra["step"]))
    for x, y in zip(saved_state(straight, TOTAL), saved_state(workdir, TOTAL)):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path, env):
    cmd = cli(tmp_path, "--config.total_steps=1000000", "--config.checkpoint_every=0")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ((tmp_path / "metrics.jsonl").exists() and len(metrics(tmp_path)) >= 3):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no metrics within 240 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir()]
    assert len(steps) == 1 and steps[0] >= 3
    assert f"stopped by signal at step {steps[0]}" in stdout
    meta = json.loads((tmp_path / "checkpoints" / str(steps[0]) / "meta" / "metadata").read_text())
    assert meta["preempted"] is True and meta["step"] == steps[0]


def test_dry_run_prints_memory_without_training(tmp_path, env):
    out = run(cli(tmp_path / "w", "--dry_run"), env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2,488 trainable parameters" in out.stdout  # 144 in + 2 x 1104 blocks + 136 out
    assert "mesh {'data': 2, 'fsdp': 4, 'tensor': 1}" in out.stdout
    for part in ("params", "optimizer", "ema", "frozen", "total"):
        assert part in out.stdout
    assert "python -m sga_jax.plan --config configs/toy.py:sharded --target" in out.stdout
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.batch_size=12", "config.batch_size=12: expected a multiple of 8"),
        ("--config.optimizer.ema_decay=1.5", "config.optimizer.ema_decay=1.5: expected in [0, 1)"),
    ],
)
def test_bad_config_fails_before_compiling(tmp_path, env, override, message):
    out = run(cli(tmp_path / "w", "--dry_run", override), env)
    assert out.returncode == 2
    assert message in out.stderr
