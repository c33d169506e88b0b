"""The caption-embedding cache: a dataset's captions encoded once into an ArrayRecord cache, so that
training never runs T5-XXL and CLIP (`python -m sga_jax.encode`, see its `__main__`).

`run(config)` reads a config with:
  data: the data config (`sga_jax.data.default_data_config()`): `path` / `source` name the dataset
    and `caption_cache` the cache directory to write, the one training then reads;
  text: `sga_jax.text.default_text_config()`: where the encoders and tokenizers are (local paths
    or hub ids), the lengths and dtype;
  mesh / sharding_rules (optional): shard the encoders over this process's devices (T5-XXL FSDP).
Each record stores `txt` (t5_length, d_t5) and `vec` (d_clip) in the encoders' dtype under the
dataset record's key (`txt_ids` are zeros and not stored). Only captions are read: no image is
decoded. The cache is stamped with `TextEncoder.fingerprint()` (tokenizers, weights, lengths), so a
cache written by other encoders is refused; a rerun resumes after the last complete shard and never
duplicates a record. With several processes, each encodes every process_count-th record into its
own shard files.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from sga_jax import parallel
from sga_jax.data.cache import ArrayCacheWriter
from sga_jax.errors import ConfigError
from sga_jax.text import TextEncoder, text_encoder_from_config

log = logging.getLogger(__name__)


def encode_captions(source: Any, text_encoder: TextEncoder, writer: ArrayCacheWriter, *, batch_size: int,
                    process_index: int = 0, process_count: int = 1, batch_sharding: Any = None,
                    progress: bool = True) -> int:
    """Encode the captions of `source` records not yet in `writer`; returns how many were written.

    Records are taken in index order, every `process_count`-th from `process_index`. Batches have
    a fixed size (the last is padded with repeats that are not written), so encoding compiles
    once. `batch_sharding` places token batches on a mesh (None: the default device).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    done = writer.done_keys()
    todo = []
    for index in range(process_index, len(source), process_count):
        record = source[index]
        if record["key"] not in done:
            todo.append((record["key"], record["caption"]))
    bar = tqdm(total=len(todo), unit="caption", desc="encode", disable=not progress)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        prompts = [caption for _, caption in chunk]
        prompts += [prompts[-1]] * (batch_size - len(chunk))
        tokens = text_encoder.tokenize(prompts)
        if batch_sharding is not None:
            tokens = {name: jax.device_put(value, batch_sharding) for name, value in tokens.items()}
        txt, _, vec = text_encoder.encode_tokens(tokens)
        txt, vec = np.asarray(jax.device_get(txt)), np.asarray(jax.device_get(vec))
        for row, (key, _) in enumerate(chunk):
            writer.write(key, {"txt": txt[row], "vec": vec[row]})
        bar.update(len(chunk))
    bar.close()
    return len(todo)


def run(config: Any, *, progress: bool = True) -> str:
    """Encode `config.data`'s captions into `config.data.caption_cache`; returns the fingerprint."""
    from sga_jax.data.sources import open_source

    for section in ("data", "text"):
        if section not in config:
            raise ConfigError(f"config lacks a '{section}' section (see sga_jax.encode's docstring)")
    output = config.data.caption_cache
    if not output:
        raise ConfigError("config.data.caption_cache is empty: set the directory to write the caption cache to")
    source = open_source(config.data)  # before the (slow) encoders load, so a bad path fails at once
    mesh = rules = batch_sharding = None
    if "mesh" in config:
        mesh = parallel.make_mesh(dict(config.mesh), devices=jax.local_devices())
        rules = parallel.resolve_rules(dict(config.get("sharding_rules") or {}))
        batch_sharding = parallel.batch_sharding(mesh, rules)
        shards = parallel.batch_shards(mesh, rules)
        if config.text.batch_size % shards:
            raise ConfigError(
                f"config.text.batch_size={config.text.batch_size} must be a multiple of the {shards} "
                f"batch shards of mesh {dict(mesh.shape)}"
            )
    text_encoder = text_encoder_from_config(config.text, mesh, rules)
    fingerprint = text_encoder.fingerprint()
    count, index = jax.process_count(), jax.process_index()
    prefix = "part" if count == 1 else f"part-p{index:03d}"
    with ArrayCacheWriter(output, fingerprint, records_per_shard=config.text.records_per_shard,
                          shard_prefix=prefix) as writer:
        context = parallel.activation_sharding(mesh, rules) if mesh is not None else contextlib.nullcontext()
        with context:
            written = encode_captions(source, text_encoder, writer, batch_size=config.text.batch_size,
                                      process_index=index, process_count=count, batch_sharding=batch_sharding,
                                      progress=progress and index == 0)
    log.info("encoded %d captions into %s (fingerprint %s)", written, output, fingerprint)
    return fingerprint
