"""python -m sga_jax.encode: caption cache written and read back, resumed, sharded, fingerprinted."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from sga_jax import encode, text
from sga_jax.data import default_data_config, open_cache

CAPTIONS = [f"a photo of {n} red cats on a chair, watercolor" if n % 2 else f"a map of harbour {n} at dusk"
            for n in range(10)]
T5_LENGTH = 12
BATCH = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A Flux-like folder (tiny random encoders + demo tokenizers) and a caption-only dataset whose
    image files do not exist: encoding must never open an image."""
    root = tmp_path_factory.mktemp("encode")
    text.build_demo_text_folder(root / "flux", CAPTIONS)
    data = root / "data"
    data.mkdir()
    lines = [json.dumps({"file_name": f"img/{i:02d}.png", "text": c}) for i, c in enumerate(CAPTIONS)]
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _config(world, cache, **text_overrides):
    config = default_data_config()
    config.path = str(world / "data")
    config.caption_cache = str(cache)
    text_config = text.default_text_config()
    text_config.update({**dict(root=str(world / "flux"), t5_length=T5_LENGTH, dtype="float32", batch_size=BATCH,
                               records_per_shard=3), **text_overrides})
    import ml_collections

    return ml_collections.ConfigDict({"data": config, "text": text_config})


def _expected(world):
    """What a TextEncoder gives for each caption, batched as the encoder batches (last batch padded)."""
    te = text.text_encoder_from_config(_config(world, "unused").text)
    out = {}
    for start in range(0, len(CAPTIONS), BATCH):
        chunk = CAPTIONS[start:start + BATCH]
        txt, _, vec = te(chunk + [chunk[-1]] * (BATCH - len(chunk)))
        for row, i in enumerate(range(start, start + len(chunk))):
            out[f"img/{i:02d}.png"] = (np.asarray(txt[row]), np.asarray(vec[row]))
    return te, out


def test_cli_writes_cache_read_back_identical(world, tmp_path):
    cache = tmp_path / "cache"
    config_file = tmp_path / "encode_config.py"
    config_file.write_text(textwrap.dedent(f"""
        import ml_collections
        from sga_jax.data import default_data_config
        from sga_jax.text import default_text_config

        def get_config():
            data = default_data_config()
            data.path = {str(world / 'data')!r}
            data.caption_cache = {str(cache)!r}
            text = default_text_config()
            text.root = {str(world / 'flux')!r}
            text.dtype = "float32"
            text.batch_size = {BATCH}
            return ml_collections.ConfigDict({{"data": data, "text": text}})
    """))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-m", "sga_jax.encode", f"--config={config_file}", f"--config.text.t5_length={T5_LENGTH}",
         "--config.text.records_per_shard=3"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "encode: 100%" in result.stderr and "10/10" in result.stderr  # the progress bar
    te, expected = _expected(world)
    fingerprint = te.fingerprint()
    assert f"fingerprint: {fingerprint}" in result.stdout
    cached = open_cache(cache, fingerprint)
    assert sorted(cached.keys) == sorted(expected)
    for key, (txt, vec) in expected.items():
        record = cached.get(key)
        assert record["txt"].shape == (T5_LENGTH, 32) and record["txt"].dtype == np.float32
        np.testing.assert_array_equal(record["txt"], txt)
        np.testing.assert_array_equal(record["vec"], vec)


def test_interrupted_run_resumes_without_duplicates(world, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    config = _config(world, cache)
    te = text.text_encoder_from_config(config.text)
    from sga_jax.data.cache import ArrayCacheWriter
    from sga_jax.data.sources import open_source

    calls = {"n": 0}
    real = te.encode_tokens

    def crash_on_third_batch(tokens):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(tokens)

    te.encode_tokens = crash_on_third_batch
    writer = ArrayCacheWriter(cache, te.fingerprint(), records_per_shard=3)
    with pytest.raises(KeyboardInterrupt):
        encode.encode_captions(open_source(config.data), te, writer, batch_size=BATCH, progress=False)
    # The writer is never closed, as after a kill: 8 encoded, 6 in two complete shards, 2 lost.
    assert len(open_cache(cache)) == 6

    written = []
    real_write = ArrayCacheWriter.write
    monkeypatch.setattr(ArrayCacheWriter, "write", lambda self, key, arrays: (written.append(key), real_write(self, key, arrays))[1])
    encode.run(config, progress=False)
    assert len(written) == 4 and len(set(written)) == 4  # only what was missing
    cached = open_cache(cache, te.fingerprint())
    assert len(cached) == 10 and sorted(cached.keys) == [f"img/{i:02d}.png" for i in range(10)]
    _, expected = _expected(world)
    for key, (txt, vec) in expected.items():
        np.testing.assert_allclose(cached.get(key)["txt"], txt, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(cached.get(key)["vec"], vec, rtol=1e-5, atol=1e-6)


def test_mismatched_fingerprint_is_refused(world, tmp_path):
    cache = tmp_path / "cache"
    encode.run(_config(world, cache), progress=False)
    with pytest.raises(ValueError, match="fingerprint"):
        encode.run(_config(world, cache, t5_length=T5_LENGTH + 4), progress=False)
    other = text.text_encoder_from_config(_config(world, cache, t5_length=T5_LENGTH + 4).text).fingerprint()
    with pytest.raises(ValueError, match="fingerprint"):
        open_cache(cache, other)


def test_sharded_encoding_over_eight_devices_matches(world, tmp_path):
    import ml_collections

    assert jax.device_count() == 8
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    fingerprint = encode.run(_config(world, single), progress=False)
    config = _config(world, sharded, batch_size=8)
    config.mesh = ml_collections.ConfigDict({"data": 2, "fsdp": 2, "tensor": 2})
    assert encode.run(config, progress=False) == fingerprint
    a, b = open_cache(single), open_cache(sharded)
    for key in a.keys:
        np.testing.assert_allclose(b.get(key)["txt"], a.get(key)["txt"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b.get(key)["vec"], a.get(key)["vec"], rtol=1e-5, atol=1e-5)


def test_config_errors_are_clear(world, tmp_path):
    config = _config(world, "")
    with pytest.raises(ValueError, match="caption_cache is empty"):
        encode.run(config, progress=False)
    config = _config(world, tmp_path / "c", root="")
    with pytest.raises(ValueError, match="config.text.t5 is empty"):
        encode.run(config, progress=False)
    config = _config(world, tmp_path / "c", t5_tokenizer=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="missing"):
        encode.run(config, progress=False)
