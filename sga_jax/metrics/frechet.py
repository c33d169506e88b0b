"""Fréchet distance between two sets of image features, from streaming statistics.

`FeatureStatistics` accumulates a set's mean and covariance in float64 batch by batch;
`save_statistics` / `load_statistics` keep them in an .npz, so a reference set is encoded once.
`frechet_distance` is Heusel et al.'s `||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`,
with the trace of the matrix square root taken from the eigenvalues of the symmetric U^T S2 U for
a factor S1 = U U^T (pivoted Cholesky: the eigenvalues of S1 S2 without S1's eigenvectors, and only
as many as S1's rank). With Inception features this is FID; `dinov2_features` gives FD-DINOv2 (Stein et al. 2023: DINOv2's CLS token at 224 px).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from flax import nnx

from sga_jax.errors import CheckpointError, ConfigError
from sga_jax.models import dinov2

DINOV2_SIZE = 224


class FeatureStatistics:
    """Running count, sum and sum of outer products of (N, D) feature batches, in float64."""

    def __init__(self, dim: int):
        self.count = 0
        self.total = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def update(self, features: np.ndarray | jax.Array) -> None:
        """Add a batch of features (N, D)."""
        f = np.asarray(features, np.float64)
        if f.ndim != 2 or f.shape[1] != self.total.shape[0]:
            raise ValueError(f"expected features (N, {self.total.shape[0]}), got {f.shape}")
        self.count += f.shape[0]
        self.total += f.sum(axis=0)
        self.outer += f.T @ f

    @property
    def mean(self) -> np.ndarray:
        """The features' mean (D,)."""
        if not self.count:
            raise ValueError("FeatureStatistics: no features yet")
        return self.total / self.count

    @property
    def covariance(self) -> np.ndarray:
        """The unbiased covariance (D, D) (as `np.cov`), which needs at least two samples."""
        if self.count < 2:
            raise ConfigError(f"FeatureStatistics: a covariance needs at least 2 samples, have {self.count}")
        mean = self.mean
        return (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)

    def frechet_distance(self, other: "FeatureStatistics") -> float:
        """The Fréchet distance between this set's Gaussian and `other`'s (FID with Inception features)."""
        return frechet_distance(self.mean, self.covariance, other.mean, other.covariance)


def save_statistics(path: str | os.PathLike, statistics: dict[str, FeatureStatistics]) -> None:
    """Write named feature statistics (e.g. "inception", "dinov2") to one .npz file."""
    arrays = {}
    for name, stats in statistics.items():
        arrays.update({f"{name}.count": np.asarray(stats.count), f"{name}.total": stats.total,
                       f"{name}.outer": stats.outer})
    np.savez(path, **arrays)


def load_statistics(path: str | os.PathLike, name: str, dim: int) -> FeatureStatistics:
    """The statistics `name` from a `save_statistics` file (plain arrays; pickles are refused),
    checked against the feature width `dim`."""
    with np.load(path, allow_pickle=False) as data:
        names = sorted({key.split(".")[0] for key in data.files})
        if name not in names:
            raise CheckpointError(f"{path} holds statistics for {names}, not {name!r} "
                                  f"(write them with --save_stats and the {name} network)")
        total = data[f"{name}.total"]
        if total.shape != (dim,):
            raise CheckpointError(f"{path}: the {name} statistics are {total.shape[0]}-d, the network gives {dim}")
        stats = FeatureStatistics(dim)
        stats.count, stats.total, stats.outer = int(data[f"{name}.count"]), total, data[f"{name}.outer"]
    return stats


def _factor(cov: np.ndarray) -> np.ndarray:
    """U (D, r) with U U^T = cov for a positive semi-definite cov of numerical rank r: LAPACK's
    pivoted Cholesky (dpstrf), which stops at the rank, so a covariance of few samples is cheap."""
    factor, pivots, rank, _ = scipy.linalg.lapack.dpstrf(cov, lower=1)
    lower = np.tril(factor)[:, :rank]
    out = np.empty_like(lower)
    out[pivots - 1] = lower
    return out


def frechet_distance(mean1: np.ndarray, cov1: np.ndarray, mean2: np.ndarray, cov2: np.ndarray) -> float:
    """Fréchet distance between the Gaussians N(mean1, cov1) and N(mean2, cov2)."""
    mean1, mean2 = np.asarray(mean1, np.float64), np.asarray(mean2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    if mean1.shape != mean2.shape or cov1.shape != cov2.shape or cov1.shape != (mean1.shape[0],) * 2:
        raise ValueError(f"mismatched statistics: means {mean1.shape}, {mean2.shape}; covariances {cov1.shape}, {cov2.shape}")
    root = _factor(cov1)
    middle = root.T @ cov2 @ root
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = mean1 - mean2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_root)


@nnx.jit
def dinov2_features(model: dinov2.Dinov2, images: jax.Array) -> jax.Array:
    """[-1, 1] images (B, H, W, 3) -> DINOv2 CLS features (B, hidden): bicubic (antialiased) resize
    to 224 x 224, ImageNet normalisation, the final-norm CLS token."""
    x = (images.astype(jnp.float32) + 1.0) * 0.5
    x = jax.image.resize(x, (x.shape[0], DINOV2_SIZE, DINOV2_SIZE, 3), method="cubic", antialias=True)
    x = (x - jnp.asarray(dinov2.IMAGE_MEAN)) / jnp.asarray(dinov2.IMAGE_STD)
    return model(x)[:, 0]
