"""Building blocks shared by every model family, one job per module:

- `params`: parameter factories (`linear`, `conv`) with logical axis names, dtype settings
- `norms`: LayerNorm, GroupNorm, RMSNorm
- `activations`: GELU variants, quick GELU, lookup by Hugging Face / PyTorch name
- `attention`: the one attention entry point and its implementations
- `splash`: the Pallas TPU splash kernel behind `attention(..., implementation="splash")`
- `rope`: rotary position embeddings
- `resample`: PyTorch-exact image resizing
- `sharding`: activation sharding constraints by logical axis names
- `stack`: stacked layers run by `jax.lax.scan` under a remat policy

Models import the package (`from sga_jax.models import nn`) and use the names below.
"""

from sga_jax.models.nn.activations import ACTIVATIONS, activation, gelu_exact, gelu_tanh, quick_gelu
from sga_jax.models.nn.attention import (
    ATTENTION_IMPLEMENTATIONS, CHUNKED_QUERY_BLOCK, MASK_FREE_IMPLEMENTATIONS, MASKING_IMPLEMENTATIONS, attention,
)
from sga_jax.models.nn.norms import RMSNorm, group_norm, layer_norm
from sga_jax.models.nn.params import Axes, Dtype, conv, dtype_of, linear, logical
from sga_jax.models.nn.resample import resize_bicubic_torch, torch_bicubic_matrix
from sga_jax.models.nn.rope import apply_rope, axial_rope, rope_angles
from sga_jax.models.nn.sharding import constrain, divisible_spec
from sga_jax.models.nn.splash import SplashBlockSizes
from sga_jax.models.nn.stack import REMAT_POLICIES, remat, scan_layers, stack_layers

__all__ = [
    "ACTIVATIONS", "ATTENTION_IMPLEMENTATIONS", "CHUNKED_QUERY_BLOCK", "MASKING_IMPLEMENTATIONS",
    "MASK_FREE_IMPLEMENTATIONS", "REMAT_POLICIES", "Axes", "Dtype", "RMSNorm", "SplashBlockSizes", "activation",
    "apply_rope", "attention", "axial_rope", "constrain", "conv", "divisible_spec", "dtype_of", "gelu_exact",
    "gelu_tanh", "group_norm", "layer_norm", "linear", "logical", "quick_gelu", "remat", "resize_bicubic_torch",
    "rope_angles", "scan_layers", "stack_layers", "torch_bicubic_matrix",
]
