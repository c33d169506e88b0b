"""The image metrics side by side with the libraries they follow, on this machine's CPU:
SSIM (sga-jax in JAX vs scikit-image), the GLCM score (ours in NumPy vs Diffusion-4K's
scikit-image calls), CLIP ViT-B/16 image + text features for CLIP score (JAX vs transformers,
same random weights, fp32) and LPIPS-VGG16 forward and forward + backward (JAX vs the lpips
package, same random trunk and its real lin weights) in section "metrics"; the FID InceptionV3's
pool features (JAX vs pytorch-fid's network, and the diffusion-4k protocol from 8-bit images vs
torch-fidelity's extractor; same random weights, fp32) in section "metrics_fid". Medians of
interleaved rounds after a warm-up.

    python bench/metrics.py [--repeats 5] [--only metrics|fid]
"""

from __future__ import annotations

import argparse
import runpy
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.torch
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

from bench.report import interleaved_medians, markdown_table, write_section  # noqa: E402
from sga_jax import metrics  # noqa: E402
from sga_jax.metrics import texture  # noqa: E402
from sga_jax.models import clip, inception, lpips  # noqa: E402
from tests.inception_reference import pytorch_fid_network, random_inception_state  # noqa: E402

SSIM_BATCH, SSIM_SIZE = 4, 512
GLCM_SIZE = 1024
CLIP_BATCH = 8
LPIPS_BATCH, LPIPS_SIZE = 4, 256
FID_BATCH, FID_SOURCE = 8, 512


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


def image_metrics(repeats: int) -> None:
    """Section "metrics": SSIM, GLCM score, CLIP features and LPIPS against their references."""
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
    times, med = interleaved_medians(runs, repeats)

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
    lpips_table, lpips_record = lpips_rows(repeats)
    rows += lpips_table
    body = (
        f"Median of {repeats} interleaved rounds after a warm-up (JAX compile excluded); fp32; torch uses "
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


def fid_inception(repeats: int) -> None:
    """Section "metrics_fid": FID Inception pool features, JAX vs pytorch-fid's network at 299 px,
    and the diffusion-4k protocol from 8-bit 512 px images vs torch-fidelity's extractor."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    state = random_inception_state(seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        safetensors.torch.save_file(state, f"{tmp}/inception.safetensors")
        torch.save(state, f"{tmp}/inception.pth")
        ours = inception.load(f"{tmp}/inception.safetensors")
        fidelity = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                               feature_extractor_weights_path=f"{tmp}/inception.pth").eval()
    reference = pytorch_fid_network(state)
    rng = np.random.default_rng(0)
    unit = rng.uniform(size=(FID_BATCH, 299, 299, 3)).astype(np.float32)
    pixels = rng.integers(0, 256, size=(FID_BATCH, FID_SOURCE, FID_SOURCE, 3), dtype=np.uint8)
    unit_t = torch.from_numpy(unit.transpose(0, 3, 1, 2).copy())
    pixels_t = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
    unit_j, pixels_j = jnp.asarray(2 * unit - 1), jnp.asarray(pixels.astype(np.float32) / 127.5 - 1)

    def torch_run(net: torch.nn.Module, x: torch.Tensor) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode():
                return net(x)
        return run

    runs = {
        "jax 299": lambda: metrics.inception_features(ours, unit_j, protocol="pytorch-fid").block_until_ready(),
        "pytorch-fid 299": torch_run(reference, unit_t),
        "jax diffusion-4k": lambda: metrics.inception_features(ours, pixels_j).block_until_ready(),
        "torch-fidelity": torch_run(fidelity, pixels_t),
    }
    times, med = interleaved_medians(runs, repeats)
    (want_299,), (want_4k,) = runs["pytorch-fid 299"](), runs["torch-fidelity"]()
    errors = {name: float(np.abs(np.asarray(runs[run]()) - want).max() / np.abs(want).max())
              for name, run, want in (("299", "jax 299", want_299.numpy()[:, :, 0, 0]),
                                      ("diffusion-4k", "jax diffusion-4k", want_4k.numpy()))}
    rows = [
        {"features": f"pool features, batch {FID_BATCH} at 299 px", "sga-jax s": med["jax 299"],
         "reference": "pytorch-fid InceptionV3", "reference s": med["pytorch-fid 299"],
         "reference / sga-jax": med["pytorch-fid 299"] / med["jax 299"], "max rel. error": errors["299"]},
        {"features": f"diffusion-4k protocol from {FID_SOURCE} px uint8, batch {FID_BATCH}",
         "sga-jax s": med["jax diffusion-4k"], "reference": "torch-fidelity 0.3.0 extractor",
         "reference s": med["torch-fidelity"], "reference / sga-jax": med["torch-fidelity"] / med["jax diffusion-4k"],
         "max rel. error": errors["diffusion-4k"]},
    ]
    body = (
        f"Median of {repeats} interleaved rounds after a warm-up (JAX compile excluded); fp32, the same random "
        f"weights (BatchNorm statistics included) on both sides; torch uses {torch.get_num_threads()} threads. "
        "sga-jax folds each BatchNorm into its conv when the weights load, so a block is one convolution with "
        "a bias and ReLU fused after it; PyTorch runs conv, BatchNorm and ReLU as three passes. "
        "Ratios above 1: sga-jax is faster.\n\n" + markdown_table(rows)
    )
    write_section("metrics_fid", "FID Inception features (bench/metrics.py)", body,
                  {"times_s": times, "medians_s": med, "max_rel_error": errors},
                  command="python bench/metrics.py --only fid")
    print(markdown_table(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=("metrics", "fid"), help="run one section (default: all)")
    args = parser.parse_args()
    if args.only in (None, "metrics"):
        image_metrics(args.repeats)
    if args.only in (None, "fid"):
        fid_inception(args.repeats)


if __name__ == "__main__":
    main()
