"""PyTorch pickle checkpoints (.pt / .pth / .bin / .ckpt) read without torch and without running
anything from the file.

Both layouts `torch.save` writes are read:

* zip (the default since PyTorch 1.6; Hugging Face's `pytorch_model.bin`, torchvision's weights):
  `<root>/data.pkl` holds the object, `<root>/data/<key>` one uncompressed record per storage,
  `<root>/byteorder` "little" or "big" (absent in old files: little).
* legacy (`_use_new_zipfile_serialization=False`, e.g. lpips's `weights/v0.1/vgg.pth`): five
  pickles back to back (magic number, protocol version, system info, the object, the list of
  storage keys), then every storage in that order as an int64 element count and its bytes,
  little-endian.

The object pickle goes through an allow-listing unpickler, the idea of
`torch.load(weights_only=True)`: `find_class` resolves only the names that rebuild tensors and
plain containers, each to a function or marker of this module; any other global raises
`UnsafePickleError` naming it before anything is called, so nothing from the file ever runs.
`persistent_load` turns storage ids into `Storage` records. Tensors come out as `TensorRef`
descriptions (storage, dtype, element offset, shape, stride) and are read one at a time on demand,
strides honoured, by positional reads.
"""

from __future__ import annotations

import _compat_pickle
import collections
import dataclasses
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Mapping

import ml_dtypes
import numpy as np

from sga_jax.weights.fileio import CheckpointError, read_into

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")

# torch dtype name -> numpy dtype (bf16 and float8 through ml_dtypes)
TORCH_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(dtype)
    for name, dtype in {
        "float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
        "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
        "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64, "bool": np.bool_,
        "complex64": np.complex64, "complex128": np.complex128,
        "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
        "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz, "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
    }.items()
}
# torch's typed storage classes (what `torch.save` pickles for the classic dtypes) -> dtype name
STORAGE_TYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}


class UnsafePickleError(CheckpointError):
    """A pickle names a global that is not allow-listed; nothing from it was run."""

    def __init__(self, path: Path, global_name: str):
        self.global_name = global_name
        super().__init__(
            f"{path}: refused to unpickle the global {global_name}: only tensors and plain containers are "
            "rebuilt (as torch.load(weights_only=True) does), and nothing from the file was run. "
            "A file holding a whole pickled object (a model, an optimizer, training arguments) must be "
            "re-saved as a state dict, e.g. torch.save(model.state_dict(), PATH), in an environment you trust."
        )


@dataclasses.dataclass(frozen=True, slots=True)
class TorchType:
    """What a torch dtype or typed-storage global resolves to: its element type."""

    name: str
    dtype: np.dtype


@dataclasses.dataclass(frozen=True, slots=True)
class Storage:
    """One serialised storage: its record `key`, element type, length and, for a legacy view of a
    larger storage, where it starts in that storage (in elements)."""

    key: str
    dtype: np.dtype
    numel: int
    start: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class TensorRef:
    """A tensor described, not read: `shape` elements of `dtype` at `offset` (elements) in `storage`,
    `stride` elements apart along each axis (torch's layout; views are non-contiguous)."""

    storage: Storage
    dtype: np.dtype
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise CheckpointError(f"tensor {what} must be a tuple of ints, got {value!r}")
    return tuple(value)


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: np.dtype | None = None) -> TensorRef:
    if not isinstance(storage, Storage):
        raise CheckpointError(f"a tensor must be rebuilt from a storage, got {type(storage).__name__}")
    if not isinstance(offset, int) or offset < 0:
        raise CheckpointError(f"tensor storage offset must be a non-negative int, got {offset!r}")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(strides) or any(n < 0 for n in shape) or any(s < 0 for s in strides):
        raise CheckpointError(f"tensor size {shape} and stride {strides} do not describe a strided tensor")
    return TensorRef(storage, storage.dtype if dtype is None else dtype, offset, shape, strides)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> TensorRef:
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> TensorRef:
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, backward_hooks: Any,
                       dtype: Any, metadata: Any = None) -> TensorRef:
    if not isinstance(dtype, TorchType):
        raise CheckpointError(f"tensor dtype must be a torch dtype, got {dtype!r}")
    return _tensor(storage, offset, size, stride, dtype.dtype)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None, state: Any = None) -> Any:
    return data


