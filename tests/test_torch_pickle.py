"""The safe PyTorch pickle reader against files `torch.save` writes (zip and legacy formats): every
dtype, views and shared storages read back equal; any global outside the allow-list is refused by
name without running; truncated and foreign files give clear errors; loaders read .pth files."""

import json
import os
import zipfile

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

from sga_jax import weights as W
from sga_jax.models import vae

FORMATS = {"zip": True, "legacy": False}
LPIPS_LIN = os.path.join(os.path.dirname(__import__("lpips").__file__), "weights", "v0.1", "vgg.pth")


def _state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=generator)
    shared = torch.randn(10, generator=generator)
    return {
        "fp32": torch.randn(3, 4, generator=generator),
        "bf16": torch.randn(2, 5, generator=generator).to(torch.bfloat16),
        "fp16": torch.randn(4, generator=generator).half(),
        "fp64": torch.randn(2, 2, generator=generator).double(),
        "int64": torch.arange(-3, 4),
        "int8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "uint8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "uint16": torch.arange(5).to(torch.uint16),  # a "new" dtype: an untyped storage + dtype marker
        "fp8": torch.randn(4, generator=generator).to(torch.float8_e4m3fn),
        "transposed": base.t(),
        "strided": base[1:5, 1:7:2],
        "expanded": torch.randn(3, 1, generator=generator).expand(3, 4),
        "shared_a": shared[:4],
        "shared_b": shared[3:].view(7, 1),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.randn(2, 3, generator=generator)),
    }


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach()
    if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn):
        return tensor.float().numpy()
    return tensor.numpy()


def _assert_reads_back(reader: W.CheckpointReader, expected: dict[str, torch.Tensor], prefix: str = "") -> None:
    for key, tensor in expected.items():
        got = reader.read(prefix + key)
        assert reader.shape(prefix + key) == tuple(tensor.shape) == got.shape, key
        assert got.flags.c_contiguous, key
        want = _numpy(tensor)
        np.testing.assert_array_equal(got.astype(want.dtype), want, err_msg=key)


@pytest.mark.parametrize("fmt", FORMATS)
def test_state_dicts_read_back_equal_in_both_formats(tmp_path, fmt):
    sd = _state_dict()
    torch.save(sd, tmp_path / "m.pth", _use_new_zipfile_serialization=FORMATS[fmt])
    reader = W.CheckpointReader(tmp_path / "m.pth")
    assert reader.keys() == sorted(sd)
    _assert_reads_back(reader, sd)
    assert reader.read("bf16").dtype == np.dtype("bfloat16") and reader.read("fp16").dtype == np.float16
    assert reader.metadata() == {}


@pytest.mark.parametrize("fmt", FORMATS)
def test_nested_checkpoints_flatten_with_dots_and_skip_other_leaves(tmp_path, fmt):
    sd = _state_dict()
    checkpoint = {
        "state_dict": {"encoder": {k: sd[k] for k in ("fp32", "bf16")}, "head": sd["int64"]},
        "ema": [sd["fp16"], {"w": sd["strided"]}],
        "epoch": 7, "name": "run", "blob": b"\x00\x01", "tags": {"a", "b"}, "lr": 1e-4, "z": 1j,
        "shape": torch.Size([2, 3]), "counts": __import__("collections").Counter("aab"),
    }
    torch.save(checkpoint, tmp_path / "m.ckpt", _use_new_zipfile_serialization=FORMATS[fmt])
    reader = W.CheckpointReader(tmp_path / "m.ckpt", prefix="state_dict.")
    assert reader.keys() == ["ema.0", "ema.1.w", "encoder.bf16", "encoder.fp32", "head"]
    _assert_reads_back(reader, {"encoder.fp32": sd["fp32"], "encoder.bf16": sd["bf16"], "head": sd["int64"],
                                "ema.0": sd["fp16"], "ema.1.w": sd["strided"]})


def test_lpips_legacy_lin_weights_match_the_package(tmp_path):
    """lpips ships its lin layers in the legacy format; torch.load reads the same numbers."""
    reader = W.CheckpointReader(LPIPS_LIN)
    expected = torch.load(LPIPS_LIN, map_location="cpu", weights_only=False)
    assert reader.keys() == sorted(expected) == [f"lin{i}.model.1.weight" for i in range(5)]
    _assert_reads_back(reader, expected)


