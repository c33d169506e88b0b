"""Stage 1 (vae_sga task) on a tiny config: every extra term off, where each term's gradient goes,
the adversarial terms before `gan.start`, the GAN losses against taming's and the config errors
(the sharded step is in test_vae_stage_sharding.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from sga_jax.stages.vae import losses
from sga_jax.train.task import get_task

from stage1_fixtures import IMAGE


def _models(task, config):
    """Graph definitions and states of the trainable and frozen modules (one jit each)."""
    abstract_t, abstract_f = nnx.eval_shape(lambda: task.build(config, nnx.Rngs(0)))
    t_state = jax.jit(lambda: nnx.state(task.build(config, nnx.Rngs(0))[0]))()
    f_state = jax.jit(lambda: nnx.state(task.build(config, nnx.Rngs(0))[1]))()
    return nnx.graphdef(abstract_t), t_state, nnx.graphdef(abstract_f), f_state


def _batch(batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": jnp.asarray(rng.uniform(-1, 1, size=(batch, IMAGE, IMAGE, 3)).astype(np.float32))}


def _loss_fn(task, models):
    """batch, step -> the task's (loss, metrics), one compilation for every step."""
    t_graph, t_state, f_graph, f_state = models
    fn = jax.jit(lambda t, f, b, r, s: task.loss(nnx.merge(t_graph, t), nnx.merge(f_graph, f), b, r, step=s))
    return lambda batch, step=10: fn(t_state, f_state, batch, jax.random.key(3), jnp.int32(step))


@pytest.mark.slow
def test_every_extra_term_off_is_reconstruction_plus_lpips(stage_config):
    config = stage_config("vanilla", **{"loss.gan.weight": 0.0, "loss.moment.weight": 0.0, "loss.sc.weight": 0.0})
    task = get_task(config.task, config)
    models = _models(task, config)
    assert not {"disc", "head"} & set(models[1]) and "pretrained" not in models[3]
    loss, metrics = _loss_fn(task, models)(_batch())
    assert sorted(metrics) == ["loss_lpips", "loss_rec"]
    assert float(metrics["loss_lpips"]) != 0 and float(metrics["loss_rec"]) > 0
    expected = np.float32(metrics["loss_rec"]) + np.float32(config.loss.lpips_weight) * np.float32(metrics["loss_lpips"])
    assert np.float32(loss) == expected


