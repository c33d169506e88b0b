"""The image metrics side by side with the libraries they follow, on this machine's CPU:
SSIM (sga-jax in JAX vs scikit-image), the GLCM score (ours in NumPy vs Diffusion-4K's
scikit-image calls), CLIP ViT-B/16 image + text features for CLIP score (JAX vs transformers,
same random weights, fp32) and LPIPS-VGG16 forward and forward + backward (JAX vs the lpips
package, same random trunk and its real lin weights). Medians of interleaved rounds after a warm-up.

    python bench/metrics.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import runpy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
runpy.run_path(str(ROOT / "tests" / "stubs" / "sitecustomize.py"))  # lpips's torchvision beside the CPU torch wheel

import lpips as reference_lpips  # noqa: E402
import transformers  # noqa: E402
from skimage.feature import graycomatrix  # noqa: E402
from skimage.measure import shannon_entropy  # noqa: E402
from skimage.metrics import structural_similarity  # noqa: E402

from bench.report import markdown_table, write_section  # noqa: E402
from sga_jax import metrics  # noqa: E402
from sga_jax.metrics import texture  # noqa: E402
from sga_jax.models import clip, lpips  # noqa: E402

SSIM_BATCH, SSIM_SIZE = 4, 512
GLCM_SIZE = 1024
CLIP_BATCH = 8
LPIPS_BATCH, LPIPS_SIZE = 4, 256


def skimage_glcm_score(image: np.ndarray) -> float:
    """Diffusion-4K's eval.py loop: graycomatrix + shannon_entropy per 64 x 64 patch."""
    grey = metrics.grey64(image)
    scores = [
        shannon_entropy(graycomatrix(grey[i : i + 64, j : j + 64], texture.DISTANCES, texture.ANGLES, levels=64,
                                     normed=True))
        for i in range(0, grey.shape[0], 64)
        for j in range(0, grey.shape[1], 64)
    ]
    return float(np.mean(scores))


def clip_pair(tmp: str) -> tuple[transformers.CLIPModel, clip.ClipModel]:
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           patch_size=16, image_size=224),
        projection_dim=512,
    )
    torch.manual_seed(0)
    reference = transformers.CLIPModel(config).eval()
    reference.save_pretrained(tmp, safe_serialization=True)
    return reference, clip.load_clip_model(tmp)


