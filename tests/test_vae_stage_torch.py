"""Stage 1's loss against the same formulas written in PyTorch with torch autograd, on the same
random tiny networks nobody here wrote: diffusers' AutoencoderKL (Flux's structure; its F16 form
made as Diffusion-4K does: stride-2 conv_in, nearest x2 before conv_out), taming's
NLayerDiscriminator (the taming-transformers package), the lpips package's LPIPS-VGG16 (random
trunk, its real lin weights) and transformers' Dinov2Model. Both sides load the same files; the
task reads them through its config's weight paths. Checked: every term, lambda_adv and lambda_sga
(gradient-norm ratios at the decoder's and the encoder's conv_out), scale consistency from the two
decoders' features, and the gradients each player gets from the total loss."""

import os

import jax
import jax.numpy as jnp
import lpips as reference_lpips
import numpy as np
import pytest
import torch
import torchvision
import transformers
from diffusers import AutoencoderKL
from safetensors.torch import save_file
from taming.modules.discriminator.model import NLayerDiscriminator as TamingDiscriminator

from sga_jax.train import loop, state as state_lib
from stage1_reference import Stage1Loss, Weights
from torch_reference import assert_close_relative, nhwc_to_nchw, randomize_

IMAGE = 32
LIN = os.path.join(os.path.dirname(reference_lpips.__file__), "weights", "v0.1", "vgg.pth")
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
           latent_channels=16, norm_num_groups=32, sample_size=IMAGE, scaling_factor=0.3611, shift_factor=0.1159,
           use_quant_conv=False, use_post_quant_conv=False)
WEIGHTS = {"lpips": 1.0, "disc": 0.5, "sga": 0.1, "moment": 1.0, "sc": 1.0}  # the config below sets the same


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The four random reference networks, saved as their libraries save them."""
    folder = tmp_path_factory.mktemp("stage1_references")
    ae = randomize_(AutoencoderKL(**VAE), seed=0, scale=0.2)
    ae.save_pretrained(folder / "vae", safe_serialization=True)
    disc = randomize_(TamingDiscriminator(input_nc=3, ndf=8, n_layers=2), seed=1, scale=0.2).train()
    save_file({k: v.contiguous() for k, v in disc.state_dict().items()}, str(folder / "disc.safetensors"))
    torch.manual_seed(2)
    vgg = torchvision.models.vgg16(weights=None).features
    with torch.no_grad():
        for param in vgg.parameters():
            fan_in = param[0].numel() if param.ndim > 1 else 10
            param.copy_(torch.randn_like(param) * (2.0 / fan_in) ** 0.5)
    save_file({f"features.{k}": v.contiguous() for k, v in vgg.state_dict().items()}, str(folder / "vgg16.safetensors"))
    perceptual = reference_lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    perceptual.net.load_state_dict({k: vgg.state_dict()[".".join(k.split(".")[1:])] for k in perceptual.net.state_dict()})
    dino = randomize_(transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=IMAGE,
        patch_size=16)), seed=3, scale=0.2)
    dino.save_pretrained(folder / "dinov2", safe_serialization=True)
    return folder, ae, disc, perceptual.eval(), dino.eval()


@pytest.fixture(scope="module")
def ours(files, stage_config_torch):
    """The task's loss, metrics and gradients on the references' files, for two images."""
    folder = files[0]
    config = stage_config_torch
    config.model.vae.weights = str(folder / "vae")
    config.model.disc.weights = str(folder / "disc.safetensors")
    config.model.prior.weights = str(folder / "dinov2")
    config.model.lpips.trunk, config.model.lpips.lin = str(folder / "vgg16.safetensors"), LIN
    run = loop.build_run(config, jax.devices()[:1])
    state = state_lib.load_pretrained(run.task, state_lib.init_state(run.task, config, run.optimizer, run.setup), run.setup)
    frozen = state_lib.init_frozen(run.task, config, run.setup)
    graphs = run.setup.graphs
    images = np.random.default_rng(4).uniform(-1, 1, (2, IMAGE, IMAGE, 3)).astype(np.float32)

    def loss(params, frozen, images):
        trainable = state_lib.merge_trainable(graphs.trainable, params, frozen, state.model_state)
        return run.task.loss(trainable, state_lib.merge_frozen(graphs, frozen), {"image": images}, jax.random.key(0),
                             step=jnp.int32(1))

    (total, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state.params, frozen, images)
    return images, jax.device_get(state.params), float(total), {k: float(v) for k, v in metrics.items()}, jax.device_get(grads)


@pytest.fixture(scope="module")
def stage_config_torch(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SGA_DEMO_ASSETS", str(tmp_path_factory.mktemp("assets")))
        from configs.demo_vae import get_config

        config = get_config("dinov2")
    config.model.vae.overrides = {}
    config.model.prior.overrides = {}
    config.model.disc.ndf, config.model.disc.n_layers = 8, 2
    config.data.buckets.fixed = f"{IMAGE}x{IMAGE}"
    config.batch_size = 2
    config.align.long_edge = 2  # DINOv2 /16 at 32 px: a 2 x 2 grid, the F16 latent's
    config.loss.decode_latent = "mean"
    config.loss.gan.start = 0
    config.loss.lpips_weight, config.loss.gan.weight = WEIGHTS["lpips"], WEIGHTS["disc"]
    config.loss.moment.weight, config.loss.sc.weight, config.align.weight = WEIGHTS["moment"], WEIGHTS["sc"], WEIGHTS["sga"]
    return config


def _torch_side(files, images, params):
    """Every term, both adaptive weights and the players' gradients, by torch autograd."""
    _, ae, disc, perceptual, dino = files
    head = torch.nn.Conv2d(16, 32, 3, padding=1)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(np.asarray(params["head"]["conv"]["kernel"]).transpose(3, 2, 0, 1).copy()))
        head.bias.copy_(torch.from_numpy(np.asarray(params["head"]["conv"]["bias"])))
    reference = Stage1Loss(ae, disc, perceptual, lambda pixels: dino(pixel_values=pixels).last_hidden_state[:, 1:], head,
                           Weights(**WEIGHTS))
    terms = reference(nhwc_to_nchw(images))
    terms["generator"].backward()
    vae_grads = {name: p.grad.clone() for name, p in reference.student.named_parameters()}
    disc.zero_grad()
    terms["loss_d"].backward()
    terms["loss"] = terms["generator"] + terms["loss_d"]
    return ({k: float(v) for k, v in terms.items()}, vae_grads, head.weight.grad.clone(),
            {name: p.grad.clone() for name, p in disc.named_parameters()})


