"""The training loop in-process on 8 simulated CPU devices: metrics.jsonl and TensorBoard events
read back, sample/eval hooks, NaN skips mid-run, divergence stop, schedules."""

import json
import math
import struct
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from sga_jax.train import loop, state as state_lib
from sga_jax.train.checkpoint import Checkpointer
from sga_jax.train.optim import make_schedule
from sga_jax.train.toy import ToyTask

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "configs"))
import toy  # noqa: E402


def read_events(directory: Path) -> dict[str, dict[int, float]]:
    """Scalars of every TensorBoard event file under `directory`: {tag: {step: value}}.

    TFRecord framing: uint64 length, uint32 masked CRC of the length, payload, uint32 CRC."""
    scalars: dict[str, dict[int, float]] = {}
    files = sorted(directory.glob("events.out.tfevents.*"))
    assert files, f"no event files in {directory}"
    for path in files:
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            payload = data[offset + 12 : offset + 12 + length]
            offset += 12 + length + 4
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_metrics_jsonl_tensorboard_and_hooks(tmp_path):
    config = toy.get_config("sharded")
    config.total_steps, config.checkpoint_every, config.log_every = 6, 3, 2
    config.sample_every, config.eval_every = 3, 6
    config.toy.nan_batches = (2,)  # step 3 is skipped, training goes on
    config.logging.progress_bar = False
    result = loop.train(config, tmp_path)
    assert (result.step, result.preempted) == (6, False)

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in records}
    assert sorted(by_step) == [2, 3, 4, 6]  # log_every=2, plus steps with sample/eval scalars
    for r in records:
        assert {"loss", "loss_mse", "loss_act", "lr", "grad_norm", "step_time_s", "images_per_s"} <= set(r)
    assert by_step[3]["skipped"] == 1 and by_step[3]["loss"] is None
    assert by_step[6]["nan_skips"] == 1 and by_step[6]["nan_streak"] == 0
    assert math.isfinite(by_step[6]["loss"])
    assert "sample_rms" in by_step[3] and "sample_rms" in by_step[6]
    assert "eval_mse" in by_step[6] and "eval_mse" not in by_step[3]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_00000003.npy", "step_00000006.npy"]
    assert np.load(tmp_path / "samples" / "step_00000006.npy").shape == (16, config.toy.features)

    events = read_events(tmp_path / "tensorboard")
    for step in (2, 4, 6):
        assert events["loss"][step] == np.float32(by_step[step]["loss"])
    assert events["eval_mse"][6] == np.float32(by_step[6]["eval_mse"])

    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["total_steps"] == 6 and saved["toy"]["nan_batches"] == [2]
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3, 6]


def test_compilation_is_its_own_phase_per_batch_shape(tmp_path, capsys, monkeypatch):
    """The step compiles for the first batch and again for a new batch shape (as a new bucket):
    each such step records compile_s apart from its step_time_s, and the bar shows the phase."""
    from sga_jax.train import toy as toy_task

    class Shrinking(toy_task.ToyBatches):
        """16 rows per batch, then 8 from the fourth batch on."""

        def __next__(self):
            self.batch_size = 16 if self.index < 3 else 8
            return super().__next__()

    monkeypatch.setattr(toy_task.ToyTask, "batches", lambda self, config, mesh, *, seed: Shrinking(config, mesh, seed=seed))
    config = toy.get_config("sharded")
    config.total_steps, config.checkpoint_every, config.log_every = 6, 0, 1
    config.sample_every = config.eval_every = 0
    config.compilation_cache.enabled = False  # a real compile, not a load from the session's cache
    loop.train(config, tmp_path)
    records = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    assert [step for step, r in records.items() if "compile_s" in r] == [1, 4]  # the first step, then the new shape
    for step in (1, 4):
        assert records[step]["compile_s"] > 10 * records[step]["step_time_s"]  # the step's own time leaves it out
    bar = capsys.readouterr().err
    assert "compiling:" in bar and f"compile_s={records[1]['compile_s'] + records[4]['compile_s']:.1f}" in bar


def test_start_hook_runs_once_per_start_before_any_update_and_logs_at_step_0(tmp_path, monkeypatch):
    """The task's optional start hook: step 0 and the initial parameters on a fresh start (its
    scalars logged as eval_* at step 0), the restored step on resume; a fresh restart clears the log."""
    calls = []

    def start(self, trainable, frozen, step, workdir, rng):
        calls.append((step, np.asarray(trainable.out.kernel.value).copy()))
        return {"probe": 1.5} if step == 0 else None

    monkeypatch.setattr(ToyTask, "start", start, raising=False)
    config = toy.get_config("sharded")
    config.total_steps, config.checkpoint_every, config.log_every = 2, 2, 1
    config.logging.progress_bar = False
    run = loop.build_run(config)
    initial = state_lib.init_state(run.task, config, run.optimizer, run.setup)
    loop.train(config, tmp_path, run=run)
    config.total_steps = 3
    loop.train(config, tmp_path)
    assert [step for step, _ in calls] == [0, 2]
    np.testing.assert_array_equal(calls[0][1], np.asarray(initial.params["out"]["kernel"]))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3] and records[0] == {"step": 0, "eval_probe": 1.5}
    assert read_events(tmp_path / "tensorboard")["eval_probe"] == {0: 1.5}

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "metrics.jsonl").write_text('{"step": 0, "eval_probe": 9.0}\n{"step": 1, "loss": 1.0}\n')
    config.total_steps = 1
    loop.train(config, fresh)  # no checkpoint there: a fresh start keeps nothing of the old log
    assert [json.loads(line)["step"] for line in (fresh / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_consecutive_nans_stop_with_a_clear_message(tmp_path):
    config = toy.get_config("sharded")
    config.toy.nan_batches = (1, 2, 3)
    config.nan_guard.max_consecutive = 3
    config.logging.progress_bar = False
    with pytest.raises(loop.TrainingDiverged, match=r"step 4: 3 updates in a row had a non-finite loss"):
        loop.train(config, tmp_path)


@pytest.mark.parametrize("kind", ["constant", "cosine"])
def test_schedule_warmup_then_decay(kind):
    config = toy.get_config().optimizer
    config.schedule, config.learning_rate, config.warmup_steps, config.min_lr_ratio = kind, 1e-3, 10, 0.1
    schedule = make_schedule(config, total_steps=110)
    for step in (0, 5, 10, 60, 110, 200):
        if step < 10:
            expected = 1e-3 * step / 10
        elif kind == "constant":
            expected = 1e-3
        else:
            progress = min((step - 10) / 100, 1.0)
            expected = 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-6, err_msg=f"{kind} step {step}")


def test_checkpoints_keep_the_last_n_and_every_kth(tmp_path):
    checkpointer = Checkpointer(tmp_path, max_to_keep=2, keep_period=4, async_save=False)
    for step in range(1, 10):
        checkpointer.save(step, {"w": jnp.full((3,), float(step))}, {"index": step}, {"seed": 0})
    checkpointer.close()
    assert Checkpointer(tmp_path).all_steps() == [4, 8, 9]
    state, data, _, meta = Checkpointer(tmp_path).restore(8, {"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
    np.testing.assert_array_equal(np.asarray(state["w"]), 8.0)
    assert data == {"index": 8} and meta["step"] == 8