class _Payload:
    """An object whose unpickling would run a shell command (the classic pickle exploit)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _EvalPayload(_Payload):
    def __reduce__(self):
        return eval, (f"open({self.marker!r}, 'w').close()",)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("payload", "global_name"), [(_Payload, "posix.system"), (_EvalPayload, "builtins.eval")])
def test_non_allow_listed_globals_are_refused_by_name_and_never_run(tmp_path, fmt, payload, global_name):
    marker = tmp_path / "pwned"
    torch.save({"weight": torch.ones(2), "evil": payload(marker)}, tmp_path / "evil.pth",
               _use_new_zipfile_serialization=FORMATS[fmt])
    with pytest.raises(W.UnsafePickleError, match=rf"evil\.pth: refused to unpickle the global {global_name}") as info:
        W.CheckpointReader(tmp_path / "evil.pth")
    assert info.value.global_name == global_name
    assert isinstance(info.value, W.CheckpointError)
    assert not marker.exists()
    # the control: torch's unrestricted loader does run it, so the payload was live
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.exists()


def test_a_pickled_module_is_refused_with_its_class_named(tmp_path):
    torch.save(torch.nn.Linear(2, 3), tmp_path / "model.pt")
    with pytest.raises(W.UnsafePickleError, match=r"global torch\.nn\.modules\.linear\.Linear.*state_dict"):
        W.CheckpointReader(tmp_path / "model.pt")


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_files_give_a_clear_checkpoint_error(tmp_path, fmt):
    torch.save(_state_dict(), tmp_path / "full.pth", _use_new_zipfile_serialization=FORMATS[fmt])
    data = (tmp_path / "full.pth").read_bytes()
    for cut in (len(data) - 16, len(data) // 2, 40):
        (tmp_path / "cut.pth").write_bytes(data[:cut])
        with pytest.raises(W.CheckpointError, match=r"cut\.pth: .*(truncated|not a readable)"):
            W.CheckpointReader(tmp_path / "cut.pth")


def test_a_storage_record_of_the_wrong_size_is_named(tmp_path):
    torch.save({"w": torch.ones(4)}, tmp_path / "ok.pth")
    with zipfile.ZipFile(tmp_path / "ok.pth") as source, zipfile.ZipFile(tmp_path / "short.pth", "w") as target:
        for info in source.infolist():
            target.writestr(info, source.read(info)[:8] if info.filename.endswith("/data/0") else source.read(info))
    with pytest.raises(W.CheckpointError, match=r"short\.pth: storage record ok/data/0 has 8 bytes, its 4 elements "
                                                r"of float32 need 16"):
        W.CheckpointReader(tmp_path / "short.pth")


def test_files_that_are_not_torch_checkpoints_are_clear_errors(tmp_path):
    (tmp_path / "noise.pth").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(W.CheckpointError, match=r"noise\.pth: not a readable PyTorch checkpoint"):
        W.CheckpointReader(tmp_path / "noise.pth")
    with pytest.raises(W.CheckpointError, match=r"noise\.pth: not a readable PyTorch checkpoint"):
        W.CheckpointReader(tmp_path)
    import pickle

    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(W.CheckpointError, match="wrong magic number"):
        W.CheckpointReader(tmp_path / "plain.pkl")
    with zipfile.ZipFile(tmp_path / "other.bin", "w") as archive:
        archive.writestr("x/readme.txt", "hello")
    with pytest.raises(W.CheckpointError, match=r"not a torch.save archive \(expected one <root>/data.pkl, found 0\)"):
        W.CheckpointReader(tmp_path / "other.bin")
    loop = {"w": torch.ones(1)}
    loop["self"] = loop
    torch.save(loop, tmp_path / "loop.pt")
    with pytest.raises(W.CheckpointError, match="nested too deeply"):
        W.CheckpointReader(tmp_path / "loop.pt")
    torch.save({"epoch": 1}, tmp_path / "empty.pt")
    with pytest.raises(W.CheckpointError, match="without named tensors"):
        W.CheckpointReader(tmp_path / "empty.pt")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.complex64])
def test_big_endian_archives_are_byte_swapped(tmp_path, dtype):
    """A zip whose byteorder record says "big" (as a big-endian machine writes it) reads the same."""
    base = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    base = (base * 100).to(dtype) if dtype == torch.int64 else base.to(dtype)
    sd = {"a": base, "view": base.t()[1:5:2]}
    torch.save(sd, tmp_path / "little.pth")
    part = np.dtype(f"u{base.element_size() // (2 if base.is_complex() else 1)}")
    with zipfile.ZipFile(tmp_path / "little.pth") as source, zipfile.ZipFile(tmp_path / "big.pth", "w") as target:
        for info in source.infolist():
            data = source.read(info)
            kind = info.filename.split("/")[1]
            if kind == "byteorder":
                data = b"big"
            elif kind == "data":
                data = np.frombuffer(data, part).byteswap().tobytes()
            target.writestr(info, data)
    _assert_reads_back(W.CheckpointReader(tmp_path / "big.pth"), sd)


def test_directories_prefer_safetensors_then_hugging_face_pickles(tmp_path):
    sd = _state_dict()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    torch.save(_Payload(tmp_path / "pwned"), tmp_path / "training_args.bin")  # never opened
    _assert_reads_back(W.CheckpointReader(tmp_path), sd)
    save_file({"only": torch.ones(2)}, tmp_path / "model.safetensors")
    assert W.CheckpointReader(tmp_path).keys() == ["only"]
    assert not (tmp_path / "pwned").exists()

    shards = tmp_path / "sharded"
    shards.mkdir()
    names = sorted(sd)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        filename = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, shards / filename)
        weight_map.update({k: filename for k in part})
    (shards / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _assert_reads_back(W.CheckpointReader(shards), sd)

    several = tmp_path / "several"
    several.mkdir()
    torch.save({"trunk.w": sd["fp32"]}, several / "trunk.pth")
    torch.save({"head.w": sd["fp16"]}, several / "head.pt", _use_new_zipfile_serialization=False)
    assert W.CheckpointReader(several).keys() == ["head.w", "trunk.w"]


def test_vae_loads_a_pth_equal_to_its_safetensors(tmp_path):
    config = vae.AutoEncoderConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, norm_groups=4,
                                   tile_size=64, tile_overlap=16)
    model = vae.AutoEncoder(config, rngs=nnx.Rngs(3))
    vae.save(model, tmp_path / "ae.safetensors")
    torch.save(load_file(tmp_path / "ae.safetensors"), tmp_path / "ae.pth")
    from_pickle = vae.load(tmp_path / "ae.pth", config)
    from_safetensors = vae.load(tmp_path / "ae.safetensors")
    for a, b in zip(jax.tree.leaves(nnx.state(from_pickle, nnx.Param)), jax.tree.leaves(nnx.state(from_safetensors, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
