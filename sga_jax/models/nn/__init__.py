"""Building blocks shared by every model family, one job per module:

- `params`: parameter factories (`linear`, `conv`) with logical axis names, dtype settings
- `lora`: low-rank adapters on `linear` layers (`LoRAConfig`, `LoRALinear`), `Frozen` weights, merging
- `norms`: LayerNorm, GroupNorm, RMSNorm
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
from sga_jax.models.nn.lora import (
    BASE_WEIGHTS, Frozen, LoRAConfig, LoRALinear, adapted_layers, dropout_rng, freeze, merged_weights,
)
from sga_jax.models.nn.norms import RMSNorm, group_norm, layer_norm
from sga_jax.models.nn.params import Axes, Dtype, conv, dtype_of, linear, logical
from sga_jax.models.nn.resample import resize_bicubic_torch, torch_bicubic_matrix
from sga_jax.models.nn.rope import apply_rope, axial_rope, rope_angles
from sga_jax.models.nn.sharding import constrain
from sga_jax.models.nn.stack import REMAT_POLICIES, remat, scan_layers, stack_layers

__all__ = [
    "ACTIVATIONS", "ATTENTION_IMPLEMENTATIONS", "BASE_WEIGHTS", "CHUNKED_QUERY_BLOCK", "REMAT_POLICIES", "Axes",
    "Dtype", "Frozen", "LoRAConfig", "LoRALinear", "RMSNorm", "activation", "adapted_layers", "apply_rope",
    "attention", "axial_rope", "constrain", "conv", "dropout_rng", "dtype_of", "freeze", "gelu_exact", "gelu_tanh",
    "group_norm", "layer_norm", "linear", "logical", "merged_weights", "quick_gelu", "remat",
    "resize_bicubic_torch", "rope_angles", "scan_layers", "stack_layers", "torch_bicubic_matrix",
]
