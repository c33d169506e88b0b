"""The PatchGAN discriminator against taming-transformers' own NLayerDiscriminator (the PyPI
package `taming-transformers` 0.0.1, imported as the oracle; see requirements-dev-nodeps.txt) on the
same random weights, in the training mode stage 1 uses (batch statistics), and its checkpoint names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file
from taming.modules.discriminator.model import NLayerDiscriminator as TamingDiscriminator
from taming.modules.discriminator.model import weights_init

from sga_jax import weights as W
from sga_jax.models import discriminator
from torch_reference import assert_close_relative, nchw_to_nhwc, nhwc_to_nchw, randomize_


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """taming's discriminator (ndf 16, 3 layers) with every parameter random, saved as safetensors
    the way a converted training checkpoint holds it (under `loss.discriminator.`)."""
    model = randomize_(TamingDiscriminator(input_nc=3, ndf=16, n_layers=3), seed=0, scale=0.2).train()
    path = tmp_path_factory.mktemp("disc") / "disc.safetensors"
    tensors = {f"loss.discriminator.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors["loss.perceptual_loss.lin0.model.1.weight"] = torch.zeros(1, 64, 1, 1)  # another module's key
    save_file(tensors, str(path))
    return model, path


def _jit_forward(model):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)), state


def test_matches_taming_in_training_mode(reference):
    torch_model, path = reference
    ours = discriminator.load(path)
    assert ours.config == discriminator.PatchGANConfig(ndf=16, n_layers=3)
    images = np.random.default_rng(0).uniform(-1, 1, (3, 64, 48, 3)).astype(np.float32)
    x = nhwc_to_nchw(images).requires_grad_(True)
    logits = torch_model(x)
    weight = np.random.default_rng(1).normal(size=nchw_to_nhwc(logits).shape).astype(np.float32)
    (logits * nhwc_to_nchw(weight)).sum().backward()

    forward, state = _jit_forward(ours)
    ours_logits = forward(state, jnp.asarray(images))
    assert ours_logits.shape == (3, 6, 4, 1)  # k4 s2 p1 three times, then k4 s1 p1 twice
    assert_close_relative(ours_logits, nchw_to_nhwc(logits), 1e-4, "logits (batch statistics)")

    graphdef, params = nnx.split(ours)
    grad_x, grad_params = jax.jit(jax.grad(
        lambda x, p: jnp.sum(nnx.merge(graphdef, p)(x) * weight), argnums=(0, 1)))(jnp.asarray(images), params)
    assert_close_relative(grad_x, nchw_to_nhwc(x.grad), 1e-4, "d logits / d images")
    grads = nnx.to_pure_dict(grad_params)
    torch_grads = dict(torch_model.named_parameters())
    assert_close_relative(grads["blocks"][1]["norm"]["scale"], torch_grads["main.6.weight"].grad.numpy(), 1e-4, "BN scale grad")
    assert_close_relative(grads["conv_in"]["kernel"], torch_grads["main.0.weight"].grad.numpy().transpose(2, 3, 1, 0),
                          1e-4, "first conv kernel grad")


def test_default_architecture_and_initialisation_follow_taming():
    taming = TamingDiscriminator().apply(weights_init)
    ours = discriminator.NLayerDiscriminator(discriminator.PatchGANConfig(), rngs=nnx.Rngs(0))
    torch_shapes = sorted(tuple(v.shape) for k, v in taming.state_dict().items() if not k.endswith(discriminator.convert.RUNNING_STATS))
    ours_shapes = sorted(tuple(np.asarray(v).transpose(3, 2, 0, 1).shape) if np.ndim(v) == 4 else np.shape(v)
                         for v in jax.tree.leaves(nnx.to_pure_dict(nnx.state(ours, nnx.Param))))
    assert ours_shapes == torch_shapes
    assert ours(jnp.zeros((1, 256, 256, 3))).shape == (1, 30, 30, 1)
    kernel = np.asarray(ours.blocks[2].conv.kernel[...])
    assert abs(kernel.std() - 0.02) < 0.002 and abs(kernel.mean()) < 0.002
    scale = np.asarray(ours.blocks[2].norm.scale[...])
    assert abs(scale.mean() - 1.0) < 0.01 and 0.01 < scale.std() < 0.03
    assert ours.blocks[0].conv.bias is None and ours.conv_in.bias is not None


def test_checkpoint_errors_name_what_is_wrong(tmp_path):
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(W.CheckpointError, match="no taming discriminator"):
        discriminator.load(tmp_path / "x.safetensors")
    tensors = {k: v for k, v in TamingDiscriminator(ndf=8).state_dict().items()}
    tensors["main.3.weight"] = torch.zeros(7)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(W.CheckpointError, match=r"'main.3.weight' has shape \(7,\), expected \(16,\)"):
        discriminator.load(tmp_path / "bad.safetensors")
