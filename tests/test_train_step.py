"""The jitted train step on 8 simulated CPU devices with the toy task: sharded vs one device,
real sharding of params and optimizer state, gradient accumulation, frozen modules, NaN guard,
mixed precision."""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sga_jax import parallel
from sga_jax.train import loop, state as state_lib
from sga_jax.train.toy import ToyTask

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "configs"))
import toy  # noqa: E402


class Engine:
    """A run's state, frozen variables, iterator and jitted step, for driving steps by hand."""

    def __init__(self, config, devices=None):
        self.run = loop.build_run(config, devices)
        with self.context():
            self.state = state_lib.init_state(self.run.task, config, self.run.optimizer, self.run.setup)
            self.state = state_lib.load_pretrained(self.run.task, self.state, self.run.setup)
            self.frozen = state_lib.init_frozen(self.run.task, config, self.run.setup)
            self.step_fn = loop.jitted_step(self.run)
        self.initial = jax.device_get(self.state)
        self.batches = self.run.task.batches(config, self.run.mesh, seed=config.seed)

    def reset(self):
        """Back to the initial state and the first batch, without recompiling anything."""
        self.state = jax.device_put(self.initial, self.run.setup.state_shardings)
        self.batches.set_state({"index": 0, "seed": self.batches.seed})
        return self

    def context(self):
        return parallel.activation_sharding(self.run.mesh, self.run.rules)

    def next_arrays(self):
        return {k: v for k, v in next(self.batches).items() if isinstance(v, jax.Array)}

    def step(self, batch=None):
        batch = self.next_arrays() if batch is None else batch
        with self.context():
            self.state, metrics = self.step_fn(self.state, self.frozen, batch)
        return {k: float(v) for k, v in jax.device_get(metrics).items()}


def toy_config(**overrides):
    """The sharded toy config without input noise (so accumulation is comparable), overridden."""
    config = toy.get_config("sharded")
    config.toy.noise = 0.0
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@pytest.fixture(scope="module")
def engines():
    """Built once per module (compiles dominate): reset() before use."""
    return {
        "sharded": Engine(toy_config()),
        "single": Engine(toy_config(**{"mesh.data": 1, "mesh.fsdp": 1}), jax.devices()[:1]),
    }


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def test_sharded_step_matches_one_device(engines):
    sharded, single = engines["sharded"].reset(), engines["single"].reset()
    for _ in range(3):
        m_sharded, m_single = sharded.step(), single.step()
        for name in ("loss", "loss_mse", "loss_act", "grad_norm", "lr"):
            np.testing.assert_allclose(m_sharded[name], m_single[name], rtol=1e-5, atol=1e-6, err_msg=name)
    a, b = host(sharded.state), host(single.state)
    for name in ("params", "opt_state", "ema"):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), getattr(a, name), getattr(b, name))
    assert int(a.step) == int(b.step) == 3


def test_params_and_optimizer_state_are_sharded(engines):
    engine = engines["sharded"].reset()
    engine.step()
    kernel = engine.state.params["blocks"]["up"]["kernel"]  # (layers=2, embed=16, mlp=32)
    assert kernel.sharding.spec == P(None, "fsdp")
    assert {s.data.shape for s in kernel.addressable_shards} == {(2, 4, 32)}
    adam = engine.state.opt_state[1][0]
    for moments in (adam.mu, adam.nu):
        m = moments["blocks"]["up"]["kernel"]
        assert m.sharding.spec == P(None, "fsdp")
        assert {s.data.shape for s in m.addressable_shards} == {(2, 4, 32)}
    assert engine.state.ema["inp"]["kernel"].sharding.spec == P(None, "fsdp")
    assert adam.count.sharding.spec == P()
    with engine.context():  # the batch stays split over (data, fsdp) inside the step
        compiled = engine.step_fn.lower(engine.state, engine.frozen, engine.next_arrays()).compile()
    assert compiled.input_shardings[0][2]["x"].spec == P(("data", "fsdp"))
    estimate = state_lib.memory_estimate(engine.run.setup)
    param_bytes = sum(x.size * 4 for x in jax.tree.leaves(engine.state.params))
    assert estimate["params"] < param_bytes  # really split across devices
    device = jax.devices()[0]

    def on_device(tree):
        return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)

    for part, tree in (("params", engine.state.params), ("optimizer", engine.state.opt_state),
                       ("ema", engine.state.ema), ("frozen", engine.frozen)):
        assert estimate[part] == on_device(tree), part  # the dry-run estimate is what device 0 holds


