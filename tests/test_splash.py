"""Pallas splash attention in interpret mode on the CPU against `chunked` and `xla`: values and q/k/v
gradients on Flux-like shapes (text + image tokens, padded and whole tiles, fp32 and bf16), on a mesh
(batch and heads split by `shard_map`), in the priors' models, and the refusals. Interpret mode is
slow, so the shapes are small and the kernel's tiles 128 tokens."""

import dataclasses
import importlib.util
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sga_jax import parallel
from sga_jax.models import dinov2, flux, nn, sam2
from sga_jax.models.nn import splash

TILES = nn.SplashBlockSizes(*(128,) * 8)
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}  # max abs error / max abs reference value

pytestmark = pytest.mark.filterwarnings("ignore:attention \"splash\" runs in Pallas interpret mode")


def _flux_like(dtype: str, text: int, image: int, heads: int, head_dim: int, batch: int = 1, seed: int = 0):
    """Joint [text, image] q, k, v as Flux's attention sees them (RMS-normalised q and k) and a cotangent."""
    keys = jax.random.split(jax.random.key(seed), 4)
    shape = (batch, text + image, heads, head_dim)
    q, k, v = (jax.random.normal(key, shape, jnp.float32) for key in keys[:3])
    q, k = (x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True)) for x in (q, k))
    weights = jax.random.normal(keys[3], shape, jnp.float32)
    return tuple(x.astype(dtype) for x in (q, k, v)), weights


def _value_and_grads(implementation: str, qkv: tuple, weights: jax.Array, block_sizes=TILES):
    def loss(q, k, v):
        out = nn.attention(q, k, v, implementation=implementation, block_sizes=block_sizes)
        return jnp.sum(out.astype(jnp.float32) * weights), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(*qkv)
    return out, grads


def _assert_close(ours, theirs, tol: float, what: str) -> None:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != {theirs.shape}"
    error = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert error <= tol, f"{what}: max abs error / scale = {error:.2e} > {tol:.0e}"


@pytest.mark.parametrize(
    ("dtype", "text", "image", "heads", "head_dim"),
    [("float32", 32, 224, 2, 64), ("float32", 21, 179, 3, 128), ("bfloat16", 21, 179, 3, 128)],
    ids=["fp32-whole-tiles-d64", "fp32-padded-d128", "bf16-padded-d128"],
)
def test_splash_equals_chunked_and_xla_in_values_and_gradients(dtype, text, image, heads, head_dim):
    """256 tokens fill two 128-token tiles; 200 tokens are padded to 256 with the padded keys masked."""
    qkv, weights = _flux_like(dtype, text, image, heads, head_dim)
    out, grads = _value_and_grads("splash", qkv, weights)
    assert out.dtype == jnp.dtype(dtype) and out.shape == qkv[0].shape
    for reference in ("chunked", "xla"):
        ref_out, ref_grads = _value_and_grads(reference, qkv, weights)
        _assert_close(out, ref_out, TOLERANCE[dtype], f"{dtype} output vs {reference}")
        for name, ours, theirs in zip("qkv", grads, ref_grads):
            _assert_close(ours, theirs, TOLERANCE[dtype], f"{dtype} d{name} vs {reference}")


def test_splash_cross_attention_lengths_and_fused_backward():
    """Queries and keys of different lengths (SAM2's pooled queries), both padded, with the kernel's
    single fused backward pass."""
    (q, _, _), weights = _flux_like("float32", 0, 130, 2, 64)
    (_, k, v), _ = _flux_like("float32", 0, 300, 2, 64, seed=1)
    fused = dataclasses.replace(TILES, fused_backward=True)
    out, grads = _value_and_grads("splash", (q, k, v), weights, fused)
    ref_out, ref_grads = _value_and_grads("xla", (q, k, v), weights)
    _assert_close(out, ref_out, 1e-5, "output")
    for name, ours, theirs in zip("qkv", grads, ref_grads):
        _assert_close(ours, theirs, 1e-5, f"d{name}")


