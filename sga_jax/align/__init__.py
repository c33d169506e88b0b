"""Alignment losses and heads: Spatial Gram Alignment and the REPA / iREPA baselines.

Pure jittable losses on channels-last token arrays (B, N, C), NNX projection heads, adaptive
pooling over token grids, and a toolkit for the loss geometry (`sga_jax.align.geometry`).
"""

from sga_jax.align.baselines import irepa_loss, repa_loss, spatial_normalize
from sga_jax.align.pool import (
    adaptive_avg_pool,
    grid_for_long_edge,
    grid_to_tokens,
    pool_tokens,
    tokens_to_grid,
)
from sga_jax.align.projector import IREPAHead, REPAHead, SGAHead
from sga_jax.align.sga import choose_method, method_costs, normalize_rows, sga_loss, spatial_gram

__all__ = [
    "IREPAHead",
    "REPAHead",
    "SGAHead",
    "adaptive_avg_pool",
    "choose_method",
    "method_costs",
    "grid_for_long_edge",
    "grid_to_tokens",
    "irepa_loss",
    "normalize_rows",
    "pool_tokens",
    "repa_loss",
    "sga_loss",
    "spatial_gram",
    "spatial_normalize",
    "tokens_to_grid",
]
