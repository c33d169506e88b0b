"""FoundationEncoder: the paper's grids and input sizes, features equal to transformers' patch
tokens on the same pixels, frozen (no gradient), jit and a batch sharded over 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from sga_jax import parallel
from sga_jax.encoders import FoundationEncoder
from sga_jax.models import dinov2, dinov3, sam2
from tests.torch_reference import assert_close_relative, nhwc_to_nchw, randomize_, to_numpy

PRESETS = {
    "dinov2": lambda: dinov2.Dinov2(dinov2.Dinov2Config.vitb14(), rngs=nnx.Rngs(0)),
    "dinov3": lambda: dinov3.Dinov3(dinov3.Dinov3Config.vitb16(), rngs=nnx.Rngs(0)),
    "sam2": lambda: sam2.Sam2Hiera(sam2.Sam2HieraConfig.base_plus(), rngs=nnx.Rngs(0)),
}


@pytest.mark.parametrize(
    "kind, image, long_edge, grid, pixels",
    [
        ("dinov2", (1024, 1024), 32, (32, 32), (448, 448)),
        ("dinov3", (1024, 1024), 32, (32, 32), (512, 512)),
        ("sam2", (1024, 1024), 32, (32, 32), (1024, 1024)),
        ("dinov2", (2160, 3840), 64, (36, 64), (504, 896)),
        ("dinov3", (1536, 1024), 32, (32, 21), (512, 336)),
        ("sam2", (768, 1024), 32, (24, 32), (768, 1024)),
        ("sam2", (512, 512), 16, (16, 16), (512, 512)),
        ("dinov2", (512, 512), 32, (32, 32), (448, 448)),
    ],
)
def test_paper_grids(kind, image, long_edge, grid, pixels):
    encoder = FoundationEncoder(kind, nnx.eval_shape(PRESETS[kind]), long_edge=long_edge)
    assert encoder.grid(*image) == grid
    assert encoder.input_size(*image) == pixels
    out = jax.eval_shape(lambda e, x: e(x), encoder, jax.ShapeDtypeStruct((2, *image, 3), jnp.float32))
    assert out.shape == (2, *grid, encoder.dim)


def _normalised(images: np.ndarray) -> torch.Tensor:
    mean, std = np.array(dinov2.IMAGE_MEAN), np.array(dinov2.IMAGE_STD)
    return nhwc_to_nchw(((images + 1) / 2 - mean) / std)


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    path = tmp_path_factory.mktemp("dinov2_reg")
    reference = transformers.Dinov2WithRegistersModel(
        transformers.Dinov2WithRegistersConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=7, num_register_tokens=4
        )
    )
    randomize_(reference, seed=2)
    reference.save_pretrained(path, safe_serialization=True)
    return reference, path


def test_features_are_transformers_patch_tokens(tiny_dinov2):
    reference, path = tiny_dinov2
    encoder = FoundationEncoder.from_pretrained("dinov2", path, long_edge=8, dtype="float32")
    images = np.random.default_rng(0).uniform(-1, 1, (2, 28, 56, 3)).astype(np.float32)
    with torch.no_grad():
        tokens = to_numpy(reference(pixel_values=_normalised(images)).last_hidden_state)
    want = tokens[:, 5:].reshape(2, 4, 8, 32)
    got = jax.jit(lambda e, x: e(x))(encoder, jnp.asarray(images))
    assert_close_relative(got, want, 1e-4, "DINOv2 patch tokens")


def test_sam2_features_are_the_last_stage(tmp_path):
    config = transformers.Sam2HieraDetConfig(
        hidden_size=16, num_attention_heads=1, blocks_per_stage=[1, 1, 1, 2], embed_dim_per_stage=[16, 32, 64, 128],
        num_attention_heads_per_stage=[1, 2, 2, 4], window_size_per_stage=[4, 2, 2, 2], global_attention_blocks=[4],
        window_positional_embedding_background_size=[4, 4],
    )
    reference = randomize_(transformers.Sam2HieraDetModel(config), seed=4)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    encoder = FoundationEncoder.from_pretrained("sam2", tmp_path, long_edge=2, dtype="float32")
    images = np.random.default_rng(1).uniform(-1, 1, (1, 32, 64, 3)).astype(np.float32)
    with torch.no_grad():
        want = to_numpy(reference(pixel_values=_normalised(images)).last_hidden_state)
    got = jax.jit(lambda e, x: e(x))(encoder, jnp.asarray(images))
    assert_close_relative(got, want, 1e-4, "SAM2 last stage")


def test_resizes_any_aspect_ratio_and_stays_frozen():
    encoder = FoundationEncoder("dinov3", dinov3.Dinov3(dinov3.Dinov3Config.tiny(), rngs=nnx.Rngs(0)), long_edge=4)
    graphdef, state = nnx.split(encoder)
    images = jax.random.uniform(jax.random.key(0), (2, 45, 30, 3), minval=-1, maxval=1)

    @jax.jit
    def loss(state, images):
        return jnp.sum(nnx.merge(graphdef, state)(images) ** 2)

    value, (grad_state, grad_images) = jax.value_and_grad(loss, argnums=(0, 1))(state, images)
    assert np.isfinite(value) and value > 0
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grad_state))
    assert float(jnp.abs(grad_images).max()) == 0.0
    assert jax.eval_shape(encoder, images).shape == (2, 4, 3, 32)


def test_bfloat16_encoder_is_close_to_float32(tiny_dinov2):
    _, path = tiny_dinov2
    fast = FoundationEncoder.from_pretrained("dinov2", path, long_edge=4)
    exact = FoundationEncoder.from_pretrained("dinov2", path, long_edge=4, dtype="float32")
    images = jax.random.uniform(jax.random.key(1), (1, 40, 40, 3), minval=-1, maxval=1)
    got = jax.jit(lambda e, x: e(x))(fast, images)
    assert got.dtype == jnp.bfloat16
    want = np.asarray(jax.jit(lambda e, x: e(x))(exact, images))
    assert np.abs(np.asarray(got, np.float32) - want).max() / np.abs(want).max() < 5e-2


def test_batch_sharded_over_eight_devices_equals_one_device():
    assert jax.device_count() == 8
    encoder = FoundationEncoder("dinov2", dinov2.Dinov2(dinov2.Dinov2Config.tiny(registers=True), rngs=nnx.Rngs(1)), long_edge=4)
    graphdef, state = nnx.split(encoder)
    images = jax.random.uniform(jax.random.key(2), (8, 48, 96, 3), minval=-1, maxval=1)
    run = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    want = np.asarray(run(state, images))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    sharded = jax.device_put(images, NamedSharding(mesh, PartitionSpec("data")))
    got = run(state, sharded)
    assert got.shape == (8, 2, 4, 32)
    assert len(got.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_rejects_mismatched_model():
    with pytest.raises(ValueError, match="kind 'sam2' needs a Sam2Hiera, got Dinov3"):
        FoundationEncoder("sam2", dinov3.Dinov3(dinov3.Dinov3Config.tiny(), rngs=nnx.Rngs(0)))


def test_loads_into_fsdp_shardings_and_matches_one_device(tiny_dinov2):
    _, path = tiny_dinov2
    mesh = parallel.make_mesh({"fsdp": 8})
    rules = parallel.resolve_rules(None)
    abstract = nnx.state(nnx.eval_shape(lambda: dinov2.Dinov2(dinov2.Dinov2Config.tiny(registers=True), rngs=nnx.Rngs(0))))
    shardings = parallel.state_shardings(abstract, mesh, rules)
    sharded = FoundationEncoder.from_pretrained("dinov2", path, long_edge=4, dtype="float32", shardings=shardings)
    kernel = sharded.model.encoder.layer.mlp.fc1.kernel[...]
    assert kernel.sharding.spec == PartitionSpec(None, "fsdp")
    single = FoundationEncoder.from_pretrained("dinov2", path, long_edge=4, dtype="float32")
    images = jax.random.uniform(jax.random.key(3), (8, 28, 28, 3), minval=-1, maxval=1)
    graphdef, state = nnx.split(sharded)
    run = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    with parallel.activation_sharding(mesh, rules):
        got = run(state, jax.device_put(images, parallel.batch_sharding(mesh, rules)))
    want = jax.jit(lambda e, x: e(x))(single, images)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
