"""The paper's image metrics that need no downloaded network, and the Fréchet distance.

* Reconstruction (`reconstruction.py`, JAX, batched): PSNR, SSIM (Wang et al. 2004 as
  scikit-image computes it), NMSE.
* Generation (`texture.py`, NumPy on the host): Diffusion-4K's GLCM score and the JPEG
  compression ratio.
* Distribution (`frechet.py`): streaming feature statistics and the Fréchet distance, with
  DINOv2 CLS features (FD-DINOv2) from `sga_jax.models.dinov2`.
* Prompt alignment (`clip_score.py`): CLIP score with a full CLIP model (`sga_jax.models.clip`).
* Aesthetics (`aesthetics.py`): the LAION improved aesthetic predictor on CLIP image embeddings.
* Perceptual distance (`lpips.py`): LPIPS-VGG16 of image pairs, with `sga_jax.models.lpips`.

`python -m sga_jax.evaluate` runs them over folders of images.
"""

from sga_jax.metrics.aesthetics import AestheticPredictor, aesthetic_score, load_aesthetic_predictor
from sga_jax.metrics.clip_score import clip_pixels, clip_score
from sga_jax.metrics.frechet import FeatureStatistics, dinov2_features, frechet_distance
from sga_jax.metrics.lpips import lpips_distance, mean_lpips
from sga_jax.metrics.reconstruction import nmse, psnr, ssim
from sga_jax.metrics.texture import compression_ratio, glcm_score, grey64

__all__ = [
    "AestheticPredictor",
    "FeatureStatistics",
    "aesthetic_score",
    "clip_pixels",
    "clip_score",
    "compression_ratio",
    "dinov2_features",
    "frechet_distance",
    "glcm_score",
    "grey64",
    "load_aesthetic_predictor",
    "lpips_distance",
    "mean_lpips",
    "nmse",
    "psnr",
    "ssim",
]
