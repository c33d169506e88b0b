"""`python -m sga_jax.evaluate` over folders of PNG files: the report equals the metrics called
directly; FD-DINOv2 through a tiny random transformers DINOv2 and saved reference statistics; the
paper's Table 2 for a tiny random VAE on scikit-image's photographs and Table 1 for a generated
folder, with a random FID Inception."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import lpips as reference_lpips
import torch
import torchvision
import transformers
from flax import nnx
from PIL import Image
from torchvision.transforms import functional as TF

from sga_jax import evaluate, metrics
from sga_jax.data.sources import skimage_sample_dataset
from sga_jax.demo import CAPTIONS
from sga_jax.evaluate.__main__ import main
from sga_jax.models import clip, dinov2, inception, lpips, vae
from tests.inception_reference import random_inception_state
from tests.torch_reference import randomize_

BATCH = 2
LPIPS_LIN = os.path.join(os.path.dirname(reference_lpips.__file__), "weights", "v0.1", "vgg.pth")


def _write(folder, images):
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    originals = [np.clip(rng.normal(120, 40, size=(64, 96, 3)), 0, 255).astype(np.uint8) for _ in range(4)]
    recons = [np.clip(o + rng.normal(0, 8, size=o.shape), 0, 255).astype(np.uint8) for o in originals]
    config = transformers.Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=224, patch_size=14)
    reference = transformers.Dinov2Model(config)
    randomize_(reference, seed=1, scale=0.2)
    reference.save_pretrained(root / "dinov2", safe_serialization=True)
    torch.save(random_inception_state(seed=0), root / inception.WEIGHTS_FILE)  # as pytorch-fid ships it
    torch.manual_seed(0)
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), root / "vgg16-397923af.pth")  # random trunk
    return {"originals": _write(root / "originals", originals), "recons": _write(root / "recons", recons),
            "dinov2": root / "dinov2", "arrays": (originals, recons), "inception": root / inception.WEIGHTS_FILE,
            "vgg": root / "vgg16-397923af.pth", "photos": skimage_sample_dataset(root / "photos", CAPTIONS)}


def test_report_equals_the_metrics_called_directly(folders, tmp_path):
    out = tmp_path / "report.json"
    assert main(["--images", str(folders["recons"]), "--reference", str(folders["originals"]),
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    originals, recons = folders["arrays"]
    assert report["images"] == 4 and report["pairs"] == 4 and report["unpaired"] == 0 and report["table"] == 2
    assert report["glcm_score"] == pytest.approx(np.mean([metrics.glcm_score(r) for r in recons]))
    assert report["compression_ratio"] == pytest.approx(metrics.compression_ratio(recons))
    a = jnp.asarray(np.stack(recons) / 127.5 - 1.0, jnp.float32)
    b = jnp.asarray(np.stack(originals) / 127.5 - 1.0, jnp.float32)
    for name in ("psnr", "ssim", "nmse"):
        assert report[name] == pytest.approx(float(np.mean(getattr(metrics, name)(a, b))), rel=1e-5)
    assert report["resolution"] == "64x96"
    table = out.with_suffix(".md").read_text()
    assert "| Model | Resolution | rFID | NMSE | PSNR | SSIM | LPIPS |" in table
    assert f"| recons | 64x96 | - | {report['nmse']:.4f} | {report['psnr']:.2f} | {report['ssim']:.4f} | - |" in table


@pytest.mark.slow
def test_fd_dinov2_with_saved_reference_statistics(folders, tmp_path):
    stats = tmp_path / "originals.npz"
    main(["--images", str(folders["originals"]), "--dinov2", str(folders["dinov2"]),
          "--save_stats", str(stats), "--out", str(tmp_path / "a.json")])
    main(["--images", str(folders["recons"]), "--dinov2", str(folders["dinov2"]),
          "--reference", str(folders["originals"]), "--out", str(tmp_path / "b.json")])
    main(["--images", str(folders["recons"]), "--dinov2", str(folders["dinov2"]),
          "--reference_stats", str(stats), "--out", str(tmp_path / "c.json")])
    direct = json.loads((tmp_path / "b.json").read_text())["fd_dinov2"]
    from_stats = json.loads((tmp_path / "c.json").read_text())["fd_dinov2"]
    assert direct > 0 and from_stats == pytest.approx(direct, rel=1e-9)
    model = dinov2.load(folders["dinov2"])
    same = evaluate.dinov2_statistics(model, evaluate.list_images(folders["originals"]), evaluate.ImageReader(), 3)
    assert same.frechet_distance(same) == pytest.approx(0, abs=1e-6)
    assert main(["--images", str(folders["recons"]), "--inception", str(folders["inception"]),  # no Inception
                 "--reference_stats", str(stats), "--out", str(tmp_path / "d.json")]) == 2  # statistics in the file


def test_size_protocol_is_diffusion_4k_fid_preprocess(folders):
    """`--size`: torchvision's short-side resize and center crop on uint8 tensors."""
    for path in evaluate.list_images(folders["photos"])[:3]:
        pixels = evaluate.read_rgb(path)
        want = TF.center_crop(TF.resize(torch.from_numpy(pixels.copy()).permute(2, 0, 1), 96), (96, 96)).permute(1, 2, 0)
        got = evaluate.square(pixels, 96)
        assert got.dtype == np.uint8 and got.shape == (96, 96, 3)
        assert np.abs(got.astype(int) - want.numpy()).max() <= 1 and (got != want.numpy()).mean() < 1e-3


