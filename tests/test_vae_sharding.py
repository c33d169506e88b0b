"""The VAE loaded straight into FSDP shardings over 8 simulated CPU devices (data=2, fsdp=4),
against its one-device result."""

import functools

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sga_jax import parallel
from sga_jax.models import vae


@functools.partial(jax.jit, static_argnums=0)
def _round_trip(graphdef, state, image):
    model = nnx.merge(graphdef, state)
    return model.decode(model.encode(image), return_features=True)


def test_fsdp_sharded_load_and_coding_equal_one_device(tmp_path):
    assert jax.device_count() == 8
    config = vae.AutoEncoderConfig(ch=32, ch_mult=(1, 2), z_channels=8, f16=True)
    vae.save(vae.AutoEncoder(config, rngs=nnx.Rngs(0)), tmp_path / "ae.safetensors")
    image = np.random.default_rng(0).uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32)
    single = vae.load(tmp_path / "ae.safetensors")
    expected = jax.device_get(_round_trip(*nnx.split(single), image))

    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    model = vae.load(tmp_path / "ae.safetensors", shardings=vae.shardings_for(config, mesh))
    kernel = model.decoder.up[1].block[0].conv1.kernel[...]
    assert kernel.shape == (3, 3, 64, 64) and kernel.sharding.spec == P(None, None, None, "fsdp")
    assert model.encoder.mid.attn_1.q.kernel[...].sharding.spec == P(None, "fsdp")

    batched = jax.device_put(image, NamedSharding(mesh, P(("data", "fsdp"))))
    with parallel.activation_sharding(mesh, parallel.resolve_rules(None)):
        out = _round_trip(*nnx.split(model), batched)
    assert out[0].sharding.spec[0] == ("data", "fsdp")
    for ours, theirs in zip(jax.device_get(out), expected):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())
