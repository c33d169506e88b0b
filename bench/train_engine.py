"""Training-engine overhead on the CPU with a widened toy model: train-step time on one device and
on 8 simulated devices (data=2, fsdp=4), and checkpoint cost: how long a save blocks the loop
(asynchronous vs synchronous), the time until it is finalised, and the restore time.

python bench/train_engine.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "configs"))

import toy  # noqa: E402
from bench.report import markdown_table, median_time, write_section  # noqa: E402
from sga_jax import parallel  # noqa: E402
from sga_jax.train import loop, state as state_lib  # noqa: E402
from sga_jax.train.checkpoint import Checkpointer  # noqa: E402

WIDTH, HIDDEN, DEPTH, BATCH = 256, 1024, 4, 64


def engine(mesh_sizes: dict[str, int], devices: list[jax.Device]):
    config = toy.get_config()
    config.batch_size = BATCH
    config.toy.update({"width": WIDTH, "hidden": HIDDEN, "depth": DEPTH})
    config.mesh.update(mesh_sizes)
    run = loop.build_run(config, devices)
    with parallel.activation_sharding(run.mesh, run.rules):
        state = state_lib.init_state(run.task, config, run.optimizer, run.setup)
        frozen = state_lib.init_frozen(run.task, config, run.setup)
        step_fn = loop.jitted_step(run)
    batch = {k: v for k, v in next(run.task.batches(config, run.mesh, seed=0)).items() if isinstance(v, jax.Array)}
    return run, state, frozen, step_fn, batch


def step_time(run, state, frozen, step_fn, batch) -> tuple[float, object]:
    holder = {"state": state}

    def one() -> None:
        with parallel.activation_sharding(run.mesh, run.rules):
            holder["state"], metrics = step_fn(holder["state"], frozen, batch)
        jax.block_until_ready(metrics)

    return median_time(one, repeats=10, warmup=2), holder["state"]


def checkpoint_times(run, state, async_save: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        checkpointer = Checkpointer(Path(tmp) / "checkpoints", async_save=async_save)
        checkpointer.save(1, state, {"index": 1}, {"bench": True})  # warm-up: first save sets things up
        checkpointer.wait()
        start = time.perf_counter()
        checkpointer.save(2, state, {"index": 2}, {"bench": True})
        blocked = time.perf_counter() - start
        finalised = blocked + checkpointer.wait()
        target = state_lib.with_shardings(run.setup.abstract_state, run.setup.state_shardings)
        start = time.perf_counter()
        restored, *_ = checkpointer.restore(2, target)
        jax.block_until_ready(restored)
        restore = time.perf_counter() - start
        checkpointer.close()
    return {"blocked_s": blocked, "finalised_s": finalised, "restore_s": restore}


def main() -> None:
    rows, record = [], {"width": WIDTH, "hidden": HIDDEN, "depth": DEPTH, "batch": BATCH}
    for name, sizes, devices in (("1 device", {"data": 1}, jax.devices()[:1]),
                                 ("8 devices (data=2, fsdp=4)", {"data": 2, "fsdp": 4}, jax.devices())):
        run, state, frozen, step_fn, batch = engine(sizes, devices)
        seconds, state = step_time(run, state, frozen, step_fn, batch)
        estimate = state_lib.memory_estimate(run.setup)
        row = {"mesh": name, "step_ms": 1e3 * seconds, "state_MiB_per_device": estimate["total"] / 2**20}
        for async_save in (True, False):
            times = checkpoint_times(run, state, async_save)
            mode = "async" if async_save else "sync"
            row[f"save_blocks_ms ({mode})"] = 1e3 * times["blocked_s"]
            row[f"save_total_ms ({mode})"] = 1e3 * times["finalised_s"]
            row["restore_ms"] = 1e3 * times["restore_s"]
        rows.append(row)
        record[name] = row
        print(row, flush=True)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.setup.abstract_state.params))
    body = (
        f"Toy student widened to width {WIDTH}, hidden {HIDDEN}, depth {DEPTH} ({params:,} parameters, "
        f"AdamW + EMA), global batch {BATCH}. Median of 10 steps; the second save of a run (the first sets things up) and one restore. "
        "`save_blocks_ms` is how long `Checkpointer.save` holds the training loop; an asynchronous save "
        "returns once the arrays are copied off the devices and finishes in the background. The 8 devices "
        "are simulated on the same CPU cores, so the sharded step measures partitioning overhead, not speed-up.\n\n"
        + markdown_table(rows)
    )
    write_section("train_engine", "Training engine overhead (toy model, CPU)", body, record)


if __name__ == "__main__":
    main()
