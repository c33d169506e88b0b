"""LPIPS v0.1 with the VGG16 trunk in Flax NNX (`model.py`) and its weights (`convert.py`).

    from sga_jax.models import lpips
    model = lpips.load("vgg16-397923af.pth", "vgg.pth")   # torchvision trunk, lpips package's lins
    distances = model(x, y)                                # (B,) for [-1, 1] images (B, H, W, 3)
    lpips.save(model, "out_dir")                           # one safetensors file, both halves
"""

from sga_jax.models.lpips.convert import key_map, load, save
from sga_jax.models.lpips.model import LPIPS, LPIPSConfig, max_pool_2x2, unit_normalize

__all__ = ["LPIPS", "LPIPSConfig", "key_map", "load", "max_pool_2x2", "save", "unit_normalize"]
