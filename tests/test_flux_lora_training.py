"""LoRA fine-tuning of Flux in stage 2 (flux_sga, tiny demo networks): the train state holds the
adapters and the head only (parameters, optimizer moments, checkpoints), the base weights sit frozen
with the frozen state and never change, the SGA gradient reaches the adapters of blocks up to k
only, a killed and resumed run is bitwise the straight one, and the run exports LoRA files that
diffusers loads and a merged model equal to base + scale * A B."""

import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from diffusers import FluxTransformer2DModel
from flax import nnx
from flux_reference import ours_args, reference_forward
from safetensors.numpy import load_file
from safetensors.torch import load_file as torch_load_file
from test_flux_stage import _batch, _norms_by_path
from test_train_resume import KILL_DURING_SAVE, ROOT, env, metrics, saved_state  # noqa: F401
from torch_reference import assert_close_relative

from sga_jax import sample
from sga_jax.models import flux, nn
from sga_jax.models.flux import lora as flux_lora
from sga_jax.train import loop, state as state_lib
from sga_jax.train.checkpoint import Checkpointer
from sga_jax.train.export import checkpoint_reader, export_run
from sga_jax.train.task import get_task

RANK = 4


def _paths(tree) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


@pytest.fixture(scope="module")
def trained(demo_config, tmp_path_factory):
    """Two LoRA steps (rank 4, alpha 8, SGA at double block 0 of 2) from an fp32 base saved in
    diffusers' layout, through the engine's loop; the run and its work directory."""
    probe = get_task("flux_sga", demo_config())
    base_dir = tmp_path_factory.mktemp("base")
    flux.save(flux.Flux(probe.networks.flux, rngs=nnx.Rngs(5)), base_dir, format="diffusers")
    config = demo_config(**{"lora.rank": RANK, "lora.alpha": 8.0, "lora.base_dtype": "float32", "align.block": 0,
                            "model.flux.weights": str(base_dir), "total_steps": 2, "checkpoint_every": 2,
                            "sample_every": 0, "optimizer.learning_rate": 1e-2, "optimizer.warmup_steps": 0})
    workdir = tmp_path_factory.mktemp("run")
    run = loop.build_run(config, jax.devices()[:1])
    loop.train(config, workdir, run=run)
    target = state_lib.with_shardings(run.setup.abstract_state, run.setup.state_shardings)
    checkpointer = Checkpointer(workdir / "checkpoints")
    state = checkpointer.restore(2, target)[0]
    checkpointer.close()
    return dict(workdir=workdir, base_dir=base_dir, run=run, config=config, state=state)


def test_lora_state_holds_adapters_and_head_and_the_base_is_frozen(trained):
    setup, state = trained["run"].setup, trained["state"]
    params = setup.abstract_state.params
    assert set(params) == {"flux", "head"}
    assert _paths(params["flux"]) and all("['lora']" in p for p in _paths(params["flux"]))
    adapter_shapes = sorted(tuple(x.shape) for x in jax.tree.leaves(params))
    for opt in (setup.abstract_state.opt_state, state.opt_state):  # planned and checkpointed
        moments = sorted(tuple(x.shape) for x in jax.tree.leaves(opt) if x.ndim)  # Adam's mu and nu
        assert moments == sorted(adapter_shapes * 2)
    saved = ocp.StandardCheckpointer().metadata(trained["workdir"] / "checkpoints" / "2" / "state").item_metadata
    assert all("['lora']" in p for p in _paths(saved["params"]["flux"]))  # no base weight in the checkpoint
    b_moved = [np.abs(np.asarray(x)).max() for p, x in jax.tree_util.tree_leaves_with_path(state.params["flux"])
               if p[-1].key == "b"]
    assert min(b_moved) > 0  # every B left zero: the adapters train

    plain = flux.abstract_model(dataclasses.replace(trained["run"].task.networks.flux, lora=None))
    base = setup.abstract_frozen.trainable["flux"]
    assert jax.tree.structure(base) == jax.tree.structure(nnx.to_pure_dict(nnx.state(plain, nnx.Param)))
    assert {x.dtype for x in jax.tree.leaves(base)} == {np.dtype("float32")}  # config.lora.base_dtype
    memory = state_lib.memory_estimate(setup)
    n_adapters = sum(int(np.prod(s)) for s in adapter_shapes)
    assert memory["params"] == 4 * n_adapters and memory["optimizer"] >= 8 * n_adapters
    assert memory["frozen"] > 4 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(base))


