"""Projection heads that map generative tokens into the space they are aligned in (Flax NNX).

Every head takes tokens (B, N, C_in) laid out row-major on a static grid (h, w) and returns
(tokens (B, N', C_out), out_grid): a per-position projection, then adaptive average pooling to the
output grid. The output grid is, in order of precedence, the `out_grid` passed at call time (the
prior's grid), the grid with the head's `long_edge` (`grid_for_long_edge`), or the projection's own.

* `SGAHead`: one convolution (kernel, stride configurable; stride 2 in the diffusion stage), the
  paper's head. PyTorch-style symmetric padding (kernel - 1) // 2, so stride s gives ceil(h / s).
* `IREPAHead`: iREPA's single convolution, kernel 1 by default, stride 1.
* `REPAHead`: REPA's per-token MLP, Linear D->2048, SiLU, Linear 2048->2048, SiLU, Linear 2048->C_out.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sga_jax.align.pool import Grid, adaptive_avg_pool, grid_for_long_edge, grid_to_tokens, tokens_to_grid
from sga_jax.models import nn


def _pool_to(x: jax.Array, out_grid: Sequence[int] | None, long_edge: int | None) -> tuple[jax.Array, Grid]:
    """Pool a (B, h, w, C) grid to the call's `out_grid`, else to `long_edge`, else keep it."""
    grid = (x.shape[1], x.shape[2])
    if out_grid is None:
        out_grid = grid_for_long_edge(*grid, long_edge) if long_edge is not None else grid
    out_grid = (int(out_grid[0]), int(out_grid[1]))
    return grid_to_tokens(adaptive_avg_pool(x, out_grid)), out_grid


class SGAHead(nnx.Module):
    """The paper's projection head: one conv (default 3x3, stride 1; stride 2 in the diffusion
    stage), then adaptive average pooling to `out_grid` / `long_edge`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        kernel_size: int = 3,
        stride: int = 1,
        long_edge: int | None = None,
        dtype: nn.Dtype = None,
        param_dtype: nn.Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if kernel_size < 1 or stride < 1:
            raise ValueError(f"kernel_size and stride must be >= 1, got {kernel_size} and {stride}")
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = (kernel_size - 1) // 2
        self.long_edge = long_edge
        self.conv = nn.conv(
            in_features,
            out_features,
            kernel_size,
            strides=stride,
            padding=self.padding,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def conv_grid(self, grid: Sequence[int]) -> Grid:
        """The grid the convolution produces from `grid`: floor((n + 2 pad - k) / stride) + 1 per axis."""
        h, w = (int(n) + 2 * self.padding - self.kernel_size for n in grid)
        return h // self.stride + 1, w // self.stride + 1

    def __call__(
        self, x: jax.Array, grid: Sequence[int], out_grid: Sequence[int] | None = None
    ) -> tuple[jax.Array, Grid]:
        """(B, h*w, C_in) tokens on `grid` -> ((B, N', C_out) tokens, out_grid)."""
        y = self.conv(tokens_to_grid(x, grid))
        return _pool_to(y, out_grid, self.long_edge)


class IREPAHead(SGAHead):
    """iREPA's projector: one conv at stride 1 (kernel 1 as in its LDM setting; 3 in its paper),
    then adaptive average pooling to `out_grid` / `long_edge`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        kernel_size: int = 1,
        long_edge: int | None = None,
        dtype: nn.Dtype = None,
        param_dtype: nn.Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            in_features,
            out_features,
            kernel_size=kernel_size,
            stride=1,
            long_edge=long_edge,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )


class REPAHead(nnx.Module):
    """REPA's projector: per-token MLP D -> hidden -> hidden -> C_out with SiLU, then pooling."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        hidden: int = 2048,
        long_edge: int | None = None,
        dtype: nn.Dtype = None,
        param_dtype: nn.Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.long_edge = long_edge
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = nn.linear(in_features, hidden, ("embed", "mlp"), **kw)
        self.fc2 = nn.linear(hidden, hidden, ("mlp", None), **kw)
        self.fc3 = nn.linear(hidden, out_features, ("mlp", "embed"), **kw)

    def __call__(
        self, x: jax.Array, grid: Sequence[int], out_grid: Sequence[int] | None = None
    ) -> tuple[jax.Array, Grid]:
        """(B, h*w, C_in) tokens on `grid` -> ((B, N', C_out) tokens, out_grid)."""
        y = self.fc3(jax.nn.silu(self.fc2(jax.nn.silu(self.fc1(x)))))
        return _pool_to(tokens_to_grid(y, grid), out_grid, self.long_edge)
