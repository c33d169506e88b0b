"""Flux VAE against diffusers' AutoencoderKL (random fp32 weights, Flux's structure at tiny width),
BFL-format export against diffusers' own LDM->diffusers converter, the F16 form against a PyTorch
reference modified in the test, and tiled against untiled coding."""

import copy
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from flax import nnx
from safetensors.numpy import load_file, save_file
from safetensors.torch import load_file as torch_load_file

from sga_jax import weights as W
from sga_jax.models import vae
from torch_reference import assert_close_relative, nchw_to_nhwc, nhwc_to_nchw, randomize_

TOL = 1e-4
TINY = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=2,
    latent_channels=8,
    norm_num_groups=32,
    sample_size=32,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A randomised tiny diffusers AutoencoderKL, saved as diffusers saves it."""
    model = randomize_(AutoencoderKL(**TINY), seed=0, scale=0.2)
    path = tmp_path_factory.mktemp("diffusers_vae")
    model.save_pretrained(path, safe_serialization=True)
    return model, path


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    latent = rng.normal(size=(2, 4, 4, 8)).astype(np.float32)
    return image, latent


@functools.partial(jax.jit, static_argnums=(0, 2, 4))
def _apply(graphdef, state, method, x, extra):
    return getattr(nnx.merge(graphdef, state), method)(x, *extra)


def _jit(model: nnx.Module, method: str, *extra):
    """A jitted method call; compiled once per (model structure, method, input shape)."""
    graphdef, state = nnx.split(model)
    return lambda x: jax.tree.map(np.asarray, _apply(graphdef, state, method, jnp.asarray(x), extra))


def _torch_outputs(model: AutoencoderKL, image: np.ndarray, latent: np.ndarray):
    with torch.no_grad():
        dist = model.encode(nhwc_to_nchw(image)).latent_dist
        decoded = model.decode(nhwc_to_nchw(latent) / TINY["scaling_factor"] + TINY["shift_factor"]).sample
    return nchw_to_nhwc(dist.mean), nchw_to_nhwc(dist.logvar), nchw_to_nhwc(decoded)


def _assert_matches(ae: vae.AutoEncoder, torch_model: AutoencoderKL, image, latent, what: str):
    mean, logvar, decoded = _torch_outputs(torch_model, image, latent)
    ours_mean, ours_logvar = _jit(ae, "encode_moments")(image)
    assert_close_relative(ours_mean, mean, TOL, f"{what}: posterior mean")
    assert_close_relative(ours_logvar, logvar, TOL, f"{what}: posterior logvar")
    assert_close_relative(_jit(ae, "encode")(image), TINY["scaling_factor"] * (mean - TINY["shift_factor"]), TOL, f"{what}: encode")
    assert_close_relative(_jit(ae, "decode")(latent), decoded, TOL, f"{what}: decode")


def test_diffusers_dir_matches_diffusers(reference, inputs):
    torch_model, path = reference
    ae = vae.load(path)
    assert ae.config.ch_mult == (1, 2, 2, 2) and ae.config.z_channels == 8 and ae.config.num_res_blocks == 2
    assert (ae.config.scale_factor, ae.config.shift_factor) == (0.3611, 0.1159)
    _assert_matches(ae, torch_model, *inputs, "diffusers dir")


def test_bfl_export_is_what_diffusers_converts_from_ldm(reference, inputs, tmp_path):
    """Our BFL file, converted by diffusers' own LDM->diffusers VAE converter, loads strictly into
    AutoencoderKL and reproduces the original; and it loads back here, also without our metadata."""
    torch_model, path = reference
    ae = vae.load(path)
    files = vae.save(ae, tmp_path / "ae.safetensors", format="bfl")
    assert files == [tmp_path / "ae.safetensors"]
    bfl = torch_load_file(str(files[0]))
    assert "encoder.down.0.block.0.norm1.weight" in bfl and "decoder.up.3.block.2.conv2.weight" in bfl
    assert bfl["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert "decoder.up.0.block.0.nin_shortcut.weight" in bfl and "decoder.up.0.upsample.conv.weight" not in bfl

    converted = convert_ldm_vae_checkpoint(bfl, dict(TINY))
    rebuilt = AutoencoderKL(**TINY).eval()
    rebuilt.load_state_dict(converted, strict=True)
    image, latent = inputs
    for ours, theirs in zip(_torch_outputs(rebuilt, image, latent), _torch_outputs(torch_model, image, latent)):
        np.testing.assert_array_equal(ours, theirs)

    bare = tmp_path / "bare" / "ae.safetensors"
    bare.parent.mkdir()
    save_file(load_file(str(files[0])), str(bare))  # no metadata: config inferred from shapes
    assert vae.infer_config(W.CheckpointReader(bare), "bfl") == dataclasses.replace(ae.config, resolution=256)
    _assert_matches(vae.load(bare, resolution=32), torch_model, *inputs, "BFL file")


def test_diffusers_export_loads_strictly_in_diffusers(reference, inputs, tmp_path):
    torch_model, path = reference
    vae.save(vae.load(path), tmp_path, format="diffusers")
    reloaded, info = AutoencoderKL.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert reloaded.config.scaling_factor == 0.3611 and reloaded.config.shift_factor == 0.1159
    image, latent = inputs
    for ours, theirs in zip(_torch_outputs(reloaded.eval(), image, latent), _torch_outputs(torch_model, image, latent)):
        np.testing.assert_array_equal(ours, theirs)


def _f16_reference(torch_model: AutoencoderKL) -> tuple[AutoencoderKL, dict]:
    """The same weights with Diffusion-4K's change: stride-2 conv_in, nearest 2x before conv_out.
    Also records the input of the decoder's conv_out."""
    model = copy.deepcopy(torch_model)
    model.encoder.conv_in.stride = (2, 2)
    conv_out = model.decoder.conv_out
    model.decoder.conv_out = torch.nn.Sequential(torch.nn.Upsample(scale_factor=2, mode="nearest"), conv_out)
    seen = {}
    conv_out.register_forward_hook(lambda module, args, out: seen.__setitem__("features", args[0]))
    return model, seen