def test_sga_gradient_reaches_the_adapters_of_blocks_up_to_k_only_and_never_the_base(trained):
    run, state, config = trained["run"], trained["state"], trained["config"]
    frozen = state_lib.init_frozen(run.task, config, run.setup)
    batch = _batch(run.task, config)

    def sga_term(params, base):
        trainable = state_lib.merge_trainable(run.setup.graphs.trainable, params, frozen.replace(trainable=base),
                                              state.model_state)
        module = state_lib.merge_frozen(run.setup.graphs, frozen)
        return run.task.loss(trainable, module, batch, jax.random.key(0))[1]["loss_sga"]

    grads, base_grads = jax.jit(jax.grad(sga_term, argnums=(0, 1)))(state.params, frozen.trainable)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(base_grads)), "a gradient reached the base"
    depth, k = run.task.networks.flux.depth, config.align.block
    assert k + 1 < depth
    for name, g in _norms_by_path(grads["flux"]["double_blocks"]).items():
        per_layer = np.abs(g).reshape(depth, -1).max(axis=1)
        assert np.all(per_layer[k + 1 :] == 0), f"{name}: SGA gradient reached blocks after {k}"
        if "img" in name:
            assert np.all(per_layer[: k + 1] > 0), f"{name}: no SGA gradient in blocks <= {k}: {per_layer}"
    assert all(np.all(g == 0) for g in _norms_by_path(grads["flux"]["single_blocks"]).values())
    assert all(np.any(g != 0) for g in _norms_by_path(grads["head"]).values())


LORA_ROW = "configs/demo.py:dinov2,sga,wlf,layer=1,long_edge=8,lora=4"
TOTAL = 4
COMMON = ("--config.logging.progress_bar=False", "--config.sample_every=0", "--config.eval_every=0",
          "--config.log_every=1", "--config.checkpoint.max_to_keep=10", f"--config.total_steps={TOTAL}",
          "--config.checkpoint_every=1", "--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.lora.dropout=0.1")


@pytest.fixture(scope="module")
def lora_env(env, tmp_path_factory):
    """Two CPU devices (FSDP over both), demo assets in a temporary folder."""
    return {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "SGA_DEMO_ASSETS": str(tmp_path_factory.mktemp("assets"))}


