"""ArrayRecord array cache: round trip, interrupted writers, fingerprints."""

import os
import signal
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

from sga_jax.data.cache import ArrayCacheWriter, open_cache


def _record(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    return {
        "txt": rng.standard_normal((3, 8)).astype(ml_dtypes.bfloat16),
        "vec": rng.standard_normal(5).astype(np.float32),
        "ids": rng.integers(0, 1000, size=(i % 3 + 1, 2)).astype(np.int32),
        "caption": np.array(f"caption {i} ünïcode"),
    }


def test_round_trip_identical_arrays(tmp_path):
    with ArrayCacheWriter(tmp_path, "t5-xxl:512", records_per_shard=3) as writer:
        for i in range(7):
            writer.write(f"img/{i}.jpg", _record(i))
    cache = open_cache(tmp_path, "t5-xxl:512")
    assert len(cache) == 7
    assert len(list(tmp_path.glob("part-*.array_record"))) == 3
    for i in range(7):
        got = cache.get(f"img/{i}.jpg")
        assert got["key"] == f"img/{i}.jpg"
        for name, want in _record(i).items():
            assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
            np.testing.assert_array_equal(got[name], want)
    assert cache.fields["txt"] == ["bfloat16", [3, 8]]
    assert cache.fields["ids"][1] is None  # varying shape


def test_duplicate_key_refused(tmp_path):
    with ArrayCacheWriter(tmp_path, "fp") as writer:
        writer.write("a", {"x": np.zeros(2)})
        with pytest.raises(ValueError, match="'a' is already"):
            writer.write("a", {"x": np.zeros(2)})


def test_mismatched_fingerprint_refused(tmp_path):
    with ArrayCacheWriter(tmp_path, "clip-l") as writer:
        writer.write("a", {"x": np.zeros(2)})
    with pytest.raises(ValueError, match="'clip-l'.*'t5'"):
        ArrayCacheWriter(tmp_path, "t5")
    with pytest.raises(ValueError, match="'clip-l'.*'t5'"):
        open_cache(tmp_path, "t5")


def test_unclosed_writer_resumes_without_duplicates(tmp_path):
    writer = ArrayCacheWriter(tmp_path, "fp", records_per_shard=4)
    for i in range(10):  # two complete shards, two records in the open shard
        writer.write(str(i), _record(i))
    del writer  # never closed: the open shard stays a hidden temporary file
    assert len(open_cache(tmp_path)) == 8
    resumed = ArrayCacheWriter(tmp_path, "fp", records_per_shard=4)
    assert resumed.done_keys() == {str(i) for i in range(8)}
    for i in range(12):
        if str(i) not in resumed.done_keys():
            resumed.write(str(i), _record(i))
    resumed.close()
    cache = open_cache(tmp_path, "fp")
    assert sorted(cache.keys, key=int) == [str(i) for i in range(12)]
    np.testing.assert_array_equal(cache.get("9")["vec"], _record(9)["vec"])
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_killed_writer_process_resumes_without_duplicates(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time, numpy as np
        from sga_jax.data.cache import ArrayCacheWriter
        writer = ArrayCacheWriter({str(tmp_path)!r}, "fp", records_per_shard=2)
        for i in range(1000):
            writer.write(str(i), {{"x": np.full(4, i, np.int64)}})
            if i == 4:
                print("ready", flush=True)
                time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert len(open_cache(tmp_path)) == 4  # record 4 was in the open shard and is lost
    with ArrayCacheWriter(tmp_path, "fp", records_per_shard=2) as writer:
        assert writer.done_keys() == {"0", "1", "2", "3"}
        for i in range(7):
            if str(i) not in writer.done_keys():
                writer.write(str(i), {"x": np.full(4, i, np.int64)})
    cache = open_cache(tmp_path, "fp")
    assert sorted(cache.keys, key=int) == [str(i) for i in range(7)]
    assert [int(cache[i]["x"][0]) for i in range(len(cache))] == [int(k) for k in cache.keys]
