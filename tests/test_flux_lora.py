"""LoRA on Flux against diffusers and PEFT (tiny random models, fp32): LoRA files that diffusers loads
(`load_lora_adapter`, `load_lora_weights`) give the same output in our model after import, for the
diffusers / PEFT, kohya and XLabs layouts, merged and unmerged; the LoRA files we write load in
diffusers with the output of our merged model; the adapters' layout (targets, fused parts, logical
axes, frozen base)."""

import dataclasses
import functools

import jax
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from flax import nnx
from flux_reference import TINY, inputs, ours_args, reference_forward, save_reference, tiny_reference
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import load_file, save_file
from torch_reference import assert_close_relative

from sga_jax.models import flux, nn
from sga_jax.models.flux import lora as flux_lora

H = TINY["num_attention_heads"] * TINY["attention_head_dim"]
MLP = 4 * H
# Every linear module of diffusers' Flux, as PEFT target_modules (suffixes of module names).
ALL_DIFFUSERS_LINEARS = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
    "norm1_context.linear", "proj_mlp", "proj_out", "norm.linear", "norm_out.linear", "x_embedder",
    "context_embedder", "linear_1", "linear_2",
]


@functools.partial(jax.jit, static_argnames="graphdef")
def _forward(graphdef, state, args):
    return nnx.merge(graphdef, state)(*args)


def forward(model: flux.Flux, args: tuple) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.asarray(jax.device_get(_forward(graphdef, state, args)))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny dev model in diffusers' layout, ours loaded from it, and shared inputs."""
    directory = save_reference(tiny_reference(True), tmp_path_factory.mktemp("base"))
    x = inputs()
    return dict(dir=directory, model=flux.load(directory), x=x, args=ours_args(x, True))


