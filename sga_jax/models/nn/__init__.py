"""Building blocks shared by every model family, one job per module:

- `params`: parameter factories (`linear`, `conv`) with logical axis names, dtype settings
- `lora`: low-rank adapters on `linear` layers (`LoRAConfig`, `LoRALinear`), `Frozen` weights, merging
- `norms`: LayerNorm, GroupNorm, RMSNorm, BatchStatNorm (training-mode BatchNorm)
- `activations`: GELU variants, quick GELU, lookup by Hugging Face / PyTorch name
- `attention`: the one attention entry point and its implementations
- `pooling`: max and average pooling with PyTorch's padding and floor-mode semantics
- `splash`: the Pallas TPU splash kernel behind `attention(..., implementation="splash")`
- `rope`: rotary position embeddings
- `resample`: image resizing equal to PyTorch's, TensorFlow 1's (torch-fidelity) and torchvision's
- `sharding`: activation sharding constraints by logical axis names
- `stack`: stacked layers run by `jax.lax.scan` under a remat policy

Models import the package (`from sga_jax.models import nn`) and use the names below.
"""

from sga_jax.models.nn.activations import ACTIVATIONS, activation, gelu_exact, gelu_tanh, quick_gelu
from sga_jax.models.nn.attention import (
    ATTENTION_IMPLEMENTATIONS, CHUNKED_QUERY_BLOCK, MASK_FREE_IMPLEMENTATIONS, MASKING_IMPLEMENTATIONS, attention,
)
from sga_jax.models.nn.lora import (
    BASE_WEIGHTS, Frozen, LoRAConfig, LoRALinear, adapted_layers, dropout_rng, freeze, merged_weights,
)
from sga_jax.models.nn.norms import BatchStatNorm, RMSNorm, group_norm, layer_norm
from sga_jax.models.nn.params import Axes, Dtype, construction_rngs, conv, dtype_of, linear, logical
from sga_jax.models.nn.pooling import avg_pool, max_pool
from sga_jax.models.nn.resample import (
    Taps, center_crop, resample, resize_short_side, resize_tf1_bilinear, resize_torch, short_side_size,
    tf1_bilinear_taps, torch_taps,
)
from sga_jax.models.nn.rope import apply_rope, axial_rope, rope_angles
from sga_jax.models.nn.sharding import constrain, divisible_spec
from sga_jax.models.nn.splash import SplashBlockSizes
from sga_jax.models.nn.stack import REMAT_POLICIES, remat, scan_layers, stack_layers

__all__ = [
    "ACTIVATIONS", "ATTENTION_IMPLEMENTATIONS", "Axes", "BASE_WEIGHTS", "BatchStatNorm", "CHUNKED_QUERY_BLOCK",
    "Dtype", "Frozen", "LoRAConfig", "LoRALinear", "MASKING_IMPLEMENTATIONS", "MASK_FREE_IMPLEMENTATIONS",
    "REMAT_POLICIES", "RMSNorm", "SplashBlockSizes", "Taps", "activation", "adapted_layers", "apply_rope",
    "attention", "avg_pool", "axial_rope", "center_crop", "constrain", "construction_rngs", "conv", "divisible_spec", "dropout_rng",
    "dtype_of", "freeze", "gelu_exact", "gelu_tanh", "group_norm", "layer_norm", "linear", "logical", "max_pool",
    "merged_weights", "quick_gelu", "remat", "resample", "resize_short_side", "resize_tf1_bilinear", "resize_torch",
    "rope_angles", "scan_layers", "short_side_size", "stack_layers", "tf1_bilinear_taps", "torch_taps",
]