def test_gradient_accumulation_equals_one_big_batch(engines):
    big = engines["sharded"].reset()
    accum = Engine(toy_config(**{"optimizer.grad_accum_steps": 2}))
    for _ in range(2):
        m_big, m_acc = big.step(), accum.step()
        np.testing.assert_allclose(m_acc["loss"], m_big["loss"], rtol=1e-6)
        np.testing.assert_allclose(m_acc["grad_norm"], m_big["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 host(accum.state.params), host(big.state.params))


def test_frozen_module_gets_no_gradients_and_no_optimizer_state(engines):
    engine = engines["sharded"].reset()
    frozen_before = host(engine.frozen)
    engine.step()
    engine.step()
    # the teacher's values are untouched, and its buffers survive (not donated)
    jax.tree.map(np.testing.assert_array_equal, host(engine.frozen), frozen_before)
    adam = engine.state.opt_state[1][0]
    params_structure = jax.tree.structure(engine.state.params)
    assert jax.tree.structure(adam.mu) == params_structure
    assert jax.tree.structure(adam.nu) == params_structure
    assert set(engine.state.params) == {"inp", "blocks", "out"}
    assert set(engine.frozen.module) == {"up", "down"} and engine.frozen.trainable == {}
    n_param = len(jax.tree.leaves(engine.state.params))
    assert len(jax.tree.leaves(engine.state.opt_state)) == 2 * n_param + 2  # mu, nu, two counts


def test_nan_batch_is_skipped_and_counted(engines):
    engine = engines["sharded"].reset()
    engine.step()
    before = host(engine.state)
    bad = engine.next_arrays()
    x = np.asarray(bad["x"]).copy()
    x[3, 1] = np.nan
    bad["x"] = jax.device_put(x, bad["x"].sharding)
    m = engine.step(bad)
    assert (m["skipped"], m["nan_skips"], m["nan_streak"]) == (1, 1, 1)
    after = host(engine.state)
    for name in ("params", "opt_state", "ema"):
        jax.tree.map(np.testing.assert_array_equal, getattr(after, name), getattr(before, name))
    assert int(after.step) == 2
    m = engine.step()
    assert (m["skipped"], m["nan_skips"], m["nan_streak"]) == (0, 1, 0)
    assert np.isfinite(m["loss"])


def test_bfloat16_compute_keeps_float32_masters(engines):
    f32 = engines["sharded"].reset()
    bf16 = Engine(toy_config(**{"precision.compute_dtype": "bfloat16"}))
    m32, m16 = f32.step(), bf16.step()
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(bf16.state.params))
    assert m16["loss"] != m32["loss"]
    np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=3e-2)


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match=r"config.batch_size=12: expected a multiple of 8"):
        loop.build_run(toy_config(batch_size=12))
    with pytest.raises(ValueError, match=r"config.optimizer.schedule='linear'"):
        loop.build_run(toy_config(**{"optimizer.schedule": "linear"}))
    with pytest.raises(ValueError, match=r"config.task='nope'"):
        loop.build_run(toy_config(task="nope"))


def test_checkpoint_restores_into_target_shardings(engines, tmp_path):
    from sga_jax.train.checkpoint import Checkpointer

    engine = engines["sharded"].reset()
    engine.step()
    expected = host(engine.state)
    checkpointer = Checkpointer(tmp_path / "checkpoints", async_save=False)
    checkpointer.save(1, engine.state, engine.batches.get_state(), {"seed": 0})
    setup = engine.run.setup
    restored, data, config, meta = checkpointer.restore(1, state_lib.with_shardings(setup.abstract_state, setup.state_shardings))
    checkpointer.close()
    assert data == {"index": 1, "seed": 0} and config == {"seed": 0} and meta["step"] == 1
    jax.tree.map(np.testing.assert_array_equal, host(restored), expected)
    for array, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(setup.state_shardings)):
        assert array.sharding.is_equivalent_to(sharding, array.ndim), (array.sharding, sharding)
    with pytest.raises(ValueError, match="no finalised checkpoint for step 2"):
        Checkpointer(tmp_path / "checkpoints").restore(2, setup.abstract_state)




