"""Building blocks shared by every model family, one job per module:

- `params`: parameter factories (`linear`, `conv`) with logical axis names, dtype settings
- `norms`: LayerNorm, GroupNorm, RMSNorm, BatchStatNorm (training-mode BatchNorm)
- `activations`: GELU variants, quick GELU, lookup by Hugging Face / PyTorch name
- `attention`: the one attention entry point and its implementations
- `rope`: rotary position embeddings
- `resample`: PyTorch-exact image resizing
- `sharding`: activation sharding constraints by logical axis names
- `stack`: stacked layers run by `jax.lax.scan` under a remat policy

Models import the package (`from sga_jax.models import nn`) and use the names below.
"""

from sga_jax.models.nn.activations import ACTIVATIONS, activation, gelu_exact, gelu_tanh, quick_gelu
from sga_jax.models.nn.attention import ATTENTION_IMPLEMENTATIONS, CHUNKED_QUERY_BLOCK, attention
from sga_jax.models.nn.norms import BatchStatNorm, RMSNorm, group_norm, layer_norm
from sga_jax.models.nn.params import Axes, Dtype, conv, dtype_of, linear, logical
from sga_jax.models.nn.resample import resize_bicubic_torch, torch_bicubic_matrix
from sga_jax.models.nn.rope import apply_rope, axial_rope, rope_angles
from sga_jax.models.nn.sharding import constrain
from sga_jax.models.nn.stack import REMAT_POLICIES, remat, scan_layers, stack_layers

__all__ = [
    "ACTIVATIONS", "ATTENTION_IMPLEMENTATIONS", "BatchStatNorm", "CHUNKED_QUERY_BLOCK", "REMAT_POLICIES", "Axes", "Dtype",
    "RMSNorm", "activation", "apply_rope", "attention", "axial_rope", "constrain", "conv", "dtype_of",
    "gelu_exact", "gelu_tanh", "group_norm", "layer_norm", "linear", "logical", "quick_gelu", "remat",
    "resize_bicubic_torch", "rope_angles", "scan_layers", "stack_layers", "torch_bicubic_matrix",
]
