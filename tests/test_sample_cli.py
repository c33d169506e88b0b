"""`python -m sga_jax.sample`: prompts -> PNG files from a Flux.1 folder of tiny random networks
(BFL single-file VAE, diffusers-layout transformer, transformers-layout text encoders)."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from sga_jax import sample
from sga_jax.demo import CAPTIONS
from sga_jax.sample.__main__ import main
from sga_jax.models import flux, vae
from sga_jax.errors import CheckpointError
from sga_jax.text import build_demo_text_folder

PROMPTS = ["a rocket on its launch pad", "a cup of coffee on a wooden table", "a ginger tabby cat"]


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("FLUX.1-tiny")
    build_demo_text_folder(root, CAPTIONS.values())
    config = dataclasses.replace(flux.FluxConfig.dev(), hidden_size=64, num_heads=2, axes_dim=(8, 12, 12), depth=1,
                                 depth_single_blocks=1, context_in_dim=32, vec_in_dim=32)
    flux.save(flux.Flux(config, rngs=nnx.Rngs(0)), root / "transformer", format="diffusers")
    ae_config = dataclasses.replace(vae.AutoEncoderConfig.flux(), ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)
    vae.save(vae.AutoEncoder(ae_config, rngs=nnx.Rngs(1)), root / "ae.safetensors", format="bfl")
    return root


def test_cli_writes_one_png_per_prompt_independent_of_batch_size(flux_folder, tmp_path):
    args = ["--root", str(flux_folder), "--height", "48", "--width", "80", "--steps", "2", "--dtype", "float32",
            "--seed", "7"]
    assert main(args + ["--out", str(tmp_path / "one"), "--batch_size", "1"]
                       + [a for p in PROMPTS for a in ("--prompt", p)]) == 0
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n\n")
    assert main(args + ["--out", str(tmp_path / "two"), "--batch_size", "2", "--prompts_file", str(prompts_file)]) == 0

    records = [json.loads(line) for line in (tmp_path / "one" / "index.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == PROMPTS
    assert records[0]["file"] == "000-a-rocket-on-its-launch.png" and records[0]["steps"] == 2
    for record in records:
        one = np.asarray(Image.open(tmp_path / "one" / record["file"]))
        two = np.asarray(Image.open(tmp_path / "two" / record["file"]))
        assert one.shape == (48, 80, 3) and one.dtype == np.uint8
        np.testing.assert_allclose(one.astype(int), two.astype(int), atol=1)
        assert one.std() > 0
    first, second = (np.asarray(Image.open(tmp_path / "one" / r["file"]), float) for r in records[:2])
    assert np.abs(first - second).mean() > 1.0, "different prompts and noise should give different images"


def test_generate_equals_the_sampler_and_decoder_composed(flux_folder):
    model, ae, text_encoder = sample.load_flux_folder(flux_folder, dtype="float32", vae_f16=True)
    assert text_encoder.t5_length == 512  # a guidance-distilled (dev) model
    assert ae.config.downsample_factor == 16
    images = np.concatenate(list(sample.generate(model, ae, text_encoder, PROMPTS[:1], height=64, width=64, steps=3,
                                                 seed=3)))
    assert images.shape == (1, 64, 64, 3)
    txt, txt_ids, vec = text_encoder(PROMPTS[:1])
    factor = ae.config.downsample_factor
    latents = sample.noise(jax.random.fold_in(jax.random.key(3), 0), 1, 64, 64, 16, factor)
    expected = sample.decode_images(ae, sample.sample_latents(model, txt, vec, height=64, width=64, steps=3,
                                                              latents=latents, txt_ids=txt_ids, vae_factor=factor))
    np.testing.assert_allclose(images, np.asarray(expected), atol=1e-5)


def test_missing_weights_are_named(tmp_path, capsys):
    with pytest.raises(CheckpointError, match=r"holds no Flux transformer \(looked for sga_config.json, flux1-dev"):
        sample.load_flux_folder(tmp_path)
    assert main(["--root", str(tmp_path), "--out", str(tmp_path / "out")]) == 2  # no --prompt
    assert capsys.readouterr().err.startswith("error: give at least one --prompt")


def test_lora_is_sampled_merged_or_unmerged_at_its_scale(flux_folder, tmp_path):
    """A kohya LoRA on every layer: merged and unmerged give the same velocities, scale 0 gives the
    base model, and the command line samples with it."""
    from sga_jax.models import nn
    from sga_jax.models.flux import lora as flux_lora

    base, ae, text_encoder = sample.load_flux_folder(flux_folder, dtype="float32")
    rng = np.random.default_rng(0)
    adapters = {(layer.name, i, part): flux_lora.Adapter(rng.normal(size=(layer.in_features, 2)).astype(np.float32),
                                                         rng.normal(size=(2, size)).astype(np.float32) * 0.2, 0.5)
                for layer in flux_lora.layers(base.config).values() for i in layer.indices() for part, size in layer.parts}
    file = flux_lora.write(adapters, base.config, tmp_path / "lora.safetensors", "kohya")

    def velocity(model):
        b, h, w = 1, 4, 6
        x = jax.random.normal(jax.random.key(0), (b, h * w // 4, 64))
        txt, y = jax.random.normal(jax.random.key(1), (b, 3, 32)), jax.random.normal(jax.random.key(2), (b, 32))
        return np.asarray(model(x, sample.image_ids(b, h, w), txt, sample.text_ids(b, 3), jax.numpy.array([0.5]), y,
                                jax.numpy.array([3.5])))

    merged, _, _ = sample.load_flux_folder(flux_folder, dtype="float32", lora=file, lora_scale=0.7)
    unmerged, _, _ = sample.load_flux_folder(flux_folder, dtype="float32", lora=file, lora_scale=0.7, lora_merged=False)
    off, _, _ = sample.load_flux_folder(flux_folder, dtype="float32", lora=file, lora_scale=0.0)
    assert not list(nn.adapted_layers(merged)) and list(nn.adapted_layers(unmerged))
    np.testing.assert_allclose(velocity(merged), velocity(unmerged), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(velocity(off), velocity(base), rtol=1e-6, atol=1e-6)
    assert np.abs(velocity(merged) - velocity(base)).max() > 1e-2

    out = tmp_path / "images"
    assert main(["--root", str(flux_folder), "--height", "48", "--width", "48", "--steps", "2", "--dtype",
                        "float32", "--prompt", PROMPTS[0], "--lora", str(file), "--lora_scale", "0.7", "--lora_unmerged",
                        "--out", str(out)]) == 0
    assert np.asarray(Image.open(out / sample.image_filename(0, PROMPTS[0]))).shape == (48, 48, 3)
