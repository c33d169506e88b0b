"""Stage 2 (flux_sga task) on a tiny config: the loss terms, where the SGA gradient goes, the hidden
tap, learning on a repeated batch, a sharded train step against one device, and weights loaded from
public checkpoint formats."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sga_jax import parallel, sample
from sga_jax.models import nn
from sga_jax.models.flux.model import timestep_embedding
from sga_jax.train import loop, state as state_lib
from sga_jax.train.task import get_task

from demo_fixtures import IMAGE


def _models(task, config):
    """Trainable and frozen modules, initialised by one jitted function each."""
    abstract_t, abstract_f = nnx.eval_shape(lambda: task.build(config, nnx.Rngs(0)))
    t_graph, f_graph = nnx.graphdef(abstract_t), nnx.graphdef(abstract_f)
    t_state = jax.jit(lambda: nnx.state(task.build(config, nnx.Rngs(0))[0]))()
    f_state = jax.jit(lambda: nnx.state(task.build(config, nnx.Rngs(0))[1]))()
    return t_graph, t_state, f_graph, f_state


def _batch(task, config, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, size=(batch, IMAGE, IMAGE, 3)).astype(np.float32)
    from sga_jax.stages.flux.task import _tokenizers, tokenize_captions

    tokens = tokenize_captions(_tokenizers(task.text_paths), config.text, ["a cat", "a rocket at dawn"][:batch] * (batch // 2))
    return {"image": jnp.asarray(images), **{k: jnp.asarray(v) for k, v in tokens.items()}}


@pytest.fixture(scope="module")
def sga_setup(demo_config):
    config = demo_config()
    task = get_task(config.task, config)
    return task, config, _models(task, config), _batch(task, config)


def test_stage_config_sets_splash_attention_for_flux_and_the_prior(demo_config):
    config = demo_config(**{"model.attention": "splash", "model.splash_block_sizes.block_q": 1024,
                            "model.prior.attention": "splash"})
    networks = get_task(config.task, config).networks
    assert networks.flux.attention == networks.prior.attention == "splash"
    assert networks.flux.splash_block_sizes == nn.SplashBlockSizes(block_q=1024)
    with pytest.raises(ValueError, match="SplashBlockSizes.block_kv must be a positive multiple of 128, got 100"):
        get_task(config.task, demo_config(**{"model.splash_block_sizes.block_kv": 100}))


def test_lambda_zero_gives_exactly_the_flow_matching_loss(demo_config, sga_setup):
    task, config, (t_graph, t_state, f_graph, f_state), batch = sga_setup
    zero = demo_config(**{"align.weight": 0.0})
    zero_task = get_task(zero.task, zero)
    rng = jax.random.key(3)
    loss, metrics = jax.jit(lambda t, f, b, r: zero_task.loss(nnx.merge(t_graph, t), nnx.merge(f_graph, f), b, r))(
        t_state, f_state, batch, rng)
    assert float(metrics["loss_sga"]) > 0
    assert float(loss) == float(metrics["loss_fm"])
    full, full_metrics = jax.jit(lambda t, f, b, r: task.loss(nnx.merge(t_graph, t), nnx.merge(f_graph, f), b, r))(
        t_state, f_state, batch, rng)
    assert float(full_metrics["loss_fm"]) == pytest.approx(float(metrics["loss_fm"]), rel=1e-6)
    assert float(full) == pytest.approx(float(full_metrics["loss_fm"]) + config.align.weight * float(full_metrics["loss_sga"]), rel=1e-6)


def _norms_by_path(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): np.asarray(leaf, np.float64) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_sga_gradient_reaches_blocks_up_to_k_and_the_head_only(sga_setup):
    task, config, (t_graph, t_state, f_graph, f_state), batch = sga_setup
    k = config.align.block
    graph, params, rest = nnx.split(nnx.merge(t_graph, t_state), nnx.Param, ...)

    def sga_term(params, rest, frozen, batch):
        _, metrics = task.loss(nnx.merge(graph, params, rest), nnx.merge(f_graph, frozen), batch, jax.random.key(0))
        return metrics["loss_sga"]

    grads, frozen_grads = jax.jit(jax.grad(sga_term, argnums=(0, 2)))(params, rest, f_state, batch)
    grads = nnx.to_pure_dict(grads)
    depth = task.networks.flux.depth
    double = _norms_by_path(grads["flux"]["double_blocks"])
    for name, g in double.items():
        per_layer = np.abs(g).reshape(depth, -1).max(axis=1)
        assert np.all(per_layer[k + 1 :] == 0), f"{name}: SGA gradient reached blocks after {k}"
        if "img" in name:
            assert np.all(per_layer[: k + 1] > 0), f"{name}: no SGA gradient in blocks <= {k}: {per_layer}"
    for part in ("single_blocks", "final_layer"):
        assert all(np.all(g == 0) for g in _norms_by_path(grads["flux"][part]).values()), part
    assert all(np.any(g != 0) for g in _norms_by_path(grads["head"]).values())
    assert all(np.all(g == 0) for g in _norms_by_path(nnx.to_pure_dict(frozen_grads)).values()), "gradient reached a frozen model"


def test_tapped_hidden_state_is_block_k_image_stream(sga_setup):
    task, config, (t_graph, t_state, _, _), _ = sga_setup
    model = nnx.merge(t_graph, t_state).flux
    cfg = model.config
    rng = np.random.default_rng(1)
    b, h, w = 2, 8, 6
    img = jnp.asarray(rng.normal(size=(b, h // 2 * w // 2, cfg.in_channels)), jnp.float32)
    txt = jnp.asarray(rng.normal(size=(b, 5, cfg.context_in_dim)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(b, cfg.vec_in_dim)), jnp.float32)
    t, guidance = jnp.asarray([0.3, 0.8]), jnp.asarray([3.5, 3.5])
    img_ids, txt_ids = sample.image_ids(b, h, w), sample.text_ids(b, 5)
    for k in range(cfg.depth):
        _, tap = model(img, img_ids, txt, txt_ids, t, y, guidance, hidden_block=k)
        # manual forward: the same embeddings, then double blocks 0..k one at a time, unscanned
        x, c = model.img_in(img), model.txt_in(txt)
        vec = model.time_in(timestep_embedding(t)) + model.guidance_in(timestep_embedding(guidance)) + model.vector_in(y)
        rope = nn.axial_rope(jnp.concatenate([txt_ids, img_ids], axis=1), cfg.axes_dim, cfg.theta)
        graphdef, stacked = nnx.split(model.double_blocks)
        for i in range(k + 1):
            block = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], stacked))
            x, c = block(x, c, vec, rope)
        np.testing.assert_allclose(np.asarray(tap), np.asarray(x), rtol=1e-5, atol=1e-5)


def test_loss_falls_on_a_repeated_batch(sga_setup):
    import optax

    task, config, (t_graph, t_state, f_graph, f_state), batch = sga_setup
    graph, params, rest = nnx.split(nnx.merge(t_graph, t_state), nnx.Param, ...)
    optimizer = optax.adam(2e-3)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, rest, frozen, batch):
        def total(params):
            return task.loss(nnx.merge(graph, params, rest), nnx.merge(f_graph, frozen), batch, jax.random.key(7))

        (loss, metrics), grads = jax.value_and_grad(total, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, metrics

    history = []
    for _ in range(25):
        params, opt_state, loss, metrics = step(params, opt_state, rest, f_state, batch)
        history.append((float(loss), float(metrics["loss_fm"]), float(metrics["loss_sga"])))
    first, last = history[0], history[-1]
    assert last[0] < 0.5 * first[0], history
    assert last[2] < first[2], history


def test_sharded_train_step_equals_one_device(demo_config):
    def engine(config, devices):
        run = loop.build_run(config, devices)
        with parallel.activation_sharding(run.mesh, run.rules):
            state = state_lib.init_state(run.task, config, run.optimizer, run.setup)
            frozen = state_lib.init_frozen(run.task, config, run.setup)
            step = loop.jitted_step(run)
        batch = next(run.task.batches(config, run.mesh, seed=config.seed))
        arrays = {k: v for k, v in batch.items() if isinstance(v, jax.Array)}
        with parallel.activation_sharding(run.mesh, run.rules):
            new_state, metrics = step(state, frozen, arrays)
        return run, jax.device_get(new_state), jax.device_get(metrics)

    sharded_config = demo_config(**{"batch_size": 8, "mesh.data": 2, "mesh.fsdp": 4})
    single_config = demo_config(**{"batch_size": 8, "mesh.data": 1, "mesh.fsdp": 1})
    run, sharded, sharded_metrics = engine(sharded_config, None)
    kernel = run.setup.state_shardings.params["flux"]["double_blocks"]["img_attn"]["qkv"]["kernel"]
    assert "fsdp" in str(kernel.spec), kernel.spec
    _, single, single_metrics = engine(single_config, jax.devices()[:1])
    for name in ("loss", "loss_fm", "loss_sga"):
        assert sharded_metrics[name] == pytest.approx(single_metrics[name], rel=1e-5), name
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(sharded.params), jax.tree.leaves(single.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_weights_load_from_public_formats_into_the_run(demo_config, tmp_path):
    """Flux (diffusers layout), the VAE (BFL ae layout, F8 weights run as F16) and the prior
    (save_pretrained dir) given as paths replace the random initialisation, value for value."""
    from sga_jax.models import dinov2, flux, vae

    base = demo_config()
    probe = get_task(base.task, base)
    rngs = nnx.Rngs(42)
    flux_model = flux.Flux(probe.networks.flux, rngs=rngs)
    ae = vae.AutoEncoder(dataclasses.replace(probe.networks.vae, f16=False), rngs=rngs)
    prior = dinov2.Dinov2(probe.networks.prior, rngs=rngs)
    flux.save(flux_model, tmp_path / "flux", format="diffusers")
    vae.save(ae, tmp_path / "ae.safetensors", format="bfl")
    dinov2.save(prior, tmp_path / "dinov2")

    config = demo_config(**{"model.flux.weights": str(tmp_path / "flux"), "model.vae.weights": str(tmp_path / "ae.safetensors"),
                            "model.prior.weights": str(tmp_path / "dinov2")})
    run = loop.build_run(config, jax.devices()[:1])
    assert run.task.networks.vae.f16 and run.task.networks.vae.ch == probe.networks.vae.ch
    state = state_lib.load_pretrained(run.task, state_lib.init_state(run.task, config, run.optimizer, run.setup), run.setup)
    frozen = state_lib.init_frozen(run.task, config, run.setup)

    def assert_same(loaded, module):
        expected = nnx.to_pure_dict(nnx.state(module, nnx.Param))
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(loaded), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))

    assert_same(state.params["flux"], flux_model)
    assert_same(frozen.module["vae"], ae)
    assert_same(frozen.module["prior"]["model"], prior)


def test_training_run_exports_flux_that_diffusers_loads(demo_config, tmp_path):
    """Two steps through the engine's loop (checkpoint, metrics, samples), then the trained Flux out
    to diffusers' layout: FluxTransformer2DModel loads it strictly with the checkpoint's values."""
    import torch
    from diffusers import FluxTransformer2DModel

    from sga_jax.train.checkpoint import Checkpointer
    from sga_jax.train.export import export_run

    config = demo_config(**{"total_steps": 2, "checkpoint_every": 2, "log_every": 1, "sample_every": 2,
                            "sample.height": 64, "sample.width": 64, "sample.steps": 2, "sample.prompts": ("a cat",)})
    workdir = tmp_path / "run"
    run = loop.build_run(config, jax.devices()[:1])
    loop.train(config, workdir, run=run)
    assert (workdir / "samples" / "step_000002.png").is_file() and (workdir / "loss_curve.png").is_file()
    assert export_run(workdir, tmp_path / "export", format="diffusers") == 2

    model = FluxTransformer2DModel.from_pretrained(tmp_path / "export", low_cpu_mem_usage=False)
    target = state_lib.with_shardings(run.setup.abstract_state, run.setup.state_shardings)
    state, _, _, _ = Checkpointer(workdir / "checkpoints").restore(2, target)
    kernel = np.asarray(state.params["flux"]["img_in"]["kernel"])
    np.testing.assert_array_equal(model.x_embedder.weight.detach().numpy(), kernel.T)
    assert not torch.isnan(next(model.parameters())).any()