def _tiny_vae(path):
    config = vae.AutoEncoderConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, norm_groups=4,
                                   tile_size=64, tile_overlap=32, tile_threshold=64)
    vae.save(vae.AutoEncoder(config, rngs=nnx.Rngs(3)), path, format="bfl")
    return vae.load(path, f16=True)


@pytest.mark.slow
def test_vae_table2_on_photographs(folders, tmp_path):
    ae = _tiny_vae(tmp_path / "ae.safetensors")
    out = tmp_path / "vae.json"
    assert main(["--images", str(folders["photos"]), "--vae", str(tmp_path / "ae.safetensors"), "--vae_f16",
                 "--inception", str(folders["inception"]), "--lpips_vgg", str(folders["vgg"]), "--lpips_lin", LPIPS_LIN,
                 "--size", "96", "--batch_size", str(BATCH), "--reconstructions", str(tmp_path / "recon"),
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["table"] == 2 and report["pairs"] == report["images"] == len(CAPTIONS)
    assert report["resolution"] == "96x96" and report["fid_protocol"] == "diffusion-4k"
    net = inception.load(folders["inception"])
    perceptual = lpips.load(folders["vgg"], LPIPS_LIN)
    ours, theirs = (metrics.InceptionStatistics(net, batch_size=BATCH) for _ in range(2))
    values = {"psnr": [], "ssim": [], "nmse": [], "lpips": []}
    for path in evaluate.list_images(folders["photos"]):
        original = evaluate.square(evaluate.read_rgb(path), 96)
        recon = evaluate.reconstruct(ae, original)  # 96 > tile_threshold: the tiled path
        np.testing.assert_array_equal(recon, evaluate.read_rgb(tmp_path / "recon" / f"{path.stem}.png"))
        a, b = (jnp.asarray(x[None] / 127.5 - 1.0, jnp.float32) for x in (recon, original))
        for name in ("psnr", "ssim", "nmse"):
            values[name].append(float(getattr(metrics, name)(a, b)[0]))
        values["lpips"].append(float(metrics.lpips_distance(perceptual, a, b)[0]))
        ours.add(a)
        theirs.add(b)
    for name, v in values.items():
        assert report[name] == pytest.approx(np.mean(v), rel=1e-5)
    assert report["rfid"] == pytest.approx(ours.finish().frechet_distance(theirs.finish()), rel=1e-6)
    table = out.with_suffix(".md").read_text()
    assert "| Model | Resolution | rFID | NMSE | PSNR | SSIM | LPIPS |" in table
    row = next(line for line in table.splitlines() if line.startswith("| ae.safetensors | 96x96 |"))
    cells = [float(cell) for cell in row.strip("| ").split(" | ")[2:]]  # every column, LPIPS included
    assert cells == pytest.approx([report[k] for k in ("rfid", "nmse", "psnr", "ssim", "lpips")], rel=1e-2, abs=1e-4)
    assert "rFID: FID InceptionV3 pool features (2048-d), protocol diffusion-4k" in table


def test_vae_reconstruction_crops_to_its_factor(tmp_path):
    ae = _tiny_vae(tmp_path / "ae.safetensors")
    pixels = np.random.default_rng(4).integers(0, 256, size=(30, 43, 3), dtype=np.uint8)
    cropped = evaluate.crop_to_multiple(pixels, ae.config.downsample_factor)
    np.testing.assert_array_equal(cropped, pixels[1:29, 2:42])  # offsets round((30 - 28) / 2), round(3 / 2)
    assert evaluate.reconstruct(ae, cropped).shape == (28, 40, 3)


def test_bad_inputs_are_named(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        evaluate.list_images(tmp_path / "missing")
    small = _write(tmp_path / "small", [np.zeros((64, 64, 3), np.uint8)])
    with pytest.raises(ValueError, match=r"00\.png: the evaluated image is \(64, 64\) but its reference is \(64, 96\)"):
        evaluate.evaluate(small, folders["originals"], evaluate.Networks())
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"x\.png: not an image"):
        evaluate.read_rgb(tmp_path / "broken" / "x.png")
    with pytest.raises(ValueError, match="LPIPS compares image pairs"):
        evaluate.evaluate(folders["originals"], None, evaluate.Networks(lpips=object()))
    for argv in (["--save_stats", str(tmp_path / "s.npz")], ["--vae_f16"], ["--lpips_lin", LPIPS_LIN],
                 ["--vae", str(tmp_path), "--reference", str(folders["recons"])]):
        assert main(["--images", str(folders["originals"]), *argv]) == 2


@pytest.mark.slow
def test_generated_folder_gives_table1(folders, tmp_path):
    from sga_jax.text import build_demo_tokenizers, load_tokenizer, tokenize

    _, tokenizer_dir = build_demo_tokenizers(tmp_path / "tok", CAPTIONS.values())
    tokenizer = load_tokenizer("clip", tokenizer_dir)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=77,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=3,
                           image_size=28, patch_size=7),
        projection_dim=16,
    )
    reference = transformers.CLIPModel(config)
    randomize_(reference, seed=2, scale=0.2)
    reference.save_pretrained(tmp_path / "clip", safe_serialization=True)
    tokenizer.save_pretrained(str(tmp_path / "clip"))
    prompts = list(CAPTIONS.values())[:3]
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8) for _ in prompts]
    folder = _write(tmp_path / "samples", images)
    (folder / "index.jsonl").write_text("".join(json.dumps({"file": f"{i:02d}.png", "prompt": p}) + "\n"
                                                for i, p in enumerate(prompts)))
    predictor = metrics.AestheticPredictor(16, rngs=nnx.Rngs(0))
    safetensors.numpy.save_file({f"layers.{index}.{name}": np.asarray(value).T.copy() if name == "weight"
                                 else np.asarray(value)
                                 for i, index in enumerate((0, 2, 4, 6, 7))
                                 for name, value in (("weight", getattr(predictor, f"fc{i}").kernel[...]),
                                                     ("bias", getattr(predictor, f"fc{i}").bias[...]))},
                                str(tmp_path / "aesthetic.safetensors"))
    assert main(["--images", str(folder), "--clip", str(tmp_path / "clip"), "--batch_size", str(BATCH),
                 "--aesthetics", str(tmp_path / "aesthetic.safetensors"), "--aesthetics_clip", str(tmp_path / "clip"),
                 "--inception", str(folders["inception"]), "--reference", str(folders["photos"]), "--size", "64",
                 "--name", "tiny-flux"]) == 0
    report = json.loads((folder / "metrics.json").read_text())
    assert report["table"] == 1 and report["reference_images"] == len(CAPTIONS) and report["size"] == 64
    ids, _ = tokenize(tokenizer, prompts, 77)
    pixels = jnp.asarray(np.stack([evaluate.square(i, 64) for i in images]) / 127.5 - 1.0, jnp.float32)
    model = clip.load_clip_model(tmp_path / "clip")
    want = metrics.clip_score(model, pixels, jnp.asarray(ids))
    assert report["clip_score"] == pytest.approx(float(np.mean(want)), rel=1e-5)
    aesthetic = metrics.aesthetic_score(model, predictor, pixels)
    assert report["aesthetics"] == pytest.approx(float(np.mean(aesthetic)), rel=1e-5)
    net = inception.load(folders["inception"])
    reader = evaluate.ImageReader(64)
    networks = evaluate.Networks(inception=net)
    settings = evaluate.Settings(size=64, batch_size=BATCH)
    generated = evaluate.folder_inception_statistics(evaluate.list_images(folder), reader, networks, settings, "g")
    real = evaluate.folder_inception_statistics(evaluate.list_images(folders["photos"]), reader, networks, settings, "r")
    assert report["gfid"] == pytest.approx(generated.frechet_distance(real), rel=1e-9)
    table = (folder / "metrics.md").read_text()
    assert "| Model | Evaluation Dataset | gFID | CLIP Score | Aesthetics | GLCM Score | Compression Ratio |" in table
    row = next(line for line in table.splitlines() if line.startswith("| tiny-flux | photos |"))
    assert "-" not in row.replace("tiny-flux", "")
    assert "3 images at 64x64" in table and "against 6 reference images" in table
    (folder / "index.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="index.jsonl not found"):
        evaluate.read_prompts(folder)