def randomize_lora_(model: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    """Every PEFT lora_A / lora_B weight of `model` to seeded normal noise (B is zero after init)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def diffusers_output(lora, x) -> np.ndarray:
    """The tiny dev model's output after diffusers' `FluxPipeline.load_lora_weights(lora)` (a
    directory, where diffusers finds the file by its name, or a .safetensors file's tensors)."""
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=tiny_reference(True))
    pipe.load_lora_weights(str(lora) if lora.is_dir() else load_file(lora))
    return reference_forward(pipe.transformer, x, True)


def peft_lora_file(directory, seed: int = 1) -> None:
    """A random PEFT LoRA on every linear of the tiny Flux (ranks and alphas varying by module),
    saved with diffusers' `FluxPipeline.save_lora_weights` as its training scripts do."""
    model = tiny_reference(True)
    config = LoraConfig(r=4, lora_alpha=6.0, target_modules=ALL_DIFFUSERS_LINEARS,
                        rank_pattern={"proj_mlp": 2, "norm_out.linear": 3}, alpha_pattern={"ff.net.2": 1.5})
    model.add_adapter(config)
    randomize_lora_(model, seed)
    metadata = {k: v for k, v in config.to_dict().items() if k != "peft_type"}
    FluxPipeline.save_lora_weights(directory, transformer_lora_layers=get_peft_model_state_dict(model),
                                   transformer_lora_adapter_metadata=metadata)


def test_peft_lora_loaded_by_diffusers_equals_ours_merged_and_unmerged(base, tmp_path):
    peft_lora_file(tmp_path)
    expected = diffusers_output(tmp_path, base["x"])
    plain = reference_forward(tiny_reference(True), base["x"], True)
    assert np.abs(expected - plain).max() > 0.1 * np.abs(plain).max()  # the LoRA changes the output

    adapters = flux_lora.read(tmp_path, base["model"].config)
    assert {layer for layer, _, _ in adapters} == set(flux_lora.layers(base["model"].config))
    assert adapters[("single_blocks.linear1", 0, "mlp")].rank == 2
    assert adapters[("double_blocks.img_mlp.2", 1, "all")].scale == pytest.approx(1.5 / 4)
    assert_close_relative(forward(flux_lora.merge(base["model"], adapters), base["args"]), expected, what="merged")
    unmerged = flux_lora.attach(base["model"], adapters)
    assert_close_relative(forward(unmerged, base["args"]), expected, what="unmerged")


def random_kohya(bfl: dict[str, np.ndarray], keep, seed: int = 2, rank: int = 3, comfy: bool = False) -> tuple[dict, dict]:
    """A random kohya (sd-scripts) LoRA on the BFL Linear weights `keep(key)` selects, named from
    the BFL keys (`lora_unet_` + module with `_`, or with `comfy` ComfyUI's `diffusion_model.` +
    module), and the BFL weights with it merged by the layout's
    definition, W + alpha / rank * up @ down (what ComfyUI applies). Fused qkv modules get one shared
    down projection, except double block 1's image qkv: the block-diagonal form of split q/k/v."""
    rng = np.random.default_rng(seed)
    tensors, merged = {}, dict(bfl)
    for key, weight in bfl.items():
        if not (key.endswith(".weight") and weight.ndim == 2 and keep(key)):
            continue
        module = key.removesuffix(".weight")
        name = f"diffusion_model.{module}" if comfy else "lora_unet_" + module.replace(".", "_")
        out_features, in_features = weight.shape
        if key == "double_blocks.1.img_attn.qkv.weight":
            down = rng.normal(size=(3 * rank, in_features)) * 0.3
            up = np.zeros((out_features, 3 * rank))
            for p in range(3):
                up[p * H : (p + 1) * H, p * rank : (p + 1) * rank] = rng.normal(size=(H, rank)) * 0.3
        else:
            down = rng.normal(size=(rank, in_features)) * 0.3
            up = rng.normal(size=(out_features, rank)) * 0.3
        alpha = rng.uniform(1.0, 6.0)
        tensors[f"{name}.lora_down.weight"] = torch.from_numpy(down.astype(np.float32))
        tensors[f"{name}.lora_up.weight"] = torch.from_numpy(up.astype(np.float32))
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        merged[key] = (weight + alpha / down.shape[0] * up @ down).astype(np.float32)
    return tensors, merged


@pytest.fixture(scope="module")
def bfl(base, tmp_path_factory):
    """The base model's weights in BFL's layout."""
    file = tmp_path_factory.mktemp("bfl") / "flux.safetensors"
    flux.save(base["model"], file, format="bfl")
    return {k: v.astype(np.float32) for k, v in np_load_file(file).items()}


def test_kohya_lora_loaded_by_diffusers_equals_ours(base, bfl, tmp_path):
    """diffusers' kohya converter applies the double and single blocks' modules except linear1 (it
    hard-codes Flux.1's widths there, and drops the embedders' and final layer's keys)."""
    blocks = lambda key: key.startswith(("double_blocks", "single_blocks")) and "linear1" not in key  # noqa: E731
    tensors, _ = random_kohya(bfl, blocks)
    file = tmp_path / "kohya.safetensors"
    save_file(tensors, file)
    expected = diffusers_output(file, base["x"])
    adapters = flux_lora.read(file, base["model"].config)
    split = [p for (layer, i, p) in adapters if layer == "double_blocks.img_attn.qkv" and i == 1]
    assert sorted(split) == ["k", "q", "v"] and adapters[("double_blocks.img_attn.qkv", 1, "q")].rank == 3
    assert_close_relative(forward(flux_lora.merge(base["model"], adapters), base["args"]), expected, what="merged")
    assert_close_relative(forward(flux_lora.attach(base["model"], adapters), base["args"]), expected, what="unmerged")


@pytest.mark.parametrize("comfy", [False, True], ids=["kohya", "comfyui"])
def test_kohya_lora_on_every_module_is_the_bfl_weight_plus_scaled_up_down(base, bfl, tmp_path, comfy):
    """Every BFL Linear (linear1's four parts, embedders, final layer included) against the
    layout's definition, run by our Flux from the merged BFL file (which test_flux checks against
    diffusers), in kohya's and ComfyUI's spelling."""
    tensors, merged = random_kohya(bfl, lambda key: True, comfy=comfy)
    file = tmp_path / "kohya.safetensors"
    save_file(tensors, file)
    np_save_file(merged, tmp_path / "merged.safetensors")
    expected = forward(flux.load(tmp_path / "merged.safetensors", base["model"].config), base["args"])
    adapters = flux_lora.read(file, base["model"].config)
    assert len({layer for layer, _, _ in adapters}) == len(flux_lora.layers(base["model"].config))
    assert sorted({p for layer, _, p in adapters if layer == "single_blocks.linear1"}) == ["k", "mlp", "q", "v"]
    assert_close_relative(forward(flux_lora.merge(base["model"], adapters), base["args"]), expected)


def test_xlabs_lora_loaded_by_diffusers_equals_ours(base, tmp_path):
    rng = np.random.default_rng(3)
    tensors = {}
    for template, layer in flux_lora.XLABS.items():
        depth = TINY["num_layers"] if template.startswith("double") else TINY["num_single_layers"]
        out_features = 3 * H if "qkv" in template else H
        in_features = H + MLP if layer == "single_blocks.linear2" else H
        for i in range(depth):
            module = template.format(i=i)
            tensors[f"{module}.down.weight"] = torch.from_numpy(rng.normal(size=(2, in_features)).astype(np.float32) * 0.3)
            tensors[f"{module}.up.weight"] = torch.from_numpy(rng.normal(size=(out_features, 2)).astype(np.float32) * 0.3)
    file = tmp_path / "xlabs.safetensors"
    save_file(tensors, file)
    expected = diffusers_output(file, base["x"])
    adapters = flux_lora.read(file, base["model"].config)
    assert not any(p == "mlp" for _, _, p in adapters)  # XLabs' qkv LoRA covers linear1's first three parts
    assert_close_relative(forward(flux_lora.merge(base["model"], adapters), base["args"]), expected)


def lora_model(model: flux.Flux, targets=flux_lora.DEFAULT_TARGETS, seed: int = 4, alpha: float = 6.0) -> flux.Flux:
    """`model` with rank-4 adapters on `targets`, A and B random."""
    config = dataclasses.replace(model.config, lora=nn.LoRAConfig(rank=4, alpha=alpha, targets=targets))
    graphdef, adapters, frozen = nnx.split(flux.abstract_model(config), nnx.LoRAParam, nn.Frozen)
    nnx.replace_by_pure_dict(frozen, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    rng = np.random.default_rng(seed)
    noisy = jax.tree.map(lambda x: 0.3 * rng.normal(size=x.shape).astype(np.float32), nnx.to_pure_dict(adapters))
    nnx.replace_by_pure_dict(adapters, noisy)
    return nnx.merge(graphdef, adapters, frozen)


def test_our_diffusers_export_loads_in_diffusers_with_our_merged_output(base, tmp_path):
    trained = lora_model(base["model"], targets=flux_lora.DEFAULT_TARGETS + (r"final_layer\..*", "img_in"))
    ours = forward(flux_lora.merged(trained), base["args"])
    np.testing.assert_allclose(forward(trained, base["args"]), ours, rtol=1e-5, atol=1e-5)
    file = flux_lora.write(flux_lora.from_model(trained), trained.config, tmp_path, "diffusers")
    assert file.name == "pytorch_lora_weights.safetensors"
    assert_close_relative(ours, diffusers_output(tmp_path, base["x"]))


def test_our_kohya_export_loads_in_diffusers_and_reads_back(base, tmp_path):
    no_linear1 = (r"double_blocks\..*", r"single_blocks\.(linear2|modulation\.lin)")
    trained = lora_model(base["model"], targets=no_linear1)
    file = flux_lora.write(flux_lora.from_model(trained), trained.config, tmp_path, "kohya")
    assert_close_relative(forward(trained, base["args"]), diffusers_output(file, base["x"]))

    full = lora_model(base["model"])  # linear1's q, k, v too: block-diagonal, read back exactly
    again = flux_lora.read(flux_lora.write(flux_lora.from_model(full), full.config, tmp_path / "k.safetensors", "kohya"),
                           full.config)
    assert_close_relative(forward(flux_lora.attach(base["model"], again), base["args"]), forward(full, base["args"]))


def test_default_targets_layout_axes_and_frozen_base(base):
    model = lora_model(base["model"], alpha=8.0)
    adapted = dict(nn.adapted_layers(model))
    assert sorted(adapted) == sorted(
        [f"double_blocks.{s}_{m}" for s in ("img", "txt") for m in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")]
        + ["single_blocks.linear1"])
    assert sorted(adapted["single_blocks.linear1"].lora) == ["k", "q", "v"]  # not the mlp part (diffusers' default)
    assert adapted["double_blocks.img_attn.qkv"].scale == 2.0
    params = nnx.state(model, nnx.Param)
    assert all(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(params))
    frozen = nnx.to_pure_dict(nnx.state(model, nn.Frozen))
    assert jax.tree.structure(frozen) == jax.tree.structure(nnx.to_pure_dict(nnx.state(base["model"], nnx.Param)))
    axes = {".".join(map(str, p)): v.get_metadata()["out_sharding"] for p, v in nnx.to_flat_state(params)}
    assert axes["double_blocks.img_attn.qkv.lora.q.a"] == ("layers", "embed", None)
    assert axes["double_blocks.img_attn.qkv.lora.q.b"] == ("layers", None, "heads")
    assert axes["double_blocks.img_mlp.2.lora.all.a"] == ("layers", "mlp", None)
    fused = nn.linear(8, 12, rngs=nnx.Rngs(0), lora=model.config.lora, name="single_blocks.linear1",
                      parts=(("q", 2), ("k", 2), ("v", 2), ("mlp", 6)))
    assert sorted(fused.lora) == ["k", "q", "v"] and fused.lora["q"].a.shape == (8, 4)
    assert np.all(np.asarray(fused.lora["q"].b[...]) == 0) and np.std(np.asarray(fused.lora["q"].a[...])) > 0.1
    x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    plain = np.asarray(x @ fused.kernel[...] + fused.bias[...])
    np.testing.assert_allclose(np.asarray(fused(x)), plain, rtol=1e-6)  # B = 0: starts as the base


def test_rank_zero_model_is_unchanged_and_bad_targets_fail(base):
    config = base["model"].config
    assert config.lora is None and not list(nn.adapted_layers(base["model"]))
    with pytest.raises(ValueError, match="match no layer"):
        flux.abstract_model(dataclasses.replace(config, lora=nn.LoRAConfig(rank=2, targets=("no_such_layer",))))
    with pytest.raises(ValueError, match="rank"):
        nn.LoRAConfig(rank=0, targets=(".*",))
    lora = dataclasses.replace(config, lora=nn.LoRAConfig(rank=2, alpha=3.0, targets=flux_lora.DEFAULT_TARGETS))
    assert flux.FluxConfig.from_dict(lora.to_dict()) == lora
