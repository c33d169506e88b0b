"""Pallas splash attention, the fused TPU kernel (`jax.experimental.pallas.ops.tpu.splash_attention`)
for non-causal, unmasked self- or cross-attention such as Flux's joint attention.

The kernel works on one example's heads-first (H, L, D) arrays, takes no logits scale and needs
sequence lengths that its tiles divide. `splash_attention` adapts it to the entry point's
(B, L, H, D) contract: queries are pre-scaled, the batch is vmapped, sequences are padded to whole
tiles with the padded keys masked out by segment ids, and under a mesh the kernel runs per device
block (batch and heads split by the logical rules) inside `shard_map`, since XLA cannot partition a
Pallas call itself. Forward and backward are the kernel's own (its custom VJP). Off TPU it runs in
Pallas interpret mode on CPU backends (slow, with a one-time warning: the kernel's numbers for
tests and laptops) and refuses GPUs, where cuDNN's fused kernel is the choice.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as kernel_lib

from sga_jax.models.nn.sharding import divisible_spec

LANES = 128  # tile sizes are multiples of the TPU vector lane count
HEADS_FIRST_AXES = ("batch", "heads", None, None)  # logical names of the (B, H, L, D) kernel inputs


@dataclasses.dataclass(frozen=True)
class SplashBlockSizes:
    """Tile sizes of the splash kernel, in tokens (multiples of 128): queries and keys per tile of the
    forward pass (`block_kv_compute` keys per inner step), of the dK/dV pass (`*_dkv`) and of the dQ
    pass (`*_dq`, unused with `fused_backward`, one kernel computing dQ, dK and dV). They change speed,
    not results. Defaults: 512 throughout, MaxText's settings for TPU v5e / v5p. A sequence shorter
    than a tile gets a tile of its own length rounded up to 128.
    """

    block_q: int = 512
    block_kv: int = 512
    block_kv_compute: int = 512
    block_q_dkv: int = 512
    block_kv_dkv: int = 512
    block_kv_dkv_compute: int = 512
    block_q_dq: int = 512
    block_kv_dq: int = 512
    fused_backward: bool = False

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "int" and (not isinstance(value, int) or value < LANES or value % LANES):
                raise ValueError(f"SplashBlockSizes.{field.name} must be a positive multiple of {LANES}, got {value!r}")
        for tile, step in (("block_kv", "block_kv_compute"), ("block_kv_dkv", "block_kv_dkv_compute")):
            if getattr(self, tile) % getattr(self, step):
                raise ValueError(f"SplashBlockSizes.{tile} {getattr(self, tile)} must be a multiple of "
                                 f"{step} {getattr(self, step)}")

    def fitted(self, q_length: int, kv_length: int) -> tuple[kernel_lib.BlockSizes, int, int]:
        """The kernel's tile sizes for these sequence lengths (tiles longer than a sequence shrink to
        it, rounded up to 128) and the padded query and key lengths that every tile divides."""
        q_cap, kv_cap = _round_up(q_length, LANES), _round_up(kv_length, LANES)
        q_tiles = {name: min(getattr(self, name), q_cap) for name in ("block_q", "block_q_dkv", "block_q_dq")}
        kv_tiles = {name: min(getattr(self, name), kv_cap) for name in ("block_kv", "block_kv_dkv", "block_kv_dq")}
        for tile, step in (("block_kv", "block_kv_compute"), ("block_kv_dkv", "block_kv_dkv_compute")):
            kv_tiles[step] = getattr(self, step) if kv_tiles[tile] % getattr(self, step) == 0 else kv_tiles[tile]
        if self.fused_backward:
            del q_tiles["block_q_dq"], kv_tiles["block_kv_dq"]
        sizes = kernel_lib.BlockSizes(**q_tiles, **kv_tiles, use_fused_bwd_kernel=self.fused_backward)
        return sizes, _round_up(q_length, math.lcm(*q_tiles.values())), _round_up(kv_length, math.lcm(*kv_tiles.values()))


def splash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None, block_sizes: SplashBlockSizes | None = None
) -> jax.Array:
    """softmax(scale q k^T) v for (B, Lq, H, D) queries and (B, Lk, H, D) keys / values, all of one
    dtype (bf16 on TPU); returns (B, Lq, H, D). See the module docstring."""
    interpret = _interpret_mode()
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f'attention "splash": q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}')
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:] or k.shape != v.shape:
        raise ValueError(f'attention "splash": q {q.shape}, k {k.shape}, v {v.shape} must be (B, L, H, D) with '
                         "one batch, head count and head dimension (k and v of one length)")
    tiles, q_padded, kv_padded = (block_sizes or SplashBlockSizes()).fitted(q.shape[1], k.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in (q * jnp.asarray(scale, q.dtype), k, v))
    qh = _pad_length(qh, q_padded)
    kh, vh = _pad_length(kh, kv_padded), _pad_length(vh, kv_padded)
    kv_length = k.shape[1]

    def per_device(qh: jax.Array, kh: jax.Array, vh: jax.Array) -> jax.Array:
        segments = None
        if kv_padded != kv_length:
            # Padded queries attend to the real keys like any query (their rows are dropped below);
            # padded keys, in a segment of their own, are seen by no query.
            segments = kernel_lib.SegmentIds(q=jnp.ones((q_padded,), jnp.int32),
                                         kv=(jnp.arange(kv_padded) < kv_length).astype(jnp.int32))
        mask = kernel_lib.MultiHeadMask([kernel_lib.FullMask((q_padded, kv_padded))] * qh.shape[1])
        kernel = kernel_lib.make_splash_mha(mask, block_sizes=tiles, head_shards=1, q_seq_shards=1, interpret=interpret)
        return jax.vmap(kernel, in_axes=(0, 0, 0, None))(qh, kh, vh, segments)

    spec = divisible_spec(HEADS_FIRST_AXES, qh.shape)
    if spec is not None:
        per_device = jax.shard_map(per_device, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    return jnp.swapaxes(per_device(qh, kh, vh)[:, :, : q.shape[1]], 1, 2)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_length(x: jax.Array, length: int) -> jax.Array:
    """Zero-pad heads-first (B, H, L, D) to `length` tokens."""
    return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))


def _interpret_mode() -> bool:
    """False when compiling for TPU (the mesh's devices, else the default backend), True on CPU
    (Pallas interpret mode, warned once); GPUs are refused."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    platform = jax.default_backend() if device is None else device.platform
    if platform == "tpu":
        return False
    if platform == "cpu":
        _warn_interpret()
        return True
    raise ValueError(f'attention "splash" is the Pallas TPU kernel and does not run on {platform!r} devices; '
                     'on NVIDIA GPUs use attention "cudnn" (its fused flash attention)')


@functools.cache
def _warn_interpret() -> None:
    warnings.warn('attention "splash" runs in Pallas interpret mode on the CPU: the TPU kernel\'s numbers, '
                  'but slow (use "chunked" or "xla" for speed off TPU)', stacklevel=5)
