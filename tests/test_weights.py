"""The shared streaming reader/writer and key maps, against safetensors' own numpy writer."""

import json

import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from sga_jax import weights as W
from sga_jax.models import nn


class _Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.qkv = nn.linear(4, 12, rngs=rngs)
        self.norm = nn.RMSNorm(4)


class _Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.blocks = nn.stack_layers(_Block, 2, rngs)
        self.out = nn.linear(4, 6, rngs=rngs)


KEY_MAP = {
    "blocks.qkv.kernel": W.rule(*[f"b.{{i}}.to_{n}.weight" for n in "qkv"], transform=W.Concat(1, (4, 4, 4), W.LINEAR), layers=2),
    "blocks.qkv.bias": W.rule(*[f"b.{{i}}.to_{n}.bias" for n in "qkv"], transform=W.Concat(0, (4, 4, 4)), layers=2),
    "blocks.norm.scale": W.rule("b.{i}.norm.weight", layers=2),
    "out.kernel": W.rule("out.weight", transform=W.SwapHalves(1, W.LINEAR)),
    "out.bias": W.rule("out.bias", transform=W.SwapHalves(0)),
}


def _torch_style_state_dict(dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    sd = {}
    for i in range(2):
        for n in "qkv":
            sd[f"b.{i}.to_{n}.weight"] = rng.normal(size=(4, 4)).astype(dtype)
            sd[f"b.{i}.to_{n}.bias"] = rng.normal(size=(4,)).astype(dtype)
        sd[f"b.{i}.norm.weight"] = rng.normal(size=(4,)).astype(dtype)
    sd["out.weight"] = rng.normal(size=(6, 4)).astype(dtype)
    sd["out.bias"] = rng.normal(size=(6,)).astype(dtype)
    return sd


def _abstract():
    return nnx.state(nnx.eval_shape(lambda: _Model(nnx.Rngs(0))), nnx.Param)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_load_then_save_round_trips_exactly(tmp_path, dtype):
    sd = _torch_style_state_dict(dtype)
    save_file(sd, str(tmp_path / "m.safetensors"))
    state = W.load_state(W.CheckpointReader(tmp_path / "m.safetensors"), KEY_MAP, _abstract())
    kernel = np.asarray(state["blocks"]["qkv"]["kernel"][...])
    np.testing.assert_array_equal(kernel[1][:, 4:8], sd["b.1.to_k.weight"].astype(np.float32).T)
    out_bias = np.asarray(state["out"]["bias"][...])
    np.testing.assert_array_equal(out_bias, np.concatenate([sd["out.bias"][3:], sd["out.bias"][:3]]).astype(np.float32))

    files = W.save_state(tmp_path / "out" / "x.safetensors", state, KEY_MAP, dtype=dtype, max_shard_bytes=100)
    assert len(files) > 1
    index = json.loads((tmp_path / "out" / "x.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sd)
    reader = W.CheckpointReader(tmp_path / "out")
    for key, value in sd.items():
        np.testing.assert_array_equal(reader.read(key), value)


def test_wrong_shape_names_key_and_shapes(tmp_path):
    sd = _torch_style_state_dict()
    sd["out.weight"] = np.zeros((5, 4), np.float32)
    save_file(sd, str(tmp_path / "m.safetensors"))
    with pytest.raises(W.CheckpointError, match=r"'out\.weight' has shape \(5, 4\), expected \(6, 4\)"):
        W.load_state(W.CheckpointReader(tmp_path / "m.safetensors"), KEY_MAP, _abstract())


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    sd = _torch_style_state_dict()
    del sd["b.1.norm.weight"]
    sd["extra.weight"] = np.zeros(3, np.float32)
    save_file(sd, str(tmp_path / "m.safetensors"))
    with pytest.raises(W.CheckpointError, match=r"missing 1 tensors: b\.1\.norm\.weight[\s\S]*unexpected 1 tensors: extra\.weight"):
        W.load_state(W.CheckpointReader(tmp_path / "m.safetensors"), KEY_MAP, _abstract())


def test_prefix_is_stripped(tmp_path):
    sd = {"model.diffusion_model." + k: v for k, v in _torch_style_state_dict().items()}
    save_file(sd, str(tmp_path / "m.safetensors"))
    reader = W.CheckpointReader(tmp_path / "m.safetensors", prefix="model.diffusion_model.")
    assert "out.weight" in reader and reader.shape("out.weight") == (6, 4)


@pytest.mark.parametrize("name", ["model.bin", "model.pt", "model.ckpt", "model.pth"])
def test_pickle_checkpoints_go_through_the_torch_pickle_reader(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(W.CheckpointError, match="not a readable PyTorch checkpoint"):
        W.CheckpointReader(tmp_path / name)
    with pytest.raises(W.CheckpointError, match="not a readable PyTorch checkpoint"):
        W.CheckpointReader(tmp_path)


def test_corrupt_file_is_a_clear_error(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(W.CheckpointError, match="not a readable safetensors file"):
        W.CheckpointReader(tmp_path / "bad.safetensors")