def _latin1_bytes(text: Any, encoding: Any = "latin1") -> bytes:
    """Pickle protocol 2 writes bytes as `_codecs.encode(text, "latin1")`; nothing else is accepted."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointError(f"_codecs.encode is only allowed on a str with 'latin1', got {encoding!r}")
    return text.encode("latin1")


ALLOWED_GLOBALS: Mapping[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "Counter"): collections.Counter,
    ("builtins", "set"): set,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex,
    ("_codecs", "encode"): _latin1_bytes,
    ("torch", "Size"): tuple,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): TorchType(name, dtype) for name, dtype in TORCH_DTYPES.items()},
    **{("torch", name): TorchType(name, TORCH_DTYPES[dtype]) for name, dtype in STORAGE_TYPES.items()},
    ("torch.storage", "UntypedStorage"): TorchType("UntypedStorage", TORCH_DTYPES["uint8"]),  # bytes, for newer dtypes
}


class _SafeUnpickler(pickle.Unpickler):
    """Resolves only `ALLOWED_GLOBALS`; storage ids become `Storage` records in `self.storages`."""

    def __init__(self, file: BinaryIO, path: Path):
        super().__init__(file, encoding="utf-8")
        self.path = path
        self.storages: dict[str, Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        # protocol 2 (torch.save's default) writes Python 2 names, e.g. `__builtin__.set`
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise UnsafePickleError(self.path, f"{module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> Storage:
        """`("storage", type, key, location, numel)` (zip), plus a view `(key, offset, numel)` or None
        (legacy)."""
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] not in ("storage", b"storage"):
            raise CheckpointError(f"{self.path}: unsupported persistent id {pid!r:.200} (only storages are read)")
        kind, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(kind, TorchType) or not isinstance(numel, int) or numel < 0:
            raise CheckpointError(f"{self.path}: malformed storage id {pid!r:.200}")
        root = self.storages.setdefault(key, Storage(key, kind.dtype, numel))
        if (root.dtype, root.numel) != (kind.dtype, numel):
            raise CheckpointError(f"{self.path}: storage {key!r} is described twice with different dtype or size")
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return root
        _, start, length = view
        if not all(isinstance(v, int) and v >= 0 for v in (start, length)) or start + length > numel:
            raise CheckpointError(f"{self.path}: storage view {view!r} does not fit storage {key!r} of {numel} elements")
        return Storage(key, kind.dtype, length, start)


def _unpickle(file: BinaryIO, path: Path) -> tuple[Any, dict[str, Storage]]:
    """One pickle from `file` through the allow-listing unpickler: (object, storages it refers to)."""
    unpickler = _SafeUnpickler(file, path)
    try:
        return unpickler.load(), unpickler.storages
    except CheckpointError:
        raise
    except Exception as err:  # pickle raises many types on corrupt input (UnpicklingError, EOFError, ...)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from err


def flatten_tensors(obj: Any, path: Path) -> dict[str, TensorRef]:
    """Every tensor in nested dicts / lists, keyed by its "."-joined path; other leaves are skipped."""
    found: dict[str, TensorRef] = {}

    def visit(value: Any, name: str) -> None:
        if isinstance(value, TensorRef):
            if name in found:
                raise CheckpointError(f"{path}: two tensors flatten to the same name {name!r}")
            found[name] = value
            return
        if isinstance(value, Mapping):
            items = value.items()
        elif isinstance(value, (list, tuple)):
            items = enumerate(value)
        else:
            return
        for key, item in items:
            visit(item, f"{name}.{key}" if name else str(key))

    if isinstance(obj, (Mapping, list, tuple)):
        try:
            visit(obj, "")
        except RecursionError as err:  # a container holding itself, or absurd nesting
            raise CheckpointError(f"{path}: containers nested too deeply (or holding themselves)") from err
    return found


class TorchPickleFile:
    """One `torch.save` file (zip or legacy) as a name -> tensor mapping, read one tensor at a time.

    The pickle is parsed once, at construction (no tensor data is read); `read` fetches one tensor
    by a positional read of the bytes it spans.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            is_zip = handle.read(4) == b"PK\x03\x04"
        obj, storages, self._spans, self._big_endian = (self._parse_zip if is_zip else self._parse_legacy)()
        self._tensors = flatten_tensors(obj, self.path)
        if not self._tensors:
            raise CheckpointError(f"{self.path}: a PyTorch checkpoint without named tensors (expected a state dict)")

    def _parse_zip(self) -> tuple[Any, dict[str, Storage], dict[str, tuple[int, int]], bool]:
        try:
            archive = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as err:
            raise CheckpointError(f"{self.path}: not a readable torch.save zip archive, truncated? ({err})") from err
        with archive:
            names = set(archive.namelist())
            roots = sorted(name[: -len("/data.pkl")] for name in names if name.endswith("/data.pkl") and name.count("/") == 1)
            if len(roots) != 1:
                raise CheckpointError(f"{self.path}: a zip file, but not a torch.save archive (expected one "
                                      f"<root>/data.pkl, found {len(roots)})")
            root = roots[0]
            order = archive.read(f"{root}/byteorder").decode() if f"{root}/byteorder" in names else "little"
            if order not in ("little", "big"):
                raise CheckpointError(f"{self.path}: unknown byteorder record {order!r}")
            with archive.open(f"{root}/data.pkl") as handle:
                obj, storages = _unpickle(handle, self.path)
            spans = {}
            for key, storage in storages.items():
                record = f"{root}/data/{key}"
                if record not in names:
                    raise CheckpointError(f"{self.path}: storage record {record} is missing")
                info = archive.getinfo(record)
                if info.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointError(f"{self.path}: storage record {record} is compressed (torch.save never does that)")
                if info.file_size != storage.numel * storage.dtype.itemsize:
                    raise CheckpointError(f"{self.path}: storage record {record} has {info.file_size} bytes, its "
                                          f"{storage.numel} elements of {storage.dtype} need {storage.numel * storage.dtype.itemsize}")
                spans[key] = (self._zip_data_offset(info), info.file_size)
        return obj, storages, spans, order == "big"

    def _zip_data_offset(self, info: zipfile.ZipInfo) -> int:
        header = bytearray(_ZIP_LOCAL_HEADER.size)
        read_into(self.path, info.header_offset, memoryview(header), f"the zip header of {info.filename}")
        signature, name_length, extra_length = _ZIP_LOCAL_HEADER.unpack(header)
        if signature != b"PK\x03\x04":
            raise CheckpointError(f"{self.path}: corrupt zip header for {info.filename}")
        return info.header_offset + _ZIP_LOCAL_HEADER.size + name_length + extra_length

    def _parse_legacy(self) -> tuple[Any, dict[str, Storage], dict[str, tuple[int, int]], bool]:
        size = self.path.stat().st_size
        with open(self.path, "rb") as handle:
            magic, _ = _unpickle(handle, self.path)
            if magic != LEGACY_MAGIC:
                raise CheckpointError(f"{self.path}: not a PyTorch checkpoint (neither a torch.save zip archive "
                                      "nor its legacy format: wrong magic number)")
            protocol, _ = _unpickle(handle, self.path)
            if protocol != LEGACY_PROTOCOL:
                raise CheckpointError(f"{self.path}: legacy torch.save protocol {protocol!r}, expected {LEGACY_PROTOCOL}")
            _unpickle(handle, self.path)  # system info: the writer's type sizes; the data is little-endian
            obj, storages = _unpickle(handle, self.path)
            keys, _ = _unpickle(handle, self.path)
            offset = handle.tell()
        if not isinstance(keys, list) or set(map(str, keys)) != set(storages):
            raise CheckpointError(f"{self.path}: the storage key list does not match the storages the object uses")
        spans = {}
        for key in map(str, keys):
            storage = storages[key]
            count = bytearray(8)
            read_into(self.path, offset, memoryview(count), f"the size of storage {key!r}")
            (numel,) = struct.unpack("<q", count)
            nbytes = numel * storage.dtype.itemsize
            if numel < storage.start + storage.numel:
                raise CheckpointError(f"{self.path}: storage {key!r} holds {numel} elements, the pickle uses "
                                      f"{storage.start + storage.numel}")
            if offset + 8 + nbytes > size:
                raise CheckpointError(f"{self.path}: truncated: storage {key!r} needs {nbytes} bytes from offset "
                                      f"{offset + 8}, the file has {size}")
            spans[key] = (offset + 8, nbytes)
            offset += 8 + nbytes
        return obj, storages, spans, False

    def keys(self) -> list[str]:
        """All tensor names, in file order."""
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of `key`, from the pickle only."""
        return self._tensors[key].shape

    def metadata(self) -> dict[str, str]:
        """Pickles carry no string metadata."""
        return {}

    def read(self, key: str) -> np.ndarray:
        """Read one tensor as a C-contiguous numpy array in its stored dtype (bf16 as ml_dtypes.bfloat16)."""
        ref = self._tensors[key]
        out = np.empty(ref.shape, ref.dtype)
        if out.size == 0:
            return out
        item = ref.dtype.itemsize
        span = 1 + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))  # elements from the first to the last
        record_offset, record_bytes = self._spans[ref.storage.key]
        start = ref.storage.start * ref.storage.dtype.itemsize + ref.offset * item
        if start + span * item > min(record_bytes, (ref.storage.start + ref.storage.numel) * ref.storage.dtype.itemsize):
            raise CheckpointError(f"{self.path}: tensor {key!r} (offset {ref.offset}, shape {ref.shape}, stride "
                                  f"{ref.stride}) reaches past the end of its storage {ref.storage.key!r}")
        contiguous = span == out.size and ref.stride == _contiguous_strides(ref.shape)
        buffer = out if contiguous else np.empty(span, ref.dtype)
        read_into(self.path, record_offset + start, memoryview(buffer.reshape(-1).view(np.uint8)), f"tensor {key!r}")
        if not contiguous:
            out[...] = np.lib.stride_tricks.as_strided(buffer, ref.shape, [s * item for s in ref.stride])
        if self._big_endian and item > 1:
            out = _from_big_endian(out)
        return out


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def _from_big_endian(array: np.ndarray) -> np.ndarray:
    """Swap each element's bytes (complex numbers: each of their two parts)."""
    width = array.dtype.itemsize // (2 if array.dtype.kind == "c" else 1)
    return array.reshape(-1).view(f"u{width}").byteswap().view(array.dtype).reshape(array.shape)

