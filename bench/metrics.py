"""The image metrics side by side with the libraries they follow, on this machine's CPU:
SSIM (sga-jax in JAX vs scikit-image), the GLCM score (ours in NumPy vs Diffusion-4K's
scikit-image calls) and CLIP ViT-B/16 image + text features for CLIP score (JAX vs transformers,
same random weights, fp32). Medians of interleaved rounds after a warm-up.

    python bench/metrics.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from skimage.feature import graycomatrix
from skimage.measure import shannon_entropy
from skimage.metrics import structural_similarity

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import markdown_table, write_section  # noqa: E402
from sga_jax import metrics  # noqa: E402
from sga_jax.metrics import texture  # noqa: E402
from sga_jax.models import clip  # noqa: E402

SSIM_BATCH, SSIM_SIZE = 4, 512
GLCM_SIZE = 1024
CLIP_BATCH = 8


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
    for fn in runs.values():
        fn()  # warm-up (and compile)
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}

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
    body = (
        f"Median of {args.repeats} interleaved rounds after a warm-up (JAX compile excluded); fp32; torch uses "
        f"{torch.get_num_threads()} threads. The same values come out on both sides (tests/test_metrics.py, "
        f"tests/test_clip_model.py); here the CLIP image features differ by {image_error:.1e} relative to their "
        "largest entry. Ratios above 1: sga-jax is faster.\n\n" + markdown_table(rows)
    )
    write_section("metrics", "Image metrics (bench/metrics.py)", body, {"times_s": times, "medians_s": med,
                                                                        "clip_image_rel_error": image_error})
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