class LoadedTeacherTask(ToyTask):
    """The toy task with its frozen teacher and its student's output layer "loaded from files"
    (here: constants) into the given shardings, as a stage loads pre-trained weights."""

    def load_pretrained(self, params, shardings):
        out = jax.tree.map(lambda p, s: jax.device_put(np.full(p.shape, 0.25, p.dtype), s), params["out"], shardings["out"])
        return {**params, "out": out}

    def load_frozen(self, abstract, shardings):
        return jax.tree.map(lambda a, s: jax.device_put(np.full(a.shape, 0.5, a.dtype), s), abstract, shardings)


def test_task_by_dotted_path_with_load_frozen():
    engine = Engine(toy_config(task="test_train_step:LoadedTeacherTask"))
    assert isinstance(engine.run.task, LoadedTeacherTask)
    kernel = engine.frozen.module["up"]["kernel"]
    assert kernel.sharding.is_equivalent_to(engine.run.setup.frozen_shardings.module["up"]["kernel"], 2)
    np.testing.assert_array_equal(np.asarray(kernel), 0.5)
    for tree in (engine.state.params, engine.state.ema):
        np.testing.assert_array_equal(np.asarray(tree["out"]["kernel"]), 0.25)
        assert tree["out"]["kernel"].sharding.spec == P("fsdp")
    assert np.asarray(engine.state.params["inp"]["kernel"]).std() > 0.1  # still the random init
    engine.step()
    np.testing.assert_array_equal(np.asarray(engine.frozen.module["up"]["kernel"]), 0.5)


class WrongShapeTask(ToyTask):
    def load_pretrained(self, params, shardings):
        return {**params, "out": {**params["out"], "kernel": np.zeros((3, 8), np.float32)}}


def test_load_pretrained_with_a_wrong_shape_names_the_key(engines):
    engine = engines["sharded"].reset()
    with pytest.raises(ValueError, match=r"\['out'\]\['kernel'\] has shape \(3, 8\), expected \(16, 8\)"):
        state_lib.load_pretrained(WrongShapeTask(), engine.state, engine.run.setup)


class TwoGroupTask(ToyTask):
    """The toy student split into groups: its blocks in "slow" (own learning rate and start step),
    its input layer frozen, the rest default."""

    def param_groups(self, params):
        labels = jax.tree.map(lambda _: "default", params)
        labels["blocks"] = jax.tree.map(lambda _: "slow", params["blocks"])
        labels["inp"] = jax.tree.map(lambda _: "frozen", params["inp"])
        return labels


def test_parameter_groups_train_apart_and_checkpoint(tmp_path):
    from sga_jax.train.checkpoint import Checkpointer

    config = toy_config(task="test_train_step:TwoGroupTask", **{"optimizer.ema_decay": 0.0})
    config.optimizer.groups = {"slow": {"learning_rate": 1e-4, "start_step": 1, "warmup_steps": 0}}
    engine = Engine(config)
    before = host(engine.state.params)
    first = engine.step()
    assert first["lr_slow"] == 0.0 and first["lr"] == 0.0  # slow starts at update 1; default warms up over 2
    second = engine.step()
    assert second["lr_slow"] == pytest.approx(1e-4) and second["lr"] > 0
    after = host(engine.state.params)
    jax.tree.map(np.testing.assert_array_equal, after["inp"], before["inp"])
    assert not np.array_equal(after["blocks"]["up"]["kernel"], before["blocks"]["up"]["kernel"])
    assert not np.array_equal(after["out"]["kernel"], before["out"]["kernel"])

    checkpointer = Checkpointer(tmp_path / "checkpoints", async_save=False)
    checkpointer.save(2, engine.state, engine.batches.get_state(), {"seed": 0})
    setup = engine.run.setup
    restored, _, _, _ = checkpointer.restore(2, state_lib.with_shardings(setup.abstract_state, setup.state_shardings))
    checkpointer.close()
    jax.tree.map(np.testing.assert_array_equal, host(restored), host(engine.state))
