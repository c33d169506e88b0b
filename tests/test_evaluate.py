"""`python -m sga_jax.evaluate` over folders of PNG files: the report equals the metrics called
directly, FD-DINOv2 through a tiny random transformers DINOv2, and saved reference statistics."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import transformers
from flax import nnx
from PIL import Image

from sga_jax import evaluate, metrics
from sga_jax.models import clip, dinov2
from tests.torch_reference import randomize_


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
    return {"originals": _write(root / "originals", originals), "recons": _write(root / "recons", recons),
            "dinov2": root / "dinov2", "arrays": (originals, recons)}


def test_report_equals_the_metrics_called_directly(folders, tmp_path):
    out = tmp_path / "report.json"
    assert evaluate.main(["--images", str(folders["recons"]), "--reference", str(folders["originals"]),
                          "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    originals, recons = folders["arrays"]
    assert report["images"] == 4 and report["pairs"] == 4 and report["unpaired"] == 0
    assert report["glcm_score"] == pytest.approx(np.mean([metrics.glcm_score(r) for r in recons]))
    assert report["compression_ratio"] == pytest.approx(metrics.compression_ratio(recons))
    a = jnp.asarray(np.stack(recons) / 127.5 - 1.0, jnp.float32)
    b = jnp.asarray(np.stack(originals) / 127.5 - 1.0, jnp.float32)
    for name in ("psnr", "ssim", "nmse"):
        assert report[name] == pytest.approx(float(np.mean(getattr(metrics, name)(a, b))), rel=1e-5)


def test_fd_dinov2_with_saved_reference_statistics(folders, tmp_path):
    stats = tmp_path / "originals.npz"
    evaluate.main(["--images", str(folders["originals"]), "--dinov2", str(folders["dinov2"]),
                   "--save_stats", str(stats), "--out", str(tmp_path / "a.json")])
    evaluate.main(["--images", str(folders["recons"]), "--dinov2", str(folders["dinov2"]),
                   "--reference", str(folders["originals"]), "--out", str(tmp_path / "b.json")])
    evaluate.main(["--images", str(folders["recons"]), "--dinov2", str(folders["dinov2"]),
                   "--reference_stats", str(stats), "--out", str(tmp_path / "c.json")])
    direct = json.loads((tmp_path / "b.json").read_text())["fd_dinov2"]
    from_stats = json.loads((tmp_path / "c.json").read_text())["fd_dinov2"]
    assert direct > 0 and from_stats == pytest.approx(direct, rel=1e-9)
    model = dinov2.load(folders["dinov2"])
    same = evaluate.dinov2_statistics(model, evaluate.list_images(folders["originals"]), batch_size=3)
    assert metrics.frechet_distance(same.mean, same.covariance, same.mean, same.covariance) == pytest.approx(0, abs=1e-6)


def test_bad_inputs_are_named(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        evaluate.list_images(tmp_path / "missing")
    small = _write(tmp_path / "small", [np.zeros((32, 32, 3), np.uint8)])
    with pytest.raises(ValueError, match=r"00\.png is \(32, 32\) but .*00\.png is \(64, 96\)"):
        evaluate.reconstruction_metrics(evaluate.list_images(small), folders["originals"])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"x\.png: not an image"):
        evaluate.read_rgb(tmp_path / "broken" / "x.png")
    with pytest.raises(SystemExit):
        evaluate.main(["--images", str(folders["originals"]), "--save_stats", str(tmp_path / "s.npz")])


def test_clip_score_over_a_sampled_folder(tmp_path):
    from sga_jax.demo import CAPTIONS
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
    assert evaluate.main(["--images", str(folder), "--clip", str(tmp_path / "clip"), "--batch_size", "2",
                          "--aesthetics", str(tmp_path / "aesthetic.safetensors"),
                          "--aesthetics_clip", str(tmp_path / "clip")]) == 0
    report = json.loads((folder / "metrics.json").read_text())
    ids, _ = tokenize(tokenizer, prompts, 77)
    pixels = jnp.asarray(np.stack(images) / 127.5 - 1.0, jnp.float32)
    model = clip.load_clip_model(tmp_path / "clip")
    want = metrics.clip_score(model, pixels, jnp.asarray(ids))
    assert report["clip_score"] == pytest.approx(float(np.mean(want)), rel=1e-5)
    aesthetic = metrics.aesthetic_score(model, predictor, pixels)
    assert report["aesthetics"] == pytest.approx(float(np.mean(aesthetic)), rel=1e-5)
    (folder / "index.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="index.jsonl not found"):
        evaluate.read_prompts(folder)
