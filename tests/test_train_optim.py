"""The optimizer against torch.optim.AdamW with clip_grad_norm_ and per-group weight decay."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from sga_jax.train.config import base_config
from sga_jax.train.optim import decay_mask, make_optimizer


def test_decay_mask_skips_vectors_and_named_parameters():
    params = {"dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)},
              "embedding": {"table": jnp.zeros((5, 2))}, "norm": {"scale": jnp.zeros(2)}}
    mask = decay_mask(params, ("embedding",))
    assert mask == {"dense": {"kernel": True, "bias": False}, "embedding": {"table": False}, "norm": {"scale": False}}


def test_adamw_with_clipping_and_mask_matches_torch():
    cfg = base_config().optimizer
    cfg.learning_rate, cfg.weight_decay, cfg.grad_clip_norm = 1e-2, 0.1, 1.0
    cfg.b1, cfg.b2, cfg.eps = 0.8, 0.95, 1e-6
    optimizer, _ = make_optimizer(cfg, total_steps=10)

    rng = np.random.default_rng(0)
    shapes = {"dense/kernel": (5, 4), "dense/bias": (4,), "embedding/table": (6, 4), "norm/scale": (4,)}
    init = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
             for scale in (0.05, 3.0, 0.2, 5.0)]  # some steps clip, some do not

    def nest(flat):
        out = {}
        for key, value in flat.items():
            a, b = key.split("/")
            out.setdefault(a, {})[b] = jnp.asarray(value)
        return out

    params = nest(init)
    opt_state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    for g in grads:
        updates, opt_state = update(nest(g), opt_state, params)
        params = optax.apply_updates(params, updates)

    torch_params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in init.items()}
    decayed = [torch_params["dense/kernel"]]
    others = [p for k, p in torch_params.items() if k != "dense/kernel"]
    reference = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
        lr=1e-2, betas=(0.8, 0.95), eps=1e-6,
    )
    for g in grads:
        for k, p in torch_params.items():
            p.grad = torch.tensor(g[k])
        torch.nn.utils.clip_grad_norm_(list(torch_params.values()), 1.0)
        reference.step()

    for key, p in torch_params.items():
        a, b = key.split("/")
        np.testing.assert_allclose(np.asarray(params[a][b]), p.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=key)


def test_parameter_groups_match_one_torch_adamw_per_group():
    """Two players with their own learning rate, betas, weight decay, clipping and start step, plus
    a frozen part, in one optax state: each group equals its own torch.optim.AdamW (clipped apart)."""
    cfg = base_config().optimizer
    cfg.learning_rate, cfg.weight_decay, cfg.grad_clip_norm = 1e-2, 0.1, 1.0
    cfg.groups = {"disc": {"learning_rate": 3e-2, "b1": 0.5, "b2": 0.9, "weight_decay": 0.0,
                           "grad_clip_norm": 0.5, "start_step": 2}}
    labels = {"gen": "default", "disc": "disc", "teacher": "frozen"}
    optimizer, schedules = make_optimizer(cfg, total_steps=10, labels=labels)
    assert sorted(schedules) == ["default", "disc"]
    np.testing.assert_allclose([float(schedules["disc"](s)) for s in (0, 1, 2, 5)], [0.0, 0.0, 3e-2, 3e-2], rtol=1e-6)

    rng = np.random.default_rng(1)
    init = {name: rng.standard_normal((4, 3)).astype(np.float32) for name in labels}
    grads = [{name: (scale * rng.standard_normal((4, 3))).astype(np.float32) for name in labels} for scale in (0.1, 4.0, 0.3, 6.0, 1.0)]
    params = {k: jnp.asarray(v) for k, v in init.items()}
    opt_state = optimizer.init(params)
    for g in grads:
        updates, opt_state = jax.jit(optimizer.update)({k: jnp.asarray(v) for k, v in g.items()}, opt_state, params)
        params = optax.apply_updates(params, updates)

    def torch_run(name, lr, betas, decay, clip, start):
        p = torch.nn.Parameter(torch.tensor(init[name]))
        opt = torch.optim.AdamW([p], lr=lr, betas=betas, eps=1e-8, weight_decay=decay)
        for step, g in enumerate(grads):
            p.grad = torch.tensor(g[name])
            torch.nn.utils.clip_grad_norm_([p], clip)
            for group in opt.param_groups:
                group["lr"] = lr if step >= start else 0.0
            opt.step()
        return p.detach().numpy()

    np.testing.assert_allclose(params["gen"], torch_run("gen", 1e-2, (0.9, 0.999), 0.1, 1.0, 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(params["disc"], torch_run("disc", 3e-2, (0.5, 0.9), 0.0, 0.5, 2), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(params["teacher"], init["teacher"])


def test_unknown_group_label_and_key_are_named():
    cfg = base_config().optimizer
    with pytest.raises(ValueError, match=r"parameter 'w' has label 'disc'.*config.optimizer.groups.disc"):
        make_optimizer(cfg, total_steps=10, labels={"w": "disc"})
    cfg.groups = {"disc": {"betas": (0.5, 0.9)}}
    with pytest.raises(ValueError, match=r"config.optimizer.groups.disc: unknown keys \['betas'\]"):
        make_optimizer(cfg, total_steps=10, labels={"w": "disc"})
