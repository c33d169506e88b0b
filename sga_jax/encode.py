"""python -m sga_jax.encode --config CONFIG [--config.a.b=v ...]

Encodes a dataset's captions once into an ArrayRecord caption cache, so that training never runs
T5-XXL and CLIP. CONFIG is a training config (or any config) with:
  data: the data config (`sga_jax.data.default_data_config()`): `path` / `source` name the dataset
    and `caption_cache` the cache directory to write, the one training then reads;
  text: `default_text_config()`: where the encoders and tokenizers are, the lengths and dtype;
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
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from sga_jax import parallel
from sga_jax.data.cache import ArrayCacheWriter
from sga_jax.text import TextEncoder

log = logging.getLogger(__name__)

FLUX_FOLDERS = {"t5": "text_encoder_2", "clip": "text_encoder", "t5_tokenizer": "tokenizer_2", "clip_tokenizer": "tokenizer"}


def default_text_config() -> ml_collections.ConfigDict:
    """The `text` section of a config: the Flux text encoders and how captions are encoded.

    root: a Flux.1 folder; any of t5 / clip / t5_tokenizer / clip_tokenizer left empty is taken
      from its standard subfolder (text_encoder_2, text_encoder, tokenizer_2, tokenizer).
    t5, clip: save_pretrained directories (or safetensors files) of T5EncoderModel / CLIPTextModel.
    t5_tokenizer, clip_tokenizer: tokenizer directories.
    t5_length: 512 for Flux.1-dev, 256 for schnell. clip_length: 77.
    dtype: compute and parameter dtype of both encoders. mask_t5: False as Flux (see sga_jax.text).
    batch_size: captions per encoding step on this process. records_per_shard: cache shard size
      (an interruption re-encodes at most one shard).
    """
    return ml_collections.ConfigDict({
        "root": "",
        "t5": "",
        "clip": "",
        "t5_tokenizer": "",
        "clip_tokenizer": "",
        "t5_length": 512,
        "clip_length": 77,
        "dtype": "bfloat16",
        "mask_t5": False,
        "batch_size": 16,
        "records_per_shard": 256,
    })


def resolve_paths(text_config: Any) -> dict[str, Path]:
    """The four encoder / tokenizer paths of a text config, filling empty ones from `root`."""
    paths = {}
    for field, folder in FLUX_FOLDERS.items():
        value = text_config[field] or (str(Path(text_config.root) / folder) if text_config.root else "")
        if not value:
            raise ValueError(f"config.text.{field} is empty and config.text.root is not set; give one of them")
        paths[field] = Path(value)
    return paths


def text_encoder_from_config(text_config: Any, mesh: jax.sharding.Mesh | None = None,
                             rules: Any = None) -> TextEncoder:
    """Load the TextEncoder a text config describes; with `mesh`, parameters are placed straight
    into their shardings by logical axis names (`rules` from `sga_jax.parallel.resolve_rules`)."""
    paths = resolve_paths(text_config)
    shardings = None
    if mesh is not None:
        shardings = lambda abstract: parallel.state_shardings(abstract, mesh, rules)
    return TextEncoder.from_pretrained(
        paths["t5"], paths["clip"], paths["t5_tokenizer"], paths["clip_tokenizer"],
        t5_length=text_config.t5_length, clip_length=text_config.clip_length, dtype=text_config.dtype,
        t5_shardings=shardings, clip_shardings=shardings, mask_t5=text_config.mask_t5,
    )


def encode_captions(source: Any, text_encoder: TextEncoder, writer: ArrayCacheWriter, *, batch_size: int,
                    process_index: int = 0, process_count: int = 1, batch_sharding: Any = None,
                    progress: bool = True) -> int:
    """Encode the captions of `source` records not yet in `writer`; returns how many were written.

    Records are taken in index order, every `process_count`-th from `process_index`. Batches have
    a fixed size (the last is padded with repeats that are not written), so encoding compiles
    once. `batch_sharding` places token batches on a mesh (None: the default device).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
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
            raise ValueError(f"config lacks a '{section}' section (see sga_jax.encode's docstring)")
    output = config.data.caption_cache
    if not output:
        raise ValueError("config.data.caption_cache is empty: set the directory to write the caption cache to")
    source = open_source(config.data)  # before the (slow) encoders load, so a bad path fails at once
    mesh = rules = batch_sharding = None
    if "mesh" in config:
        mesh = parallel.make_mesh(dict(config.mesh), devices=jax.local_devices())
        rules = parallel.resolve_rules(dict(config.get("sharding_rules") or {}))
        batch_sharding = parallel.batch_sharding(mesh, rules)
        shards = parallel.batch_shards(mesh, rules)
        if config.text.batch_size % shards:
            raise ValueError(
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


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (absl flags: --config FILE and --config.* overrides)."""
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, "Config file with `data` and `text` sections.")
    flags.mark_flag_as_required("config")

    def _main(args: Sequence[str]) -> None:
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {args[1:]}")
        fingerprint = run(config_flag.value)
        print(f"caption cache: {config_flag.value.data.caption_cache}")
        print(f"fingerprint: {fingerprint}  (set data.caption_cache_fingerprint to check it when training)")

    app.run(_main, argv=list(argv) if argv is not None else sys.argv)


if __name__ == "__main__":
    main()
