"""Key maps: how each parameter of ours is made from checkpoint tensors, and back.

A family's `convert.py` is a short table: our dotted parameter path -> `Rule(keys, transform,
layers)`. `load_state` reads one checkpoint tensor at a time, checks every name and shape, and
places each parameter straight into its target sharding; `save_state` (`export_tensors` +
`write_safetensors`) goes the other way, one parameter at a time, through the same map, so import
and export cannot drift apart."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol

import jax
import numpy as np
from flax import nnx

from sga_jax.weights.fileio import CheckpointError
from sga_jax.weights.reader import CheckpointReader
from sga_jax.weights.writer import write_safetensors


class Transform(Protocol):
    """How checkpoint tensors ("theirs", e.g. PyTorch layout) become one parameter of ours and back."""

    def to_ours(self, *theirs: np.ndarray) -> np.ndarray: ...

    def to_theirs(self, ours: np.ndarray) -> tuple[np.ndarray, ...]: ...

    def their_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]: ...


@dataclasses.dataclass(frozen=True)
class Permute:
    """One tensor with its axes permuted: ours = theirs.transpose(perm). Identity when perm=None."""

    perm: tuple[int, ...] | None = None

    def to_ours(self, *theirs: np.ndarray) -> np.ndarray:
        (tensor,) = theirs
        return tensor if self.perm is None else np.transpose(tensor, self.perm)

    def to_theirs(self, ours: np.ndarray) -> tuple[np.ndarray, ...]:
        return (ours if self.perm is None else np.transpose(ours, np.argsort(self.perm)),)

    def their_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        if self.perm is None:
            return (tuple(shape),)
        return (tuple(shape[i] for i in np.argsort(self.perm)),)


@dataclasses.dataclass(frozen=True)
class Concat:
    """Several tensors, each transformed by `inner`, concatenated along `axis` of ours.

    `sizes` are the parts' lengths along that axis (needed to split on export); e.g. diffusers'
    separate to_q / to_k / to_v weights become BFL's fused qkv kernel.
    """

    axis: int
    sizes: tuple[int, ...]
    inner: Permute = Permute()

    def to_ours(self, *theirs: np.ndarray) -> np.ndarray:
        if len(theirs) != len(self.sizes):
            raise CheckpointError(f"expected {len(self.sizes)} tensors to concatenate, got {len(theirs)}")
        return np.concatenate([self.inner.to_ours(t) for t in theirs], axis=self.axis)

    def to_theirs(self, ours: np.ndarray) -> tuple[np.ndarray, ...]:
        splits = np.cumsum(self.sizes)[:-1]
        return tuple(self.inner.to_theirs(part)[0] for part in np.split(ours, splits, axis=self.axis))

    def their_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        shapes = []
        for size in self.sizes:
            part = list(shape)
            part[self.axis] = size
            shapes.append(self.inner.their_shapes(tuple(part))[0])
        return tuple(shapes)


@dataclasses.dataclass(frozen=True)
class SwapHalves:
    """One tensor whose two halves along `axis` are stored in the other order (its own inverse),
    e.g. diffusers' (scale, shift) against BFL's (shift, scale), after an optional permutation."""

    axis: int
    inner: Permute = Permute()

    def to_ours(self, *theirs: np.ndarray) -> np.ndarray:
        ours = self.inner.to_ours(*theirs)
        first, second = np.split(ours, 2, axis=self.axis)
        return np.concatenate([second, first], axis=self.axis)

    def to_theirs(self, ours: np.ndarray) -> tuple[np.ndarray, ...]:
        first, second = np.split(ours, 2, axis=self.axis)
        return self.inner.to_theirs(np.concatenate([second, first], axis=self.axis))

    def their_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        return self.inner.their_shapes(shape)


@dataclasses.dataclass(frozen=True)
class TrailingOnes:
    """Their tensor is `inner`'s layout plus `count` trailing size-1 axes, e.g. a PyTorch 1x1
    Conv2d weight (out, in, 1, 1) read as a dense kernel (in, out) with `TrailingOnes(2, LINEAR)`."""

    count: int
    inner: Permute = Permute()

    def to_ours(self, *theirs: np.ndarray) -> np.ndarray:
        (tensor,) = theirs
        if tensor.shape[tensor.ndim - self.count :] != (1,) * self.count:
            raise CheckpointError(f"expected {self.count} trailing size-1 axes, got shape {tensor.shape}")
        return self.inner.to_ours(tensor.reshape(tensor.shape[: tensor.ndim - self.count]))

    def to_theirs(self, ours: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(t.reshape(t.shape + (1,) * self.count) for t in self.inner.to_theirs(ours))

    def their_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        return tuple(s + (1,) * self.count for s in self.inner.their_shapes(shape))


SAME = Permute()
LINEAR = Permute((1, 0))  # PyTorch Linear (out, in) -> (in, out)
CONV2D = Permute((2, 3, 1, 0))  # PyTorch Conv2d (out, in, kh, kw) -> (kh, kw, in, out)


@dataclasses.dataclass(frozen=True)
class Rule:
    """How one parameter of ours is read: checkpoint `keys` through `transform`.

    With `layers=n` the parameter is stacked: keys contain "{i}", formatted for i in
    range(start, start + n), and the results are stacked on a new leading axis (our scanned
    blocks). `start` serves models that stack a run of a checkpoint's flat block list (e.g. one
    stage of SAM2's Hiera, whose blocks are numbered across stages).
    """

    keys: tuple[str, ...]
    transform: Transform = SAME
    layers: int | None = None
    start: int = 0

    def keys_for(self, layer: int | None) -> tuple[str, ...]:
        return tuple(k.format(i=self.start + layer) for k in self.keys) if layer is not None else self.keys

    def all_keys(self) -> list[str]:
        if self.layers is None:
            return list(self.keys)
        return [k for i in range(self.layers) for k in self.keys_for(i)]


KeyMap = Mapping[str, Rule]


def rule(*keys: str, transform: Transform = SAME, layers: int | None = None, start: int = 0) -> Rule:
    """Shorthand: `rule("a.weight", transform=LINEAR)`; see `Rule` for `layers` and `start`."""
    return Rule(tuple(keys), transform, layers, start)


def flat_params(state: nnx.State) -> dict[str, Any]:
    """Flatten an nnx State into {dotted path: Variable}."""
    return {".".join(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}


def check_keys(reader: CheckpointReader, key_map: KeyMap, *, ignore: Callable[[str], bool] = lambda k: False) -> None:
    """Raise one CheckpointError listing every missing and unexpected checkpoint key."""
    wanted = {k for r in key_map.values() for k in r.all_keys()}
    present = set(reader.keys())
    missing = sorted(wanted - present)
    unexpected = sorted(k for k in present - wanted if not ignore(k))
    if missing or unexpected:
        lines = [f"{' + '.join(map(str, reader.paths))}: checkpoint does not match the model"]
        if missing:
            lines.append(f"  missing {len(missing)} tensors: " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            lines.append(
                f"  unexpected {len(unexpected)} tensors: " + ", ".join(unexpected[:20]) + (" ..." if len(unexpected) > 20 else "")
            )
        raise CheckpointError("\n".join(lines))


def read_param(reader: CheckpointReader, name: str, spec: Rule, expected: tuple[int, ...]) -> np.ndarray:
    """Assemble one parameter of ours from the checkpoint, checking shapes as it goes."""
    per_layer = expected[1:] if spec.layers is not None else expected
    their_expected = spec.transform.their_shapes(per_layer)

    def one(layer: int | None) -> np.ndarray:
        keys = spec.keys_for(layer)
        tensors = []
        for key, want in zip(keys, their_expected):
            found = reader.shape(key)
            if tuple(found) != tuple(want):
                raise CheckpointError(
                    f"{reader.file_of(key)}: tensor {key!r} has shape {tuple(found)}, expected {tuple(want)} "
                    f"(for parameter {name} of shape {tuple(expected)})"
                )
            tensors.append(reader.read(key))
        return spec.transform.to_ours(*tensors)

    if spec.layers is None:
        return one(None)
    if expected[0] != spec.layers:
        raise CheckpointError(f"parameter {name}: model has {expected[0]} layers, key map says {spec.layers}")
    first = one(0)
    out = np.empty((spec.layers,) + first.shape, first.dtype)
    out[0] = first
    for i in range(1, spec.layers):
        out[i] = one(i)
    return out


def load_state(
    reader: CheckpointReader,
    key_map: KeyMap,
    abstract_state: nnx.State,
    *,
    shardings: Any = None,
    ignore: Callable[[str], bool] = lambda k: False,
) -> nnx.State:
    """Fill an abstract parameter state (from `nnx.eval_shape`) from a checkpoint.

    Every parameter must have a rule and every checkpoint key must be used (unless `ignore(key)`),
    else one error lists them all. Each parameter is read, transformed, cast to the dtype the model
    declares and put on its device(s) before the next one is read. `shardings` is an optional
    State-shaped tree (an nnx.State or its pure dict) of `jax.sharding.Sharding`, e.g. from
    `sga_jax.parallel.state_shardings`.
    """
    params = flat_params(abstract_state)
    unmapped = sorted(set(params) - set(key_map))
    if unmapped:
        raise CheckpointError(f"no conversion rule for parameters: {', '.join(unmapped[:20])}")
    check_keys(reader, key_map, ignore=ignore)
    if shardings is not None and not isinstance(shardings, nnx.State):
        shardings = nnx.State(shardings)  # a pure dict, e.g. from sga_jax.parallel.state_shardings
    target_shardings = flat_params(shardings) if shardings is not None else {}
    loaded = {}
    for name, var in params.items():
        abstract = var.get_value()
        host = read_param(reader, name, key_map[name], tuple(abstract.shape))
        host = np.asarray(host, dtype=abstract.dtype)
        sharding = target_shardings.get(name)
        if sharding is not None and not isinstance(sharding, jax.sharding.Sharding):
            sharding = sharding.get_value()
        loaded[name] = jax.device_put(host, sharding) if sharding is not None else jax.numpy.asarray(host)
        del host
    return _replace_values(abstract_state, loaded)


def load_module(
    build: Callable[[], nnx.Module],
    reader: CheckpointReader,
    key_map: KeyMap | Callable[[nnx.Module], KeyMap],
    *,
    shardings: Any = None,
    ignore: Callable[[str], bool] = lambda k: False,
) -> nnx.Module:
    """The module `build()` makes, with its parameters streamed from `reader` by `load_state`.

    The module is built abstractly (no random weights are drawn). `key_map` is a KeyMap or a
    function of the abstract module returning one; `shardings` a State-shaped tree (or its pure
    dict), or a function of the abstract parameter state returning one, since the shapes are only
    known once the config is.
    """
    model = nnx.eval_shape(build)
    graphdef, abstract, rest = nnx.split(model, nnx.Param, ...)
    if callable(shardings):
        shardings = shardings(abstract)
    rules = key_map(model) if callable(key_map) else key_map
    return nnx.merge(graphdef, load_state(reader, rules, abstract, shardings=shardings, ignore=ignore), rest)


def _replace_values(state: nnx.State, values: Mapping[str, Any]) -> nnx.State:
    flat = []
    for path, var in nnx.to_flat_state(state):
        name = ".".join(str(p) for p in path)
        flat.append((path, var.replace(values[name])))
    return nnx.from_flat_state(flat)


def export_specs(abstract_state: nnx.State, key_map: KeyMap, dtype: Any = None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Checkpoint key -> (shape, dtype) that `export_tensors` will produce, in its order."""
    specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for name, var in flat_params(abstract_state).items():
        value = var.get_value()
        spec = key_map[name]
        shape = tuple(value.shape)
        per_layer = shape[1:] if spec.layers is not None else shape
        out_dtype = np.dtype(dtype or value.dtype)
        for layer in range(spec.layers) if spec.layers is not None else [None]:
            for key, their in zip(spec.keys_for(layer), spec.transform.their_shapes(per_layer)):
                specs[key] = (tuple(their), out_dtype)
    return specs


