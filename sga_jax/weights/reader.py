"""Reading checkpoints one tensor at a time: safetensors files, sharded indexes and directories,
without torch and without memory-mapping whole files."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open

from sga_jax.errors import CheckpointError



PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


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


def refuse_pickle(path: str | os.PathLike) -> None:
    """Raise a clear error for pickle-based checkpoints, which are never loaded."""
    name = str(path)
    if name.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(
            f"{name}: pickle checkpoints (.pt/.pth/.bin/.ckpt) are refused because unpickling runs "
            "arbitrary code. Convert it to safetensors once, in an environment you trust, e.g. "
            "`python -c \"import torch, safetensors.torch as st; "
            "st.save_file(torch.load('IN', weights_only=True), 'OUT.safetensors')\"`, "
            "or use the model's `save_pretrained(..., safe_serialization=True)`."
        )


class CheckpointReader:
    """Read-only view of one or more safetensors files as a single name -> tensor mapping.

    `path` may be a .safetensors file, a `*.safetensors.index.json`, or a directory holding either
    (an index wins; otherwise every .safetensors file in it is read). Headers are read once;
    tensors are read one at a time, on demand. `prefix` is stripped from every key that has it (e.g. BFL's
    "model.diffusion_model." or CLIP's "text_model.").
    """

    def __init__(self, path: str | os.PathLike, *, prefix: str = "", subfolder_hint: str = ""):
        self.path = Path(path)
        files = self._files(self.path, subfolder_hint)
        self._handles: dict[Path, Any] = {}
        self._layouts: dict[Path, tuple[int, dict[str, Any]]] = {}
        self._where: dict[str, tuple[Path, str]] = {}
        for file in files:
            handle = self._open(file)
            for key in handle.keys():
                name = key[len(prefix):] if prefix and key.startswith(prefix) else key
                if name in self._where:
                    raise CheckpointError(f"{file}: tensor {key!r} is also in {self._where[name][0]}")
                self._where[name] = (file, key)

    @staticmethod
    def _files(path: Path, subfolder_hint: str) -> list[Path]:
        refuse_pickle(path)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if path.is_dir():
            if subfolder_hint and (path / subfolder_hint).is_dir():
                path = path / subfolder_hint
            indexes = sorted(path.glob("*.safetensors.index.json"))
            if indexes:
                return CheckpointReader._files(indexes[0], "")
            files = sorted(path.glob("*.safetensors"))
            if not files:
                pickles = [p.name for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES)]
                if pickles:
                    refuse_pickle(path / pickles[0])
                raise CheckpointError(f"{path}: no .safetensors files in this directory")
            return files
        if path.name.endswith(".index.json"):
            try:
                weight_map = json.loads(path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{path}: not a safetensors index (needs a 'weight_map'): {err}") from err
            return [path.parent / name for name in sorted(set(weight_map.values()))]
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: expected a .safetensors file, an index.json or a directory")
        return [path]

    def _open(self, file: Path) -> Any:
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="numpy")
            except Exception as err:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from err
        return self._handles[file]

    def keys(self) -> list[str]:
        """All tensor names (prefix stripped), sorted."""
        return sorted(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        """The stored shape of `key`, read from the header only."""
        file, name = self._locate(key)
        return tuple(self._open(file).get_slice(name).get_shape())

    def read(self, key: str) -> np.ndarray:
        """Read one tensor as a numpy array in its stored dtype (bf16 as ml_dtypes.bfloat16).

        Uses positional file reads, not a memory map: every page of a mapped file that has been
        touched counts towards the process's resident memory until the map closes, which would
        make a streaming conversion hold the whole checkpoint.
        """
        file, name = self._locate(key)
        base, header = self._layout(file)
        entry = header[name]
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        out = np.empty(entry["shape"], SAFETENSORS_DTYPES[entry["dtype"]])
        buffer = memoryview(out.reshape(-1).view(np.uint8))
        if len(buffer) != end - start:
            raise CheckpointError(f"{file}: tensor {name!r} spans {end - start} bytes, its shape needs {len(buffer)}")
        with open(file, "rb", buffering=0) as handle:
            handle.seek(base + start)
            done = 0
            while done < len(buffer):
                count = handle.readinto(buffer[done:])
                if not count:
                    raise CheckpointError(f"{file}: truncated while reading tensor {name!r}")
                done += count
        return out

    def _layout(self, file: Path) -> tuple[int, dict[str, Any]]:
        """(offset of the data section, header entries) of one file, parsed once."""
        if file not in self._layouts:
            with open(file, "rb") as handle:
                (size,) = struct.unpack("<Q", handle.read(8))
                self._layouts[file] = (8 + size, json.loads(handle.read(size)))
        return self._layouts[file]

    def metadata(self) -> dict[str, str]:
        """The string metadata of the file headers (`__metadata__`), merged over all files."""
        merged: dict[str, str] = {}
        for file in dict.fromkeys(f for f, _ in self._where.values()):
            merged.update(self._open(file).metadata() or {})
        return merged

    def file_of(self, key: str) -> Path:
        """The file a tensor lives in (for error messages)."""
        return self._locate(key)[0]

    def _locate(self, key: str) -> tuple[Path, str]:
        if key not in self._where:
            raise CheckpointError(f"{self.path}: no tensor named {key!r}")
        return self._where[key]
