"""Reading checkpoints one tensor at a time, without torch and without memory-mapping whole files:
safetensors files, PyTorch pickles (through `torch_pickle`'s allow-listing unpickler), sharded
indexes of either, and directories holding them."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Protocol, Sequence

import ml_dtypes
import numpy as np
from safetensors import safe_open

from sga_jax.weights.fileio import CheckpointError, read_into
from sga_jax.weights.torch_pickle import TorchPickleFile

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
# The weight files of Hugging Face / diffusers pickle directories, which also hold other pickles
# (training_args.bin, optimizer.pt, ...) that are not weights.
HF_PICKLE_NAMES = ("pytorch_model.bin", "diffusion_pytorch_model.bin")

SAFETENSORS_DTYPES: dict[str, Any] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
SAFETENSORS_NAMES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}


class TensorFile(Protocol):
    """One checkpoint file as a name -> tensor mapping (what `CheckpointReader` merges)."""

    path: Path

    def keys(self) -> list[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def read(self, key: str) -> np.ndarray: ...

    def metadata(self) -> dict[str, str]: ...


class SafetensorsFile:
    """One safetensors file: opened (and validated) by safetensors, tensors read by positional reads."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._handle = safe_open(str(self.path), framework="numpy")
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({err})") from err
        self._layout: tuple[int, dict[str, Any]] | None = None

    def keys(self) -> list[str]:
        return list(self._handle.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle.get_slice(key).get_shape())

    def metadata(self) -> dict[str, str]:
        return dict(self._handle.metadata() or {})

    def read(self, key: str) -> np.ndarray:
        base, header = self._header()
        entry = header[key]
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        out = np.empty(entry["shape"], SAFETENSORS_DTYPES[entry["dtype"]])
        buffer = memoryview(out.reshape(-1).view(np.uint8))
        if len(buffer) != end - start:
            raise CheckpointError(f"{self.path}: tensor {key!r} spans {end - start} bytes, its shape needs {len(buffer)}")
        read_into(self.path, base + start, buffer, f"tensor {key!r}")
        return out

    def _header(self) -> tuple[int, dict[str, Any]]:
        """(offset of the data section, header entries), parsed once."""
        if self._layout is None:
            with open(self.path, "rb") as handle:
                (size,) = struct.unpack("<Q", handle.read(8))
                self._layout = (8 + size, json.loads(handle.read(size)))
        return self._layout


def open_tensor_file(path: Path) -> TensorFile:
    """A reader for one file, chosen by its suffix: safetensors, or a PyTorch pickle."""
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    if path.name.endswith(PICKLE_SUFFIXES):
        return TorchPickleFile(path)
    raise CheckpointError(f"{path}: expected a .safetensors file, a PyTorch pickle ({', '.join(PICKLE_SUFFIXES)}), "
                          "an index.json or a directory")


class CheckpointReader:
    """Read-only view of one or more checkpoint files as a single name -> tensor mapping.

    `path` may be a .safetensors file, a PyTorch pickle (.pt/.pth/.bin/.ckpt, zip or legacy
    `torch.save` format, read by an allow-listing unpickler that never runs code from the file), a
    sharded `*.index.json` of either, or a directory. A directory is read as its safetensors
    (an index wins, else every .safetensors file), and only when it has none as its pickles (an
    index, else `pytorch_model.bin` / `diffusion_pytorch_model.bin`, else every pickle file).
    Headers and pickles are parsed once; tensors are read one at a time, on demand. Nested
    containers in a pickle are flattened with "." (`{"state_dict": {"w": t}}` gives
    "state_dict.w"). `path` may also be a list of such paths, read as one (a key in two is an
    error), e.g. a trunk and its head shipped as separate files. `prefix` is stripped from every key that has it (e.g. BFL's
    "model.diffusion_model." or CLIP's "text_model.").
    """

    def __init__(self, path: str | os.PathLike | Sequence[str | os.PathLike], *, prefix: str = "",
                 subfolder_hint: str = ""):
        self.paths = tuple(Path(p) for p in path) if isinstance(path, (list, tuple)) else (Path(path),)
        if not self.paths:
            raise ValueError("CheckpointReader needs at least one path")
        self.path = self.paths[0]
        self._where: dict[str, tuple[TensorFile, str]] = {}
        for file in (f for p in self.paths for f in self._files(p, subfolder_hint)):
            tensors = open_tensor_file(file)
            for key in tensors.keys():
                name = key[len(prefix):] if prefix and key.startswith(prefix) else key
                if name in self._where:
                    raise CheckpointError(f"{file}: tensor {key!r} is also in {self._where[name][0].path}")
                self._where[name] = (tensors, key)

    @staticmethod
    def _files(path: Path, subfolder_hint: str) -> list[Path]:
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if path.is_dir():
            if subfolder_hint and (path / subfolder_hint).is_dir():
                path = path / subfolder_hint
            for pattern in ("*.safetensors.index.json", "*.safetensors", "*.bin.index.json"):
                found = sorted(path.glob(pattern))
                if found:
                    return CheckpointReader._files(found[0], "") if pattern.endswith(".json") else found
            pickles = [path / name for name in HF_PICKLE_NAMES if (path / name).is_file()]
            pickles = pickles or sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
            if not pickles:
                raise CheckpointError(f"{path}: no .safetensors files or PyTorch pickles in this directory")
            return pickles
        if path.name.endswith(".index.json"):
            try:
                weight_map = json.loads(path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{path}: not a checkpoint index (needs a 'weight_map'): {err}") from err
            return [path.parent / name for name in sorted(set(weight_map.values()))]
        return [path]

    def keys(self) -> list[str]:
        """All tensor names (prefix stripped), sorted."""
        return sorted(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        """The stored shape of `key`, read from the header (or pickle) only."""
        file, name = self._locate(key)
        return file.shape(name)

    def read(self, key: str) -> np.ndarray:
        """Read one tensor as a numpy array in its stored dtype (bf16 as ml_dtypes.bfloat16)."""
        file, name = self._locate(key)
        return file.read(name)

    def metadata(self) -> dict[str, str]:
        """The string metadata of the file headers (`__metadata__`), merged over all files."""
        merged: dict[str, str] = {}
        for file in dict.fromkeys(f for f, _ in self._where.values()):
            merged.update(file.metadata())
        return merged

    def file_of(self, key: str) -> Path:
        """The file a tensor lives in (for error messages)."""
        return self._locate(key)[0].path

    def _locate(self, key: str) -> tuple[TensorFile, str]:
        if key not in self._where:
            raise CheckpointError(f"{self.path}: no tensor named {key!r}")
        return self._where[key]
