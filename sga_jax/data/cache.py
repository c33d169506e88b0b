"""ArrayRecord cache of per-record numpy arrays (text embeddings, latents), written once and read
as a Grain random-access source.

Layout of a cache directory::

    cache.json               {"fingerprint", "fields": {name: [dtype, shape or null]}, "format"}
                             (dtype "str"/"bytes" for strings of any width; null shape: varies)
    part-00000.array_record  one record per key: header + raw array bytes (no pickle)
    part-00000.index.json    {"keys": [...], "shapes": [[shape per field], ...]} of that shard

A shard is written under a temporary name and renamed, together with its index, only when it is
complete, so an interrupted writer loses at most its open shard and a reader never sees half a
shard. A later writer with the same fingerprint resumes: `done_keys()` lists what is already there.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np
from array_record.python import array_record_module
from grain.sources import ArrayRecordDataSource

from sga_jax.errors import ConfigError


_MAGIC = b"SGAC"
_FORMAT = 1
_ALIGN = 64
_META = "cache.json"
_SHARD_SUFFIX = ".array_record"
_INDEX_SUFFIX = ".index.json"
_TMP_PREFIX = ".tmp-"


def _dtype_name(dtype: np.dtype) -> str:
    """A string that `_parse_dtype` turns back into `dtype`, ml_dtypes (bfloat16, ...) included."""
    if dtype.type.__module__.startswith("ml_dtypes"):
        return dtype.name
    if dtype.kind in "OV":
        raise ValueError(f"cannot cache arrays of dtype {dtype} (object/void); use numeric or str_ arrays")
    return dtype.str


def _field_dtype(dtype: np.dtype) -> str:
    """The dtype recorded in cache.json: strings of any width are one field type."""
    return {"U": "str", "S": "bytes"}.get(dtype.kind) or _dtype_name(dtype)


def _parse_dtype(name: str) -> np.dtype:
    if hasattr(ml_dtypes, name):
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def encode_record(key: str, arrays: Mapping[str, np.ndarray]) -> bytes:
    """Serialise `arrays` as `SGAC | u32 header length | JSON header | padding | raw bytes`."""
    fields, chunks, offset = {}, [], 0
    for name, value in arrays.items():
        array = np.asarray(value)
        fields[name] = [_dtype_name(array.dtype), list(array.shape), offset, array.nbytes]
        chunks.append(array.tobytes())
        offset += array.nbytes + (-array.nbytes) % _ALIGN
        chunks.append(b"\0" * ((-array.nbytes) % _ALIGN))
    header = json.dumps({"key": key, "fields": fields}).encode()
    start = len(_MAGIC) + 4 + len(header)
    pad = b"\0" * ((-start) % _ALIGN)
    return b"".join([_MAGIC, struct.pack("<I", len(header)), header, pad, *chunks])


def decode_record(data: bytes) -> dict[str, Any]:
    """Inverse of `encode_record`: {"key": str, name: np.ndarray, ...} (arrays are read-only views)."""
    if data[:4] != _MAGIC:
        raise ValueError(f"not an sga-jax cache record (magic {data[:4]!r}, expected {_MAGIC!r})")
    (length,) = struct.unpack("<I", data[4:8])
    header = json.loads(data[8 : 8 + length])
    start = 8 + length + (-(8 + length)) % _ALIGN
    out: dict[str, Any] = {"key": header["key"]}
    buffer = memoryview(data)
    for name, (dtype, shape, offset, nbytes) in header["fields"].items():
        chunk = buffer[start + offset : start + offset + nbytes]
        out[name] = np.frombuffer(chunk, dtype=_parse_dtype(dtype)).reshape(tuple(shape))
    return out


def _read_meta(directory: Path) -> dict[str, Any] | None:
    path = directory / _META
    return json.loads(path.read_text()) if path.exists() else None


def _write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(_TMP_PREFIX + path.name)
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def _complete_shards(directory: Path) -> list[Path]:
    """Shards whose index file exists (the index is renamed into place after its shard)."""
    return sorted(
        p for p in directory.glob("*" + _SHARD_SUFFIX)
        if not p.name.startswith(_TMP_PREFIX) and p.with_name(p.name[: -len(_SHARD_SUFFIX)] + _INDEX_SUFFIX).exists()
    )


def _index_path(shard: Path) -> Path:
    return shard.with_name(shard.name[: -len(_SHARD_SUFFIX)] + _INDEX_SUFFIX)


class ArrayCacheWriter:
    """Writes `{key: {name: array}}` records into an ArrayRecord cache directory; a context manager.

    Args:
      directory: created if missing. An existing cache is resumed when its fingerprint matches.
      fingerprint: identifies what produced the arrays (model, tokenizer, resolution, ...);
        opening a cache written with another fingerprint raises ValueError.
      records_per_shard: records per ArrayRecord shard; an interruption loses at most one shard.
      shard_prefix: shard file names are `{shard_prefix}-NNNNN.array_record`; give each process of a
        multi-process writer its own prefix (e.g. "part-p003") so they never collide.
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: str, *, records_per_shard: int = 256,
                 shard_prefix: str = "part"):
        if records_per_shard < 1:
            raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.records_per_shard = records_per_shard
        self.shard_prefix = shard_prefix
        meta = _read_meta(self.directory)
        if meta is not None and meta["fingerprint"] != fingerprint:
            raise ValueError(
                f"cache {self.directory} was written with fingerprint {meta['fingerprint']!r}, "
                f"not {fingerprint!r}; use another directory or delete it"
            )
        self._fields: dict[str, list[Any]] = dict(meta["fields"]) if meta else {}
        for stale in self.directory.glob(_TMP_PREFIX + f"{shard_prefix}-*"):
            stale.unlink()
        complete = set(_complete_shards(self.directory))
        for orphan in self.directory.glob(f"{shard_prefix}-*{_SHARD_SUFFIX}"):
            if orphan not in complete:  # renamed but interrupted before its index was written
                orphan.unlink()
        self._done: set[str] = set()
        for shard in _complete_shards(self.directory):
            self._done.update(json.loads(_index_path(shard).read_text())["keys"])
        own = [int(p.name[len(shard_prefix) + 1 : -len(_SHARD_SUFFIX)])
               for p in self.directory.glob(f"{shard_prefix}-*{_SHARD_SUFFIX}")
               if p.name[len(shard_prefix) + 1 : -len(_SHARD_SUFFIX)].isdigit()]
        self._next_shard = max(own, default=-1) + 1
        self._writer = None
        self._open_keys: list[str] = []
        self._open_shapes: list[list[list[int]]] = []
        self._open_names: list[str] | None = None
        _write_json_atomic(self.directory / _META, self._meta())

    def _meta(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "fields": self._fields, "format": _FORMAT}

    def done_keys(self) -> set[str]:
        """Keys already stored in complete shards (or written by this writer)."""
        return set(self._done)

    def _shard_name(self) -> str:
        return f"{self.shard_prefix}-{self._next_shard:05d}{_SHARD_SUFFIX}"

    def write(self, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Append one record. Keys are unique: a key already written raises ValueError."""
        if key in self._done:
            raise ValueError(f"key {key!r} is already in cache {self.directory}")
        if "key" in arrays:
            raise ValueError("'key' is reserved for the record id; rename that array")
        arrays = {name: np.asarray(value) for name, value in arrays.items()}
        for name, array in arrays.items():
            dtype, shape = _field_dtype(array.dtype), list(array.shape)
            if name not in self._fields:
                self._fields[name] = [dtype, shape]
            elif self._fields[name][0] != dtype:
                raise ValueError(
                    f"cache field {name!r} has dtype {self._fields[name][0]}, record {key!r} gives {dtype}")
            elif self._fields[name][1] is not None and self._fields[name][1] != shape:
                self._fields[name][1] = None
        names = sorted(arrays)
        if self._writer is None:
            tmp = self.directory / (_TMP_PREFIX + self._shard_name())
            self._writer = array_record_module.ArrayRecordWriter(str(tmp), "group_size:1")
            self._open_names = names
        elif names != self._open_names:
            raise ValueError(f"record {key!r} has fields {names}, the cache has {self._open_names}")
        self._writer.write(encode_record(key, arrays))
        self._open_keys.append(key)
        self._open_shapes.append([list(arrays[n].shape) for n in names])
        self._done.add(key)
        if len(self._open_keys) >= self.records_per_shard:
            self._finish_shard()

    def _finish_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        name = self._shard_name()
        final = self.directory / name
        os.replace(self.directory / (_TMP_PREFIX + name), final)
        _write_json_atomic(_index_path(final), {"keys": self._open_keys, "fields": self._open_names,
                                                "shapes": self._open_shapes})
        _write_json_atomic(self.directory / _META, self._meta())
        self._writer, self._open_keys, self._open_shapes = None, [], []
        self._next_shard += 1

    def close(self) -> None:
        """Finish the open shard, if any. Safe to call twice."""
        self._finish_shard()

    def __enter__(self) -> "ArrayCacheWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ArrayCacheSource:
    """Grain random-access source over a cache: `[i]` -> {"key": str, name: np.ndarray, ...}."""

    def __init__(self, directory: str | os.PathLike, fingerprint: str | None = None):
        self.directory = Path(directory)
        meta = _read_meta(self.directory)
        if meta is None:
            raise ConfigError(f"{self.directory} is not an array cache (no {_META})")
        if fingerprint is not None and meta["fingerprint"] != fingerprint:
            raise ConfigError(
                f"cache {self.directory} has fingerprint {meta['fingerprint']!r}, expected {fingerprint!r}"
            )
        self.fingerprint: str = meta["fingerprint"]
        self.fields: dict[str, list[Any]] = meta["fields"]
        shards = _complete_shards(self.directory)
        self.keys: list[str] = []
        self.shapes: list[dict[str, tuple[int, ...]]] = []
        for shard in shards:
            index = json.loads(_index_path(shard).read_text())
            self.keys.extend(index["keys"])
            self.shapes.extend({n: tuple(s) for n, s in zip(index["fields"], shapes)} for shapes in index["shapes"])
        self._positions = {key: i for i, key in enumerate(self.keys)}
        self._paths = [str(p) for p in shards]
        self._source = ArrayRecordDataSource(self._paths) if shards else None

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._source is None:
            raise IndexError(f"cache {self.directory} is empty")
        return decode_record(self._source[index])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))

    def index_of(self, key: str) -> int:
        """Position of `key`; KeyError when the cache does not hold it."""
        return self._positions[key]

    def get(self, key: str) -> dict[str, Any]:
        """The record stored under `key`."""
        return self[self.index_of(key)]

    def __contains__(self, key: object) -> bool:
        return key in self._positions

    def __repr__(self) -> str:
        return f"ArrayCacheSource({str(self.directory)!r}, records={len(self)}, fields={list(self.fields)})"


def open_cache(directory: str | os.PathLike, fingerprint: str | None = None) -> ArrayCacheSource:
    """Open a cache written by `ArrayCacheWriter`; a fingerprint mismatch raises ValueError."""
    return ArrayCacheSource(directory, fingerprint)