def export_tensors(state: nnx.State, key_map: KeyMap, dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (checkpoint key, numpy tensor) for every parameter, one parameter on the host at a time."""
    for name, var in flat_params(state).items():
        spec = key_map[name]
        host = np.asarray(jax.device_get(var.get_value()))
        if dtype is not None:
            host = host.astype(dtype)
        for layer in range(spec.layers) if spec.layers is not None else [None]:
            part = host[layer] if layer is not None else host
            for key, tensor in zip(spec.keys_for(layer), spec.transform.to_theirs(part)):
                yield key, np.ascontiguousarray(tensor)
        del host


def save_state(
    path: str | os.PathLike,
    state: nnx.State,
    key_map: KeyMap,
    *,
    dtype: Any = None,
    max_shard_bytes: int = 5 * 2**30,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Export a parameter state through a key map into safetensors file(s); see write_safetensors."""
    specs = export_specs(state, key_map, dtype)
    return write_safetensors(
        path, specs, export_tensors(state, key_map, dtype), max_shard_bytes=max_shard_bytes, metadata=metadata
    )


def transcode_tensors(
    reader: CheckpointReader,
    source_map: KeyMap,
    target_map: KeyMap,
    abstract_state: nnx.State,
    dtype: Any = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Re-key a checkpoint from one layout to another without building the model.

    Yields (target key, tensor) in the order of `export_specs(abstract_state, target_map, dtype)`;
    stacked parameters go one layer at a time, so host memory stays at a few tensors. Source
    shapes are checked against the abstract state (same error messages as `load_state`).
    """
    check_keys(reader, source_map)
    for name, var in flat_params(abstract_state).items():
        source, target = source_map[name], target_map[name]
        shape = tuple(var.get_value().shape)
        per_layer = shape[1:] if source.layers is not None else shape
        expected = source.transform.their_shapes(per_layer)
        for layer in range(source.layers) if source.layers is not None else [None]:
            parts = []
            for key, want in zip(source.keys_for(layer), expected):
                found = reader.shape(key)
                if tuple(found) != tuple(want):
                    raise CheckpointError(
                        f"{reader.file_of(key)}: tensor {key!r} has shape {tuple(found)}, expected {tuple(want)} "
                        f"(for parameter {name} of shape {shape})"
                    )
                parts.append(reader.read(key))
            ours = source.transform.to_ours(*parts)
            out_dtype = np.dtype(dtype or var.get_value().dtype)
            for key, tensor in zip(target.keys_for(layer), target.transform.to_theirs(ours)):
                yield key, np.ascontiguousarray(tensor.astype(out_dtype, copy=False))