def _flat(tree, prefix=""):
    return {prefix + jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


TERMS = ("loss_g", "loss_d", "loss_moment", "loss_sc", "loss_sga")


@pytest.fixture(scope="module")
def term_gradients(stage_config):
    """d term / d (trainable, frozen) for each term of the full loss, and the total's: one jacrev
    (LPIPS off: a frozen network like the prior, and the slowest to compile)."""
    config = stage_config(**{"loss.lpips_weight": 0.0})
    task = get_task(config.task, config)
    t_graph, t_state, f_graph, f_state = _models(task, config)
    batch = _batch()

    def terms(t, f):
        loss, metrics = task.loss(nnx.merge(t_graph, t), nnx.merge(f_graph, f), batch, jax.random.key(1), step=jnp.int32(5))
        return jnp.stack([loss] + [metrics[name] for name in TERMS])

    params = nnx.to_pure_dict(t_state)
    frozen = nnx.to_pure_dict(f_state)
    leaves, treedef = jax.tree.flatten(frozen["pretrained"])  # the anchors away from the start, so they pull
    keys = jax.random.split(jax.random.key(7), len(leaves))
    frozen["pretrained"] = jax.tree.unflatten(treedef, [a + 0.05 * jax.random.normal(k, a.shape, a.dtype)
                                                        for a, k in zip(leaves, keys)])
    values = jax.jit(terms)(params, frozen)
    grads_t, grads_f = jax.jit(jax.jacrev(terms, argnums=(0, 1)))(params, frozen)
    names = ("loss",) + TERMS
    pick = lambda tree, i: jax.tree.map(lambda g: g[i], tree)  # noqa: E731
    return {name: (float(values[i]), pick(grads_t, i), pick(grads_f, i)) for i, name in enumerate(names)}


def _reached(grads, part):
    """Whether any gradient in `grads[part]` (or its sub-path `a/b`) is non-zero."""
    node = grads
    for key in part.split("/"):
        node = node[key]
    return any(np.any(g != 0) for g in _flat(node).values())


@pytest.mark.slow
@pytest.mark.parametrize("term, reaches, spared", [
    ("loss_sga", ["ae/encoder", "head"], ["ae/decoder", "disc"]),
    ("loss_moment", ["ae/encoder"], ["ae/decoder", "head", "disc"]),
    ("loss_sc", ["ae/decoder", "ae/encoder"], ["head", "disc"]),
    ("loss_g", ["ae/decoder", "ae/encoder"], ["head", "disc"]),
    ("loss_d", ["disc"], ["ae", "head"]),
])
def test_each_term_reaches_only_its_own_parameters(term_gradients, term, reaches, spared):
    value, grads, frozen_grads = term_gradients[term]
    assert value != 0
    for part in reaches:
        assert _reached(grads, part), f"{term} does not reach {part}"
    for part in spared:
        assert not _reached(grads, part), f"{term} reached {part}"
    assert {"pretrained", "prior"} <= set(frozen_grads)
    for part in frozen_grads:
        assert not _reached(frozen_grads, part), f"{term} reached the frozen {part}"


@pytest.mark.slow
def test_total_gradient_gives_each_player_only_its_own_objective(term_gradients):
    """The discriminator's gradient of the summed loss is that of L_D alone; the VAE gets nothing from L_D."""
    _, total, frozen_total = term_gradients["loss"]
    _, disc_only, _ = term_gradients["loss_d"]
    for name, g in _flat(total["disc"]).items():
        np.testing.assert_allclose(g, _flat(disc_only["disc"])[name], rtol=1e-5, atol=1e-8, err_msg=name)
    assert not any(np.any(g != 0) for g in _flat(frozen_total).values())


@pytest.mark.slow
def test_adversarial_terms_are_zero_before_gan_start(stage_config):
    config = stage_config(**{"loss.gan.start": 7, "loss.lpips_weight": 0.0})
    task = get_task(config.task, config)
    loss = _loss_fn(task, _models(task, config))
    batch = _batch()
    _, before = loss(batch, step=6)
    _, after = loss(batch, step=7)
    for name in ("loss_g", "loss_d", "lambda_adv"):
        assert float(before[name]) == 0.0 and float(after[name]) != 0.0, name
    assert float(before["loss_rec"]) == float(after["loss_rec"])


def test_gan_losses_match_taming():
    from taming.modules.losses.vqperceptual import hinge_d_loss, vanilla_d_loss

    rng = np.random.default_rng(0)
    real, fake = (rng.normal(size=(3, 5, 4, 1)).astype(np.float32) * 2 for _ in range(2))
    torch_real, torch_fake = (torch.from_numpy(a.transpose(0, 3, 1, 2).copy()) for a in (real, fake))
    for kind, reference in (("hinge", hinge_d_loss), ("vanilla", vanilla_d_loss)):
        ours = float(jnp.mean(losses.discriminator_loss(jnp.asarray(real), jnp.asarray(fake), kind)))
        assert ours == pytest.approx(float(reference(torch_real, torch_fake)), rel=1e-6), kind
    assert float(jnp.mean(losses.generator_loss(jnp.asarray(fake)))) == pytest.approx(-float(torch_fake.mean()), rel=1e-6)


def test_scale_consistency_and_moment_losses_by_hand():
    rng = np.random.default_rng(1)
    student = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    teacher = rng.normal(size=(2, 6, 8, 5)).astype(np.float32)
    up = student.repeat(2, axis=1).repeat(2, axis=2)
    expected = ((up - teacher) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(losses.scale_consistency_loss(jnp.asarray(student), jnp.asarray(teacher)), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="integer factor"):
        losses.scale_consistency_loss(jnp.asarray(student), jnp.asarray(teacher[:, :5]))
    m, lv, rm, rlv = (rng.normal(size=(2, 2, 2, 3)).astype(np.float32) for _ in range(4))
    np.testing.assert_allclose(losses.moment_loss(m, lv, rm, rlv), ((m - rm) ** 2 + (lv - rlv) ** 2).mean(axis=(1, 2, 3)),
                               rtol=1e-6)


def test_with_gradient_keeps_the_value_and_carries_the_gradient():
    x = jnp.asarray([0.3, -1.2, 2.0])
    f = lambda x: jnp.sum(jnp.sin(x) * x)  # noqa: E731
    value, grad, _ = losses.value_and_grad_at(lambda x: (f(x), None), x)
    assert float(losses.with_gradient(value, grad, x)) == float(f(x))
    np.testing.assert_allclose(jax.grad(lambda x: losses.with_gradient(value, grad, x))(x), jax.grad(f)(x), rtol=1e-6)


def test_config_errors_are_clear(stage_config):
    with pytest.raises(ValueError, match=r"config.loss.rec='l2': expected one of \('l1', 'mse'\)"):
        get_task("vae_sga", stage_config(**{"loss.rec": "l2"}))
    with pytest.raises(ValueError, match=r"loss.parts='decoder' freezes the encoder"):
        get_task("vae_sga", stage_config(**{"loss.parts": "decoder"}))
    with pytest.raises(ValueError, match=r"config argument 'moment=f4'"):
        stage_config("moment=f4")