def interleaved_medians(runs: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Warm every run up (and compile), then time `repeats` rounds of all of them in turn: (times, medians)."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times, {name: statistics.median(t) for name, t in times.items()}


def lpips_rows(repeats: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """LPIPS-VGG16 distance of two batches, forward and forward + input gradient, JAX vs lpips.LPIPS
    (the same random trunk, the package's lin weights); rows of the table and the JSON record."""
    reference = reference_lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    with tempfile.TemporaryDirectory() as tmp:
        trunk = {f"features.{k.split('.')[1]}.{k.split('.')[2]}": v for k, v in reference.net.state_dict().items()}
        torch.save({**trunk, **reference.state_dict()}, Path(tmp) / "lpips_vgg16.pth")  # + lin{k}, lins.{k}, ...
        ours = lpips.load(Path(tmp) / "lpips_vgg16.pth")
    rng = np.random.default_rng(1)
    x, y = (rng.uniform(-1, 1, size=(LPIPS_BATCH, LPIPS_SIZE, LPIPS_SIZE, 3)).astype(np.float32) for _ in range(2))
    x_t, y_t = (torch.from_numpy(a.transpose(0, 3, 1, 2).copy()) for a in (x, y))
    graphdef, state = nnx.split(ours)
    forward = jax.jit(lambda s, a, b: nnx.merge(graphdef, s)(a, b))
    backward = jax.jit(lambda s, a, b: jax.value_and_grad(lambda a: nnx.merge(graphdef, s)(a, b).sum())(a))
    x_j, y_j = jnp.asarray(x), jnp.asarray(y)

    def torch_forward() -> None:
        with torch.no_grad():
            reference(x_t, y_t)

    def torch_backward() -> None:
        a = x_t.clone().requires_grad_()
        reference(a, y_t).sum().backward()

    times, med = interleaved_medians({
        "jax forward": lambda: forward(state, x_j, y_j).block_until_ready(),
        "torch forward": torch_forward,
        "jax forward+backward": lambda: jax.block_until_ready(backward(state, x_j, y_j)),
        "torch forward+backward": torch_backward,
    }, repeats)
    with torch.no_grad():
        want = reference(x_t, y_t).numpy().reshape(-1)
    error = float(np.abs(np.asarray(forward(state, x_j, y_j)) / want - 1).max())
    shape = f"batch {LPIPS_BATCH}, {LPIPS_SIZE}x{LPIPS_SIZE}"
    rows = [
        {"metric": f"LPIPS-VGG16 forward, {shape}", "sga-jax s": med["jax forward"], "reference": "lpips 0.1.4",
         "reference s": med["torch forward"], "reference / sga-jax": med["torch forward"] / med["jax forward"]},
        {"metric": f"LPIPS-VGG16 forward + d/dx, {shape}", "sga-jax s": med["jax forward+backward"],
         "reference": "lpips 0.1.4 (autograd)", "reference s": med["torch forward+backward"],
         "reference / sga-jax": med["torch forward+backward"] / med["jax forward+backward"]},
    ]
    return rows, {"lpips_times_s": times, "lpips_medians_s": med, "lpips_rel_error": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    clean = np.clip(rng.normal(size=(SSIM_BATCH, SSIM_SIZE, SSIM_SIZE, 3)).cumsum(axis=2) / 20, -1, 1)
    clean = clean.astype(np.float32)
    noisy = np.clip(clean + 0.1 * rng.normal(size=clean.shape), -1, 1).astype(np.float32)
    a, b = jnp.asarray(noisy), jnp.asarray(clean)
    texture_image = np.clip(rng.normal(128, 40, size=(GLCM_SIZE, GLCM_SIZE, 3)), 0, 255).astype(np.uint8)

    with tempfile.TemporaryDirectory() as tmp:
        reference, ours = clip_pair(tmp)
    pixels = rng.normal(size=(CLIP_BATCH, 224, 224, 3)).astype(np.float32)
    ids = rng.integers(0, 49000, size=(CLIP_BATCH, 77)).astype(np.int32)
    pixels_t, ids_t = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()), torch.from_numpy(ids).long()
    clip_features = jax.jit(lambda m, x, t: (m.image_features(x), m.text_features(t)))

    def torch_clip() -> None:
        with torch.inference_mode():
            reference.get_image_features(pixel_values=pixels_t)
            reference.get_text_features(input_ids=ids_t)

    runs = {
        "ssim jax": lambda: metrics.ssim(a, b).block_until_ready(),
        "ssim skimage": lambda: [structural_similarity(noisy[i], clean[i], gaussian_weights=True, sigma=1.5,
                                                       use_sample_covariance=False, channel_axis=-1, data_range=2.0)
                                 for i in range(SSIM_BATCH)],
        "glcm ours": lambda: metrics.glcm_score(texture_image),
        "glcm skimage": lambda: skimage_glcm_score(texture_image),
        "clip jax": lambda: jax.block_until_ready(clip_features(ours, jnp.asarray(pixels), jnp.asarray(ids))),
        "clip torch": torch_clip,
    }
    times, med = interleaved_medians(runs, args.repeats)

    ours_image, ours_text = clip_features(ours, jnp.asarray(pixels), jnp.asarray(ids))
    with torch.inference_mode():
        want_image = reference.get_image_features(pixel_values=pixels_t).pooler_output.numpy()
    image_error = float(np.abs(np.asarray(ours_image) - want_image).max() / np.abs(want_image).max())
    rows = [
        {"metric": f"SSIM, {SSIM_BATCH} x {SSIM_SIZE}x{SSIM_SIZE} RGB", "sga-jax s": med["ssim jax"],
         "reference": "scikit-image", "reference s": med["ssim skimage"],
         "reference / sga-jax": med["ssim skimage"] / med["ssim jax"]},
        {"metric": f"GLCM score, one {GLCM_SIZE}x{GLCM_SIZE} image", "sga-jax s": med["glcm ours"],
         "reference": "scikit-image (Diffusion-4K's loop)", "reference s": med["glcm skimage"],
         "reference / sga-jax": med["glcm skimage"] / med["glcm ours"]},
        {"metric": f"CLIP ViT-B/16 image + text features, batch {CLIP_BATCH}", "sga-jax s": med["clip jax"],
         "reference": "transformers (eager)", "reference s": med["clip torch"],
         "reference / sga-jax": med["clip torch"] / med["clip jax"]},
    ]
    lpips_table, lpips_record = lpips_rows(args.repeats)
    rows += lpips_table
    body = (
        f"Median of {args.repeats} interleaved rounds after a warm-up (JAX compile excluded); fp32; torch uses "
        f"{torch.get_num_threads()} threads. The same values come out on both sides (tests/test_metrics.py, "
        f"tests/test_clip_model.py, tests/test_lpips.py); here the CLIP image features differ by {image_error:.1e} "
        f"relative to their largest entry and the LPIPS distances by {lpips_record['lpips_rel_error']:.1e} relative. "
        "LPIPS runs its two images through the trunk separately and differentiates one of them, as the VAE stage's "
        "loss does. Ratios above 1: sga-jax is faster.\n\n" + markdown_table(rows)
    )
    write_section("metrics", "Image metrics (bench/metrics.py)", body, {"times_s": times, "medians_s": med,
                                                                        "clip_image_rel_error": image_error,
                                                                        **lpips_record})
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