def _train(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_killed_and_resumed_lora_run_is_bitwise_the_straight_run(tmp_path, lora_env):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    done = _train([sys.executable, "-m", "sga_jax.train", "--config", LORA_ROW, "--workdir", str(straight), *COMMON],
                  lora_env)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = _train([sys.executable, "-c", KILL_DURING_SAVE, "3", "--config", LORA_ROW, "--workdir", str(resumed),
                     *COMMON], lora_env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    again = _train([sys.executable, "-m", "sga_jax.train", "--config", LORA_ROW, "--workdir", str(resumed), *COMMON],
                   lora_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "at step 2" in again.stderr and f"finished at step {TOTAL}" in again.stdout

    for a, b in zip(metrics(straight), metrics(resumed)):
        for key in ("loss", "loss_fm", "loss_sga", "grad_norm"):
            assert a[key] == b[key], (a["step"], key)
    for x, y in zip(saved_state(straight, TOTAL), saved_state(resumed, TOTAL)):
        np.testing.assert_array_equal(x, y)
    tree = ocp.StandardCheckpointer().metadata(straight / "checkpoints" / str(TOTAL) / "state").item_metadata
    flux_paths = _paths(tree["params"]["flux"])
    assert flux_paths and all("['lora']" in p for p in flux_paths)  # no base weight in the checkpoint
    assert json.loads((straight / "config.json").read_text())["lora"]["rank"] == 4


def _inputs(config: flux.FluxConfig, b: int = 2, h: int = 4, w: int = 6):
    rng = np.random.default_rng(0)
    return dict(img=rng.normal(size=(b, h * w // 4, config.in_channels)).astype(np.float32),
                img_ids=np.asarray(sample.image_ids(1, h, w))[0],
                txt=rng.normal(size=(b, 3, config.context_in_dim)).astype(np.float32),
                txt_ids=np.zeros((3, 3), np.float32), timesteps=np.array([0.3, 0.8], np.float32),
                y=rng.normal(size=(b, config.vec_in_dim)).astype(np.float32), guidance=np.array([3.5, 2.0], np.float32))


def test_lora_run_exports_lora_files_and_the_merged_model(trained, tmp_path):
    workdir = trained["workdir"]
    assert export_run(workdir, tmp_path / "lora", format="lora") == 2
    assert export_run(workdir, tmp_path / "kohya", format="lora-kohya") == 2
    assert export_run(workdir, tmp_path / "merged", format="diffusers") == 2
    with pytest.raises(ValueError, match="exports"):
        export_run(workdir, tmp_path / "x", format="safetensors")

    base = flux.load(trained["base_dir"])
    merged = flux.load(tmp_path / "merged")
    adapters = flux_lora.read(tmp_path / "lora", base.config)
    scale = 8.0 / RANK
    base_kernels = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(base, nnx.Param))}
    merged_kernels = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(merged, nnx.Param))}
    lora_model = _checkpoint_lora_model(workdir, trained["run"].task.networks.flux)
    for name, layer in nn.adapted_layers(lora_model):  # merged = base + scale * A B, part by part
        path = tuple(int(p) if p.isdigit() else p for p in name.split(".")) + ("kernel",)
        start = 0
        for part, size in layer.parts:
            expected = base_kernels[path][..., start : start + size]
            if part in layer.lora:
                a, b = np.asarray(layer.lora[part].a[...]), np.asarray(layer.lora[part].b[...])
                assert np.abs(b).max() > 0
                expected = expected + scale * np.einsum("...ir,...ro->...io", a, b)
            np.testing.assert_allclose(merged_kernels[path][..., start : start + size], expected, rtol=1e-6, atol=1e-6)
            start += size
    assert adapters[("double_blocks.img_attn.qkv", 0, "q")].scale == 1.0  # scale folded into B

    x = _inputs(base.config)
    ours = np.asarray(merged(*ours_args(x, True)))
    reference = FluxTransformer2DModel.from_pretrained(trained["base_dir"], low_cpu_mem_usage=False)
    reference.load_lora_adapter(torch_load_file(tmp_path / "lora" / flux_lora.DIFFUSERS_FILE), prefix="transformer")
    assert_close_relative(ours, reference_forward(reference, x, True), what="diffusers with our LoRA")
    kohya = flux_lora.read(tmp_path / "kohya", base.config)
    assert_close_relative(np.asarray(flux_lora.merge(base, kohya)(*ours_args(x, True))), ours, what="kohya export")
    assert load_file(tmp_path / "kohya" / flux_lora.KOHYA_FILE)["lora_unet_double_blocks_0_img_attn_qkv.alpha"] == 3 * 8.0


def _checkpoint_lora_model(workdir: Path, config: flux.FluxConfig) -> flux.Flux:
    """The run's LoRA Flux with its checkpointed adapters (the base left abstract)."""
    graphdef, params, base = nnx.split(flux.abstract_model(config), nnx.Param, nn.Frozen)
    nnx.replace_by_pure_dict(params, checkpoint_reader(workdir, 2)("flux", nnx.to_pure_dict(params)))
    return nnx.merge(graphdef, params, base)
