"""Stage 1's engine step sharded (data=2, fsdp=4) against one device, on the tiny config of
tests/stage1_fixtures.py (apart from test_vae_stage.py, so that `--dist loadfile` can run it on
another worker)."""

import jax
import numpy as np
import pytest

from sga_jax import parallel
from sga_jax.train import loop, state as state_lib


def _engine_step(config, devices, steps=1):
    run = loop.build_run(config, devices)
    with parallel.activation_sharding(run.mesh, run.rules):
        state = state_lib.init_state(run.task, config, run.optimizer, run.setup)
        frozen = state_lib.init_frozen(run.task, config, run.setup)
        step = loop.jitted_step(run)
        batches = run.task.batches(config, run.mesh, seed=config.seed)
        history = []
        for _ in range(steps):
            arrays = {k: v for k, v in next(batches).items() if isinstance(v, jax.Array)}
            state, metrics = step(state, frozen, arrays)
            history.append(jax.device_get(metrics))
    return run, jax.device_get(state), history


@pytest.mark.slow
def test_sharded_train_step_equals_one_device(stage_config):
    sharded_config = stage_config(**{"batch_size": 8, "data.remainder": "pad", "mesh.data": 2, "mesh.fsdp": 4})
    single_config = stage_config(**{"batch_size": 8, "data.remainder": "pad", "mesh.data": 1, "mesh.fsdp": 1})
    run, sharded, (sharded_metrics,) = _engine_step(sharded_config, None)
    spec = run.setup.state_shardings.params["disc"]["blocks"][1]["conv"]["kernel"].spec
    assert "fsdp" in str(spec), spec
    _, single, (single_metrics,) = _engine_step(single_config, jax.devices()[:1])
    for name in ("loss", "loss_rec", "loss_lpips", "loss_g", "loss_d", "loss_sga", "lambda_adv", "lambda_sga"):
        assert sharded_metrics[name] == pytest.approx(single_metrics[name], rel=1e-5), name
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(sharded.params), jax.tree.leaves(single.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
