"""Writing safetensors files (sharded with a Hugging Face index when large), streaming one tensor at
a time, atomically (a `.partial` file renamed when complete)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from sga_jax.errors import ConfigError
from sga_jax.weights.reader import SAFETENSORS_NAMES, CheckpointError


def write_safetensors(
    path: str | os.PathLike,
    specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    max_shard_bytes: int = 5 * 2**30,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Stream tensors into safetensors file(s) without holding more than one tensor in memory.

    `specs` declares every key's shape and dtype up front (so headers are written first);
    `tensors` must then yield exactly those keys in that order. When the total exceeds
    `max_shard_bytes`, files are named `STEM-0000k-of-0000n.safetensors` beside a
    `STEM.safetensors.index.json` (the Hugging Face convention). Returns the files written.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"{path}: output name must end in .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = [[]]
    size = 0
    for key, (shape, dtype) in specs.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    if len(shards) == 1:
        files = [path]
    else:
        stem = path.name[: -len(".safetensors")]
        files = [path.with_name(f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors") for i in range(len(shards))]
    stream = iter(tensors)
    for file, keys in zip(files, shards):
        _write_one(file, keys, specs, stream, metadata)
    if len(files) > 1:
        total = sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for s, d in specs.values())
        index = {
            "metadata": {"total_size": total, **(metadata or {})},
            "weight_map": {key: file.name for file, keys in zip(files, shards) for key in keys},
        }
        path.with_name(path.name + ".index.json").write_text(json.dumps(index, indent=2))
    return files


def _write_one(
    file: Path,
    keys: Sequence[str],
    specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    stream: Iterator[tuple[str, np.ndarray]],
    metadata: Mapping[str, str] | None,
) -> None:
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key in keys:
        shape, dtype = specs[key]
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[key] = {"dtype": SAFETENSORS_NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    partial = file.with_name(file.name + ".partial")
    with open(partial, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for key in keys:
            got_key, tensor = next(stream)
            shape, dtype = specs[key]
            if got_key != key or tuple(tensor.shape) != tuple(shape) or tensor.dtype != np.dtype(dtype):
                raise CheckpointError(
                    f"{file}: writer expected {key} {tuple(shape)} {np.dtype(dtype)}, "
                    f"got {got_key} {tuple(tensor.shape)} {tensor.dtype}"
                )
            out.write(np.ascontiguousarray(tensor).tobytes())
    partial.replace(file)