def test_splash_on_a_mesh_splits_batch_and_heads_and_matches_one_device():
    qkv, weights = _flux_like("float32", 16, 100, 4, 64, batch=2)
    out, grads = _value_and_grads("splash", qkv, weights)
    mesh = parallel.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
    rules = parallel.resolve_rules(None)
    with parallel.activation_sharding(mesh, rules):
        lowered = jax.jit(lambda q, k, v: nn.attention(q, k, v, implementation="splash", block_sizes=TILES)).lower(*qkv)
        sharded_out, sharded_grads = _value_and_grads("splash", qkv, weights)
    assert 'manual_axes={"data", "fsdp", "tensor"}' in lowered.as_text()
    assert '[{"data"}, {"tensor"}, {}, {}]' in lowered.as_text()  # (B, H, L, D) blocks: batch x heads
    _assert_close(sharded_out, out, 1e-6, "sharded output")
    for name, ours, theirs in zip("qkv", sharded_grads, grads):
        _assert_close(ours, theirs, 1e-6, f"sharded d{name}")


@pytest.mark.parametrize(
    ("family", "config", "size"),
    [(dinov2.Dinov2, dinov2.Dinov2Config.tiny(), 28), (sam2.Sam2Hiera, sam2.Sam2HieraConfig.tiny(), 64)],
    ids=["dinov2", "sam2"],
)
def test_priors_with_splash_equal_their_default(family, config, size):
    """A CLS token (DINOv2, as DINOv3 calls the same entry point: 17 tokens padded to 128), windows
    as batch rows and pooled queries (SAM2)."""
    pixels = jax.random.normal(jax.random.key(1), (1, size, size, 3))
    expected = jax.jit(family(config, rngs=nnx.Rngs(0)))(pixels)
    fast = family(dataclasses.replace(config, attention="splash"), rngs=nnx.Rngs(0))
    _assert_close(jax.jit(fast)(pixels), expected, 1e-5, f"{type(config).__name__} output")


def test_splash_warns_once_that_interpret_mode_is_slow():
    qkv, _ = _flux_like("float32", 4, 12, 1, 64)
    splash._warn_interpret.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            jax.eval_shape(lambda q, k, v: nn.attention(q, k, v, implementation="splash"), *qkv)
    assert [str(w.message) for w in caught if "interpret mode" in str(w.message)] == [
        'attention "splash" runs in Pallas interpret mode on the CPU: the TPU kernel\'s numbers, but slow '
        '(use "chunked" or "xla" for speed off TPU)'
    ]


def test_splash_refuses_gpus_naming_cudnn(monkeypatch):
    qkv, _ = _flux_like("float32", 4, 12, 1, 64)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(ValueError, match='does not run on \'gpu\' devices; on NVIDIA GPUs use attention "cudnn"'):
        jax.eval_shape(lambda q, k, v: nn.attention(q, k, v, implementation="splash"), *qkv)


def test_splash_refuses_masks_and_mixed_dtypes():
    (q, k, v), _ = _flux_like("float32", 4, 12, 1, 64)
    with pytest.raises(ValueError, match='"splash" takes no bias, mask or is_causal'):
        nn.attention(q, k, v, implementation="splash", is_causal=True)
    with pytest.raises(ValueError, match="must share a dtype"):
        nn.attention(q, k.astype(jnp.bfloat16), v, implementation="splash")


def test_block_sizes_are_checked_and_fitted_to_short_sequences():
    with pytest.raises(ValueError, match="block_q must be a positive multiple of 128, got 100"):
        nn.SplashBlockSizes(block_q=100)
    with pytest.raises(ValueError, match="block_kv 256 must be a multiple of block_kv_compute 512"):
        nn.SplashBlockSizes(block_kv=256)
    tiles, q_length, kv_length = nn.SplashBlockSizes().fitted(77 + 256, 77 + 256)
    assert (tiles.block_q, tiles.block_kv, tiles.block_kv_compute, q_length, kv_length) == (384, 384, 384, 384, 384)
    tiles, q_length, kv_length = nn.SplashBlockSizes().fitted(512 + 4096, 512 + 4096)  # Flux at 1024 px: whole tiles
    assert (tiles.block_q, tiles.block_q_dq, q_length, kv_length) == (512, 512, 4608, 4608)