def test_terms_adaptive_weights_and_gradients_match_torch(files, ours):
    images, params, total, metrics, grads = ours
    terms, vae_grads, head_grad, disc_grads = _torch_side(files, images, params)
    assert metrics["loss_moment"] == 0.0 and terms["loss_moment"] == 0.0  # both start from the same weights
    for name in ("loss_rec", "loss_lpips", "loss_g", "loss_d", "loss_sc", "loss_sga", "lambda_adv", "lambda_sga"):
        assert metrics[name] == pytest.approx(terms[name], rel=2e-4), name
    assert total == pytest.approx(terms["loss"], rel=2e-4)
    conv = lambda t: t.numpy().transpose(2, 3, 1, 0)  # noqa: E731  torch OIHW -> HWIO
    ae = grads["ae"]
    assert_close_relative(ae["decoder"]["conv_out"]["kernel"], conv(vae_grads["decoder.conv_out.weight"]), 1e-3, "decoder conv_out")
    assert_close_relative(ae["decoder"]["up"][0]["block"][0]["conv1"]["kernel"],
                          conv(vae_grads["decoder.up_blocks.3.resnets.0.conv1.weight"]), 1e-3, "decoder up block")
    assert_close_relative(ae["encoder"]["conv_out"]["kernel"], conv(vae_grads["encoder.conv_out.weight"]), 1e-3, "encoder conv_out")
    assert_close_relative(ae["encoder"]["conv_in"]["kernel"], conv(vae_grads["encoder.conv_in.weight"]), 1e-3, "encoder conv_in")
    assert_close_relative(grads["head"]["conv"]["kernel"], conv(head_grad), 1e-3, "SGA head")
    assert_close_relative(grads["disc"]["conv_in"]["kernel"], conv(disc_grads["main.0.weight"]), 1e-3, "discriminator conv_in")
    assert_close_relative(grads["disc"]["blocks"][1]["norm"]["scale"], disc_grads["main.6.weight"].numpy(), 1e-3, "discriminator BN")