def test_f16_matches_modified_reference(reference, inputs):
    torch_model, path = reference
    ae = vae.load(path, f16=True)
    assert ae.config.downsample_factor == 16
    image, latent = inputs
    f16_torch, seen = _f16_reference(torch_model)
    mean, logvar, decoded = _torch_outputs(f16_torch, image, latent[:, :2, :2])
    ours_mean, ours_logvar = _jit(ae, "encode_moments")(image)
    assert ours_mean.shape == (2, 32 // 16, 32 // 16, 8)
    assert_close_relative(ours_mean, mean, TOL, "F16 mean")
    assert_close_relative(ours_logvar, logvar, TOL, "F16 logvar")
    image_out, features = _jit(ae, "decode", True)(latent[:, :2, :2])
    assert image_out.shape == (2, 32, 32, 3) and features.shape == (2, 32, 32, 32)
    assert_close_relative(image_out, decoded, TOL, "F16 decode")
    assert_close_relative(features, nchw_to_nhwc(seen["features"]), TOL, "F16 decoder features before conv_out")


def test_f8_features_are_conv_out_input(reference, inputs):
    torch_model, path = reference
    seen = {}
    handle = torch_model.decoder.conv_out.register_forward_hook(lambda m, args, out: seen.__setitem__("x", args[0]))
    _, _, decoded = _torch_outputs(torch_model, *inputs)
    handle.remove()
    image_out, features = _jit(vae.load(path), "decode", True)(inputs[1])
    assert_close_relative(image_out, decoded, TOL, "decode with features")
    assert_close_relative(features, nchw_to_nhwc(seen["x"]), TOL, "F8 decoder features")


def test_remat_gradient_matches_torch(reference, inputs):
    torch_model, path = reference
    ae = vae.load(path, remat="full")
    latent = inputs[1][:1]
    weight = np.random.default_rng(3).normal(size=(1, 32, 32, 3)).astype(np.float32)
    z = nhwc_to_nchw(latent).requires_grad_(True)
    out = torch_model.decode(z / TINY["scaling_factor"] + TINY["shift_factor"]).sample
    (out * nhwc_to_nchw(weight)).sum().backward()
    graphdef, state = nnx.split(ae)
    grad = jax.jit(jax.grad(lambda z, s: jnp.sum(nnx.merge(graphdef, s).decode(z) * weight)))(jnp.asarray(latent), state)
    assert_close_relative(grad, nchw_to_nhwc(z.grad), TOL, "d decode / d z under remat")


def test_bfloat16_params_and_compute_stay_close(reference, inputs):
    torch_model, path = reference
    ae = vae.load(path, dtype="bfloat16", param_dtype="bfloat16")
    assert ae.decoder.conv_in.kernel[...].dtype == jnp.bfloat16
    _, _, decoded = _torch_outputs(torch_model, *inputs)
    assert_close_relative(_jit(ae, "decode")(inputs[1]), decoded, 5e-2, "bf16 decode")


def test_posterior_sample_statistics(reference, inputs):
    _, path = reference
    ae = vae.load(path)
    image = inputs[0]
    mean, logvar = _jit(ae, "encode_moments")(image)
    graphdef, state = nnx.split(ae)
    sample = jax.jit(jax.vmap(lambda key, s, x: nnx.merge(graphdef, s).encode(x, rng=key), in_axes=(0, None, None)))
    samples = np.asarray(sample(jax.random.split(jax.random.key(0), 64), state, image))
    noise = (samples / 0.3611 + 0.1159 - mean) / np.exp(0.5 * logvar)
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05, (noise.mean(), noise.std())


def test_load_errors_name_keys_and_shapes(reference, tmp_path):
    _, path = reference
    with pytest.raises(W.CheckpointError, match=r"'decoder\.conv_in\.weight' has shape \(64, 8, 3, 3\), expected \(64, 4, 3, 3\)"):
        vae.load(path, z_channels=4)
    save_file({"foo.weight": np.zeros(3, np.float32)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(W.CheckpointError, match="not a Flux VAE checkpoint"):
        vae.load(tmp_path / "x.safetensors")
    save_file({"quant_conv.weight": np.zeros((16, 16, 1, 1), np.float32)}, str(tmp_path / "sd.safetensors"))
    with pytest.raises(W.CheckpointError, match="quant_conv / post_quant_conv layers"):
        vae.load(tmp_path / "sd.safetensors")
    with pytest.raises(ValueError, match="unknown VAE export format"):
        vae.save(vae.load(path), tmp_path / "y", format="ldm")


def test_prefixed_single_file_loads(reference, inputs, tmp_path):
    torch_model, path = reference
    tensors = {f"vae.{k}": v for k, v in load_file(str(path / "diffusion_pytorch_model.safetensors")).items()}
    tensors["text_encoders.clip.weight"] = np.zeros(2, np.float32)
    save_file(tensors, str(tmp_path / "pipeline.safetensors"))
    _assert_matches(vae.load(tmp_path / "pipeline.safetensors"), torch_model, *inputs, "prefixed file")


def test_config_presets_round_trip_and_validation():
    flux, f16 = vae.AutoEncoderConfig.flux(), vae.AutoEncoderConfig.flux_f16()
    assert (flux.ch, flux.ch_mult, flux.z_channels, flux.downsample_factor) == (128, (1, 2, 4, 4), 16, 8)
    assert f16.downsample_factor == 16 and dataclasses.replace(f16, f16=False) == flux
    assert vae.AutoEncoderConfig.from_dict(json.loads(json.dumps(f16.to_dict()))) == f16
    with pytest.raises(ValueError, match="unknown fields"):
        vae.AutoEncoderConfig.from_dict({"chans": 3})
    with pytest.raises(ValueError, match="not divisible by norm_groups=32"):
        vae.AutoEncoderConfig(ch=48)
    with pytest.raises(ValueError, match="multiples of the downsampling factor 16"):
        vae.AutoEncoderConfig.flux_f16(tile_size=520)
    with pytest.raises(ValueError, match="remat 'some'"):
        vae.AutoEncoderConfig(remat="some")


def test_key_maps_cover_the_real_flux_vae_exactly():
    """At full Flux size, without weights: our diffusers names and shapes are those of diffusers'
    AutoencoderKL with Flux's config, our BFL names are what diffusers' LDM converter reads, and the
    F16 form has the same parameter tree as F8."""
    config = vae.AutoEncoderConfig.flux()
    abstract = lambda c: nnx.state(nnx.eval_shape(lambda: vae.AutoEncoder(c, rngs=nnx.Rngs(0))), nnx.Param)  # noqa: E731
    params = abstract(config)
    with torch.device("meta"):
        flux_torch = AutoencoderKL(**vae.diffusers_config(config))
    theirs = {k: tuple(v.shape) for k, v in flux_torch.state_dict().items()}
    ours = {k: shape for k, (shape, _) in W.export_specs(params, vae.key_map(params, "diffusers", 4)).items()}
    assert ours == theirs
    assert sum(int(np.prod(s)) for s in theirs.values()) == sum(int(np.prod(v.get_value().shape)) for v in W.flat_params(params).values())

    bfl = {k: torch.empty(shape, device="meta") for k, (shape, _) in W.export_specs(params, vae.key_map(params, "bfl", 4)).items()}
    converted = convert_ldm_vae_checkpoint(bfl, vae.diffusers_config(config))
    assert {k: tuple(v.shape) for k, v in converted.items()} == theirs

    f16 = abstract(vae.AutoEncoderConfig.flux_f16())
    shapes = lambda s: {k: v.get_value().shape for k, v in W.flat_params(s).items()}  # noqa: E731
    assert shapes(f16) == shapes(params)


def test_encoder_features_and_the_other_form_share_parameters(reference, inputs):
    """`Encoder(..., return_features=True)` gives diffusers' encoder conv_out input; `in_form(f16=True)`
    of the F8 model is the F16 model on the same parameters."""
    torch_model, path = reference
    image, latent = inputs
    seen = {}
    handle = torch_model.encoder.conv_out.register_forward_hook(lambda m, args, out: seen.__setitem__("x", args[0]))
    mean, logvar, _ = _torch_outputs(torch_model, image, latent)
    handle.remove()
    ae = vae.load(path)
    graphdef, state = nnx.split(ae)
    moments, features = jax.jit(lambda s, x: nnx.merge(graphdef, s).encoder(x, return_features=True))(state, image)
    assert_close_relative(features, nchw_to_nhwc(seen["x"]), TOL, "encoder features before conv_out")
    assert_close_relative(np.asarray(moments)[..., :8], mean, TOL, "moments")

    f16 = ae.in_form(True)
    assert f16.config.f16 and f16.config.downsample_factor == 16 and ae.in_form(False) is ae
    assert f16.encoder.conv_in.kernel is ae.encoder.conv_in.kernel
    np.testing.assert_array_equal(_jit(f16, "encode_moments")(image)[0], _jit(vae.load(path, f16=True), "encode_moments")(image)[0])
