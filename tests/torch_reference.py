"""Helpers for building PyTorch reference models in tests: randomise every parameter, save as the
library saves. Only tests import this module (torch is a dev dependency)."""

from __future__ import annotations

import numpy as np
import torch


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Overwrite every parameter and floating buffer of `module` with seeded normal noise.

    Norm weights are drawn around 1 so that activations keep a sane scale; everything else,
    biases included, around 0 with standard deviation `scale`.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * scale
            leaf = name.rsplit(".", 1)[-1]
            is_norm_scale = ("norm" in name.lower() or leaf in ("scale", "lambda1")) and param.ndim == 1
            if is_norm_scale and leaf in ("weight", "scale"):
                noise = noise + 1.0
            param.copy_(noise.to(param.dtype))
    return module.eval()


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A detached float32 numpy copy of a torch tensor."""
    return tensor.detach().to(torch.float32).cpu().numpy()


def nchw_to_nhwc(tensor: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) torch tensor -> (B, H, W, C) float32 numpy array."""
    return to_numpy(tensor).transpose(0, 2, 3, 1)


def nhwc_to_nchw(array: np.ndarray) -> torch.Tensor:
    """(B, H, W, C) numpy array -> (B, C, H, W) float32 torch tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(array, np.float32).transpose(0, 3, 1, 2)))


def assert_close_relative(ours, theirs, tol: float = 1e-4, what: str = "output") -> None:
    """Max abs error relative to the reference's max abs value is at most `tol`."""
    ours = np.asarray(ours, np.float64)
    theirs = np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != reference {theirs.shape}"
    scale = max(np.abs(theirs).max(), 1e-12)
    err = np.abs(ours - theirs).max() / scale
    assert err <= tol, f"{what}: max abs error / scale = {err:.3e} > {tol:.0e}"
