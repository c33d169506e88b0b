"""Flux transformer against diffusers' FluxTransformer2DModel: parity, weights both ways, hidden tap."""

import functools
import json

import jax
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from flax import nnx
from flux_reference import inputs, ours_args, reference_forward, save_reference, tiny_reference
from safetensors.numpy import load_file, save_file
from safetensors.torch import load_file as torch_load_file
from torch_reference import assert_close_relative, to_numpy

from sga_jax import convert
from sga_jax import weights as W
from sga_jax.models import flux


@functools.partial(jax.jit, static_argnames=("graphdef", "hidden_block"))
def _forward(graphdef, state, args, hidden_block=None):
    return nnx.merge(graphdef, state)(*args, hidden_block=hidden_block)


def forward(model: flux.Flux, args: tuple, hidden_block: int | None = None):
    graphdef, state = nnx.split(model)
    return jax.device_get(_forward(graphdef, state, args, hidden_block=hidden_block))


def _reference(guidance: bool, tmp_path_factory) -> dict:
    model = tiny_reference(guidance)
    directory = save_reference(model, tmp_path_factory.mktemp("diffusers"))
    x = inputs()
    return dict(model=model, dir=directory, guidance=guidance, x=x, out=reference_forward(model, x, guidance))


@pytest.fixture(scope="module", params=[True, False], ids=["guidance", "no_guidance"])
def reference(request, tmp_path_factory):
    """The tiny model with the guidance embedding (dev) and without (schnell)."""
    return _reference(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    """The tiny model with the guidance embedding only, for the export paths."""
    return _reference(True, tmp_path_factory)


def test_diffusers_checkpoint_matches_and_hidden_tap_equals_block_output(reference):
    model = flux.load(reference["dir"])
    assert model.config.guidance_embed == reference["guidance"]
    assert model.config.depth == 2 and model.config.depth_single_blocks == 3

    tapped = {}
    block = 1

    def hook(module, args, output):
        tapped["img"] = to_numpy(output[1])  # diffusers blocks return (text, image)

    handle = reference["model"].transformer_blocks[block].register_forward_hook(hook)
    try:
        reference_forward(reference["model"], reference["x"], reference["guidance"])
    finally:
        handle.remove()

    args = ours_args(reference["x"], reference["guidance"])
    out, hidden = forward(model, args, hidden_block=block)
    assert_close_relative(out, reference["out"], 1e-4, "flux output")
    assert_close_relative(hidden, tapped["img"], 1e-4, f"hidden state after double block {block}")
    hidden0 = forward(model, args, hidden_block=0)[1]
    assert np.abs(hidden0 - tapped["img"]).max() > 1e-3, "block 0 and block 1 taps should differ"


def test_bfl_export_loads_back_with_same_outputs(reference, tmp_path):
    model = flux.load(reference["dir"])
    files = flux.save(model, tmp_path / "flux.safetensors", format="bfl")
    tensors = load_file(str(files[0]))
    assert "double_blocks.1.img_attn.qkv.weight" in tensors
    assert tensors["double_blocks.1.img_attn.qkv.weight"].shape == (96, 32)
    assert tensors["single_blocks.2.linear1.weight"].shape == (3 * 32 + 128, 32)
    assert ("guidance_in.in_layer.weight" in tensors) == reference["guidance"]
    # BFL's (shift, scale) order is diffusers' (scale, shift) swapped: check against the source.
    theirs = load_file(str(reference["dir"] / "diffusion_pytorch_model.safetensors"))["norm_out.linear.weight"]
    np.testing.assert_array_equal(tensors["final_layer.adaLN_modulation.1.weight"], np.concatenate([theirs[32:], theirs[:32]]))

    # ComfyUI-style files carry a prefix and no config: config comes from shapes (+ axes_dim).
    prefixed = tmp_path / "prefixed.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in tensors.items()}, str(prefixed))
    with pytest.raises(ValueError, match="axes_dim cannot be inferred"):
        flux.load(prefixed)
    for path, extra in ((files[0], {}), (prefixed, {"axes_dim": (4, 6, 6)})):
        reloaded = flux.load(path, **extra)
        assert reloaded.config == model.config
        out = forward(reloaded, ours_args(reference["x"], reference["guidance"]))
        assert_close_relative(out, reference["out"], 1e-4, f"flux output via BFL file {path.name}")


def test_diffusers_export_loads_strict_in_diffusers(dev, tmp_path):
    model = flux.load(dev["dir"], param_dtype="float32")
    flux.save(model, tmp_path / "out", format="diffusers", max_shard_bytes=40_000)
    assert (tmp_path / "out" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    sharded = flux.load(tmp_path / "out")  # and we read the sharded directory back through its index
    for ours, theirs in zip(jax.tree.leaves(nnx.state(sharded, nnx.Param)), jax.tree.leaves(nnx.state(model, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    again = FluxTransformer2DModel.from_pretrained(tmp_path / "out")
    out = reference_forward(again.eval(), dev["x"], dev["guidance"])
    assert_close_relative(out, dev["out"], 1e-6, "diffusers output after our export")

    strict = FluxTransformer2DModel(**{k: v for k, v in again.config.items() if not k.startswith("_")})
    state = {}
    for name in sorted((tmp_path / "out").glob("*.safetensors")):
        state.update(torch_load_file(str(name)))
    strict.load_state_dict(state, strict=True)
    for key, value in dev["model"].state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


def test_convert_cli_to_orbax_and_back_to_diffusers(dev, tmp_path):
    assert convert.main(["flux", str(dev["dir"]), str(tmp_path / "orbax")]) == 0
    assert convert.main(["flux", str(tmp_path / "orbax"), str(tmp_path / "out"), "--export", "diffusers"]) == 0
    again = FluxTransformer2DModel.from_pretrained(tmp_path / "out")
    out = reference_forward(again.eval(), dev["x"], dev["guidance"])
    assert_close_relative(out, dev["out"], 1e-6, "diffusers output after orbax round trip")


def test_streaming_convert_between_formats(dev, tmp_path):
    bfl = flux.convert_file(dev["dir"], tmp_path / "bfl.safetensors", "bfl")
    back = flux.convert_file(bfl[0], tmp_path / "diffusers", "diffusers")
    assert back[0].name == "diffusion_pytorch_model.safetensors"
    state = torch_load_file(str(back[0]))
    expected = dev["model"].state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


def test_remat_attention_and_bf16_settings_still_match(dev):
    x = dev["x"]
    args = ours_args(x, dev["guidance"])
    remat = flux.load(dev["dir"], remat="dots")
    assert_close_relative(forward(remat, args), dev["out"], 1e-4, "flux output with remat=dots")
    unchunked = flux.load(dev["dir"], attention="xla")
    assert_close_relative(forward(unchunked, args), dev["out"], 1e-4, "flux output with attention=xla")
    half = flux.load(dev["dir"], dtype="bfloat16", param_dtype="bfloat16")
    assert half.img_in.kernel[...].dtype == np.dtype("bfloat16")
    out = forward(half, args)
    assert out.dtype == np.dtype("bfloat16")
    assert_close_relative(out.astype(np.float32), dev["out"], 5e-2, "bf16 flux output")


def test_param_count_equals_diffusers_dev_on_meta_device():
    with torch.device("meta"):
        dev = FluxTransformer2DModel(guidance_embeds=True)
        schnell = FluxTransformer2DModel(guidance_embeds=False)
    assert flux.param_count(flux.FluxConfig.dev()) == sum(p.numel() for p in dev.parameters())
    assert flux.param_count(flux.FluxConfig.schnell()) == sum(p.numel() for p in schnell.parameters())


def test_bad_checkpoints_raise_errors_naming_the_key(dev, tmp_path):
    model = flux.load(dev["dir"])
    flux.save(model, tmp_path / "good.safetensors")
    tensors = load_file(str(tmp_path / "good.safetensors"))
    metadata = {"sga_jax.flux_config": json.dumps(model.config.to_dict())}

    wrong = dict(tensors, **{"double_blocks.1.img_mod.lin.weight": np.zeros((190, 32), np.float32)})
    save_file(wrong, str(tmp_path / "wrong.safetensors"), metadata=metadata)
    with pytest.raises(W.CheckpointError, match=r"'double_blocks\.1\.img_mod\.lin\.weight' has shape \(190, 32\), expected \(192, 32\)"):
        flux.load(tmp_path / "wrong.safetensors")

    missing = {k: v for k, v in tensors.items() if k != "single_blocks.2.linear2.bias"}
    missing["extra.weight"] = np.zeros(2, np.float32)
    save_file(missing, str(tmp_path / "missing.safetensors"), metadata=metadata)
    with pytest.raises(W.CheckpointError, match=r"missing 1 tensors: single_blocks\.2\.linear2\.bias[\s\S]*unexpected 1 tensors: extra\.weight"):
        flux.load(tmp_path / "missing.safetensors")

    torch.save({"model.diffusion_model." + k: torch.from_numpy(v) for k, v in tensors.items()}, tmp_path / "flux1-dev.ckpt")
    from_pickle = flux.load(tmp_path / "flux1-dev.ckpt", model.config)  # a pickle carries no config metadata
    for a, b in zip(jax.tree.leaves(nnx.state(from_pickle, nnx.Param)), jax.tree.leaves(nnx.state(model, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    (tmp_path / "broken.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(W.CheckpointError, match=r"broken\.ckpt: not a readable PyTorch checkpoint"):
        flux.load(tmp_path / "broken.ckpt")
    save_file({"foo.weight": np.zeros(2, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(W.CheckpointError, match="not a Flux transformer checkpoint"):
        flux.load(tmp_path / "other.safetensors")


def test_config_validation_and_json_round_trip():
    config = flux.FluxConfig.schnell(dtype="bfloat16", remat="full")
    assert flux.FluxConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert flux.FluxConfig.dev().guidance_embed and not config.guidance_embed
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        flux.FluxConfig(hidden_size=100, num_heads=24)
    with pytest.raises(ValueError, match=r"sum\(axes_dim\).*must equal the head dimension"):
        flux.FluxConfig(axes_dim=(16, 56, 48))
    with pytest.raises(ValueError, match="positive and even"):
        flux.FluxConfig(axes_dim=(15, 57, 56))
    with pytest.raises(ValueError, match="remat policy|remat"):
        flux.FluxConfig(remat="sometimes")
    with pytest.raises(ValueError, match="unknown fields"):
        flux.FluxConfig.from_dict({"hidden": 3})
    model = flux.abstract_model(flux.FluxConfig(hidden_size=32, num_heads=2, axes_dim=(4, 6, 6), depth=2, depth_single_blocks=1))
    with pytest.raises(ValueError, match="pass guidance"):
        model(np.zeros((1, 4, 64)), np.zeros((4, 3)), np.zeros((1, 2, 4096)), np.zeros((2, 3)), np.zeros(1), np.zeros((1, 768)))
