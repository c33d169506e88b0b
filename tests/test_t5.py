"""T5 encoder against transformers' T5EncoderModel: parity, converters, presets, sharding."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from sga_jax import weights as W
from sga_jax.models import t5
from tests.torch_reference import assert_close_relative, randomize_, to_numpy

HF_TINY = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=20,
               feed_forward_proj="gated-gelu", dropout_rate=0.0)


def _reference(tmp_path, **overrides):
    """A random transformers T5EncoderModel saved as save_pretrained writes it."""
    torch.manual_seed(0)
    model = randomize_(transformers.T5EncoderModel(transformers.T5Config(**{**HF_TINY, **overrides})), seed=1, scale=0.3)
    model.save_pretrained(tmp_path / "t5", safe_serialization=True)
    return model, tmp_path / "t5"


def _batch(batch=3, length=24, vocab=128, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, size=(batch, length))
    lengths = [length, length // 2, 5][:batch]
    mask = np.zeros((batch, length), np.int64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n - 1] = 1  # </s>
        ids[i, n:] = 0  # <pad>
    return ids, mask


@pytest.mark.parametrize("gated", [True, False])
def test_matches_transformers_with_padding_and_mask(tmp_path, gated):
    ref, folder = _reference(tmp_path, feed_forward_proj="gated-gelu" if gated else "relu")
    model = t5.load(folder)
    assert model.config.is_gated_act == gated and model.config.num_layers == 3
    ids, mask = _batch()
    with torch.no_grad():
        want_masked = to_numpy(ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state)
        want_plain = to_numpy(ref(input_ids=torch.from_numpy(ids)).last_hidden_state)
    got_masked = jax.jit(lambda m, i, a: m(i, a))(model, jnp.asarray(ids), jnp.asarray(mask))
    got_plain = jax.jit(lambda m, i: m(i))(model, jnp.asarray(ids))
    assert_close_relative(got_masked, want_masked, 1e-4, "masked last_hidden_state")
    assert_close_relative(got_plain, want_plain, 1e-4, "unmasked last_hidden_state")
    assert np.abs(want_masked - want_plain).max() > 1e-2  # the mask matters, so both checks have teeth


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    for length, buckets, distance in [(512, 32, 128), (77, 8, 20)]:
        rel = np.arange(length)[None, :] - np.arange(length)[:, None]
        want = T5Attention._relative_position_bucket(torch.from_numpy(rel), True, buckets, distance).numpy()
        got = t5.relative_position_buckets(length, length, num_buckets=buckets, max_distance=distance)
        np.testing.assert_array_equal(got, want)


def test_save_loads_back_in_transformers(tmp_path):
    ref, folder = _reference(tmp_path)
    model = t5.load(folder)
    t5.save(model, tmp_path / "out")
    back = transformers.T5EncoderModel.from_pretrained(tmp_path / "out").eval()
    ids, mask = _batch(seed=3)
    with torch.no_grad():
        a = to_numpy(ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state)
        b = to_numpy(back(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state)
    np.testing.assert_array_equal(a, b)


def test_config_inferred_from_shapes_and_json_round_trip(tmp_path):
    _, folder = _reference(tmp_path)
    inferred = t5.infer_config(W.CheckpointReader(folder), relative_attention_max_distance=20)
    from_json = t5.T5Config.from_hf_config(json.loads((folder / "config.json").read_text()))
    assert inferred == from_json
    assert t5.T5Config.from_dict(json.loads(json.dumps(from_json.to_dict()))) == from_json
    for config in (t5.T5Config.tiny(), t5.T5Config.tiny(is_gated_act=False, dense_act_fn="relu")):
        hf = transformers.T5Config(**config.to_hf_config())
        assert (hf.is_gated_act, hf.dense_act_fn) == (config.is_gated_act, config.dense_act_fn)
        assert t5.T5Config.from_hf_config(hf.to_dict()) == config
    with pytest.raises(ValueError, match="num_heads"):
        t5.T5Config.tiny(num_heads=0)
    with pytest.raises(ValueError, match="unknown fields"):
        t5.T5Config.from_dict({"d_modl": 3})


def test_wrong_shape_is_named(tmp_path):
    _, folder = _reference(tmp_path)
    config = t5.T5Config.from_hf_config(json.loads((folder / "config.json").read_text()), d_ff=50)
    with pytest.raises(W.CheckpointError, match=r"DenseReluDense\.wi_0\.weight' has shape \(48, 32\), expected \(50, 32\)"):
        t5.load(folder, config)


def test_xxl_preset_has_transformers_parameter_count():
    hf = transformers.T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                               feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        reference = transformers.T5EncoderModel(hf)
    want = sum(p.numel() for p in reference.parameters())
    model = nnx.eval_shape(lambda: t5.T5EncoderModel(t5.T5Config.xxl(), rngs=nnx.Rngs(0)))
    got = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert got == want == 4_762_310_656
    assert t5.T5Config.from_hf_config(hf.to_dict()) == t5.T5Config.xxl()


def test_bfloat16_error_no_worse_than_transformers_bfloat16(tmp_path):
    ref, folder = _reference(tmp_path)
    ids, mask = _batch()
    args = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    with torch.no_grad():
        exact = to_numpy(ref(**args).last_hidden_state)
        ref_half = transformers.T5EncoderModel.from_pretrained(folder, dtype=torch.bfloat16).eval()
        ref_err = np.abs(to_numpy(ref_half(**args).last_hidden_state) - exact).max()
    half = t5.load(folder, dtype="bfloat16", param_dtype="bfloat16")
    assert half.shared.embedding[...].dtype == jnp.bfloat16
    out = half(jnp.asarray(ids), jnp.asarray(mask))
    assert out.dtype == jnp.bfloat16
    our_err = np.abs(np.asarray(out, np.float32) - exact).max()
    assert our_err <= 1.5 * ref_err, (our_err, ref_err)


def test_sharded_forward_equals_single_device(tmp_path):
    from sga_jax import parallel

    _, folder = _reference(tmp_path, d_model=64, d_ff=96, num_heads=8)
    ids, mask = _batch(batch=4, seed=5)
    single = t5.load(folder)(jnp.asarray(ids), jnp.asarray(mask))

    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = parallel.resolve_rules(None)
    model = t5.load(folder, shardings=lambda abstract: parallel.state_shardings(abstract, mesh, rules))
    kernel = model.encoder.block.layer[1].DenseReluDense.wi_0.kernel[...]
    assert kernel.addressable_shards[0].data.shape == (3, 32, 48)  # (layers, embed / fsdp, mlp / tensor)
    graphdef, params = nnx.split(model)

    @jax.jit
    def forward(params, ids, mask):
        return nnx.merge(graphdef, params)(ids, mask)

    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    with parallel.activation_sharding(mesh, rules):
        sharded = forward(params, jax.device_put(jnp.asarray(ids), batch), jax.device_put(jnp.asarray(mask), batch))
    assert len(sharded.sharding.device_set) == 8
    assert_close_relative(sharded, single, 1e-5, "sharded forward")