def _flux_step_on_tpu(attention: str, devices: list) -> jax.stages.Compiled:
    """A sharded Flux train step (MSE on the velocity, SGD) compiled ahead of time for `devices`:
    one double and one single block at Flux's head size, 4096 image + 512 text tokens, bf16, remat
    "full", one example per device over an fsdp mesh."""
    config = flux.FluxConfig(in_channels=64, out_channels=64, vec_in_dim=64, context_in_dim=64, hidden_size=256,
                             num_heads=2, depth=1, depth_single_blocks=1, dtype="bfloat16", remat="full",
                             attention=attention)
    mesh = parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)
    rules = parallel.resolve_rules(None)
    graph, params = nnx.split(nnx.eval_shape(lambda: flux.Flux(config, rngs=nnx.Rngs(0))), nnx.Param)
    shardings = parallel.state_shardings(params, mesh, rules)
    params = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), nnx.to_pure_dict(params), shardings)
    batch, image, text = len(devices), 4096, 512
    rows = parallel.batch_sharding(mesh, rules)
    shapes = {"img": (batch, image, 64), "img_ids": (batch, image, 3), "txt": (batch, text, 64), "txt_ids": (batch, text, 3),
              "t": (batch,), "y": (batch, 64), "target": (batch, image, 64)}
    inputs = {name: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=rows) for name, shape in shapes.items()}

    def step(params, x):
        def loss(params):
            model = nnx.merge(graph, jax.tree.map(lambda p: p.astype(jnp.bfloat16), params))
            out = model(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["y"], guidance=x["t"])
            return jnp.mean((out.astype(jnp.float32) - x["target"]) ** 2)

        value, grads = jax.value_and_grad(loss)(params)
        return jax.tree.map(lambda p, g: p - 1e-4 * g, params, grads), value

    with parallel.activation_sharding(mesh, rules):
        jitted = jax.jit(step, out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
        return jitted.lower(params, inputs).compile()


def _attention_on_tpu(attention: str, devices: list, shape: tuple) -> jax.stages.Compiled:
    """One bf16 attention forward + backward of `shape` (B, L, H, D), batch over an fsdp mesh."""
    mesh = parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)
    rules = parallel.resolve_rules(None)
    x = jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=parallel.batch_sharding(mesh, rules))

    def grads(q, k, v):
        return jax.grad(lambda *qkv: jnp.sum(nn.attention(*qkv, implementation=attention).astype(jnp.float32)),
                        argnums=(0, 1, 2))(q, k, v)

    with parallel.activation_sharding(mesh, rules):
        return jax.jit(grads).lower(x, x, x).compile()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed: the ahead-of-time TPU compile needs it (pip install libtpu, "
                           "the version jax[tpu] pins; never into the CPU test environment)")
def test_sharded_flux_step_compiles_for_tpu_v5p_and_its_attention_temporaries_are_10x_below_xla():
    """On a v5p-16 topology (8 chips, `v5:2x2x2`) from this host: the sharded Flux step with splash
    compiles and carries the Mosaic kernel; the attention of that step (one example of 4096 image +
    512 text tokens per chip, Flux's 128-wide heads) needs at least 10x fewer temporaries than xla's,
    which keeps the (H, L, L) logits."""
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name="v5:2x2x2", platform="tpu").devices
    assert "tpu_custom_call" in _flux_step_on_tpu("splash", devices).as_text()
    shape = (len(devices), 4096 + 512, 2, 128)
    temps = {name: _attention_on_tpu(name, devices, shape).memory_analysis().temp_size_in_bytes for name in ("splash", "xla")}
    assert temps["xla"] >= 10 * temps["splash"], temps
