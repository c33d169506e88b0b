"""The Grain pipeline on PIL-generated datasets: exactly-once epochs, one bucket per batch, bad files
counted with reasons, disjoint process shards, exact resume, tfds / captions / cache sources."""

import collections
import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags
from data_fixtures import BUCKETS, MAX_PIXELS, encode, write_metadata_dataset
from PIL import Image

from sga_jax.data import (
    ArrayCacheWriter,
    default_data_config,
    make_buckets,
    make_pipeline,
    skimage_sample_dataset,
)

flags.FLAGS.mark_as_parsed()  # Grain worker processes read absl flags

BUCKET_LIST = make_buckets(**BUCKETS)


def _config(path, **overrides):
    config = default_data_config()
    config.path = str(path)
    config.buckets.max_long_edge = BUCKETS["max_long_edge"]
    config.buckets.pixel_budget = BUCKETS["pixel_budget"]
    config.buckets.multiple = BUCKETS["multiple"]
    config.max_image_pixels = MAX_PIXELS
    config.global_batch_size = 4
    config.num_epochs = 1
    config.index_threads = 2
    for name, value in overrides.items():
        config[name] = value
    return config


def _expected_bucket(width, height):
    """Nearest aspect ratio in log space, computed here independently of sga_jax.data.buckets."""
    distances = [abs(math.log(width / height) - math.log(w / h)) for w, h in BUCKET_LIST]
    return BUCKET_LIST[distances.index(min(distances))]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    directory = tmp_path_factory.mktemp("metadata")
    good, bad = write_metadata_dataset(directory)
    return directory, good, bad


def _valid_keys(batches):
    return [k for b in batches for k, v in zip(b["key"], b["valid"]) if v]


def test_each_readable_image_once_per_epoch_one_bucket_per_batch(dataset):
    directory, good, bad = dataset
    pipeline = make_pipeline(_config(directory, num_epochs=2, random_crop=True, flip=True), seed=3)
    per_epoch = pipeline.plan.batches_per_epoch
    batches = list(pipeline)
    assert len(batches) == 2 * per_epoch
    readable = sorted(k for k in good) + ["truncated.jpg"]  # passes the header check
    assert pipeline.stats["readable"] == len(readable)
    assert pipeline.stats["records"] == len(good) + len(bad) + 1  # + the bad JSON line
    for epoch in range(2):
        keys = _valid_keys(batches[epoch * per_epoch : (epoch + 1) * per_epoch])
        assert sorted(keys) == sorted(good), f"epoch {epoch}"
    for batch in batches:
        assert batch["image"].dtype == np.float32 and batch["image"].shape[0] == 4
        _, height, width, channels = batch["image"].shape
        assert (width, height) in BUCKET_LIST and channels == 3
        assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        assert not batch["image"][~batch["valid"]].any()  # filler slots: zero images
        for key, valid in zip(batch["key"], batch["valid"]):
            if valid:
                assert _expected_bucket(*good[key]) == (width, height), key
                assert batch["caption"][list(batch["key"]).index(key)] == f"a photo of {key}"
    reasons = {entry["path"].rsplit("/", 1)[-1]: entry["reason"] for entry in pipeline.stats["skipped"]}
    for name, reason in bad.items():
        assert reason in reasons[name], (name, reasons.get(name))
    assert any("bad JSON" in r for r in reasons.values())
    assert sum(pipeline.stats["buckets"].values()) == len(readable)
    # the two epochs are shuffled differently
    assert _valid_keys(batches[:per_epoch]) != _valid_keys(batches[per_epoch:])


def test_two_processes_get_disjoint_shards_covering_the_set(dataset):
    directory, good, _ = dataset
    shards = [list(make_pipeline(_config(directory), seed=1, process_index=p, process_count=2)) for p in range(2)]
    assert len(shards[0]) == len(shards[1])
    for a, b in zip(*shards):
        assert a["image"].shape == b["image"].shape and a["image"].shape[0] == 2  # same bucket, half each
    keys = [set(_valid_keys(s)) for s in shards]
    assert not keys[0] & keys[1]
    assert keys[0] | keys[1] == set(good)
    with pytest.raises(ValueError, match="not divisible by 3"):
        make_pipeline(_config(directory), seed=1, process_index=0, process_count=3)


@pytest.mark.parametrize("workers", [0, 1])
def test_restored_state_gives_exactly_the_uninterrupted_batches(dataset, workers):
    directory, _, _ = dataset
    config = _config(directory, num_epochs=None, random_crop=True, flip=True, worker_count=workers)
    first = make_pipeline(config, seed=7)
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    reference = [next(first) for _ in range(first.plan.batches_per_epoch + 2)]  # crosses an epoch
    first.close()
    resumed = make_pipeline(config, seed=7)
    resumed.set_state(state)
    for want in reference:
        got = next(resumed)
        np.testing.assert_array_equal(got["key"], want["key"])
        np.testing.assert_array_equal(got["valid"], want["valid"])
        np.testing.assert_array_equal(got["image"], want["image"])
    resumed.close()
    with pytest.raises(ValueError, match="seed"):
        make_pipeline(config, seed=8).set_state(state)


def test_captions_txt_source_and_missing_captions(tmp_path):
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(64, 32), (32, 64), (48, 48), (50, 40)]):
        (tmp_path / "sub").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "sub" / f"{i}.png")
        if i != 3:
            (tmp_path / "sub" / f"{i}.txt").write_text(f"caption {i}\n")
    pipeline = make_pipeline(_config(tmp_path, global_batch_size=1), seed=0)
    assert pipeline.stats["readable"] == 3
    assert [e["reason"] for e in pipeline.stats["skipped"]] == ["no caption file 3.txt"]
    got = {b["key"][0]: b["caption"][0] for b in pipeline}
    assert got == {f"sub/{i}.png": f"caption {i}" for i in range(3)}


def test_tfds_array_record_dataset_reads_through_the_pipeline(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    rng = np.random.default_rng(0)
    images = {i: rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for i, (w, h) in enumerate([(48, 48), (64, 32)] * 3)}

    class TinyCaptions(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict({"image": tfds.features.Image(), "caption": tfds.features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, pixels in images.items():  # encoded bytes: no TensorFlow needed
                yield i, {"image": encode(Image.fromarray(pixels), "PNG"), "caption": f"image {i}"}

    TinyCaptions(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    config = _config("", source="tfds", global_batch_size=3, worker_count=1)  # the source pickles into workers
    config.tfds.name, config.tfds.data_dir = "tiny_captions", str(tmp_path)
    pipeline = make_pipeline(config, seed=0)
    batches = list(pipeline)
    assert pipeline.stats["buckets"] == {"48x48": 3, "64x32": 3}
    assert len(batches) == 2
    for batch in batches:
        for image, caption in zip(batch["image"], batch["caption"]):
            want = images[int(caption.split()[1])].astype(np.float32) / 127.5 - 1.0
            np.testing.assert_allclose(image, want, atol=1e-5)  # bucket == image size: pixels unchanged


def test_caption_cache_joined_by_key_and_cache_as_source(dataset, tmp_path):
    directory, good, _ = dataset
    cache_dir = tmp_path / "cache"
    embeddings = {key: np.full((3, 4), i, np.float32) for i, key in enumerate(sorted(good)) if i % 5}
    with ArrayCacheWriter(cache_dir, "t5:3", records_per_shard=4) as writer:
        for key, txt in embeddings.items():
            writer.write(key, {"txt": txt, "vec": txt[0]})
    pipeline = make_pipeline(_config(directory, caption_cache=str(cache_dir)), seed=0)
    assert pipeline.stats["readable"] == len(embeddings)
    seen = 0
    for batch in pipeline:
        assert batch["txt"].shape == (4, 3, 4) and batch["vec"].shape == (4, 4)
        for key, txt, valid in zip(batch["key"], batch["txt"], batch["valid"]):
            if valid:
                np.testing.assert_array_equal(txt, embeddings[key])
                seen += 1
    assert seen == len(embeddings)
    cached = make_pipeline(_config(cache_dir, global_batch_size=2, worker_count=1), seed=0)
    keys = _valid_keys(list(cached))
    assert sorted(keys) == sorted(embeddings)


def test_nothing_readable_is_a_clear_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "a.txt").write_text("empty")
    with pytest.raises(ValueError, match="no readable records.*a.png: empty file"):
        make_pipeline(_config(tmp_path), seed=0)


def test_batches_become_global_arrays_sharded_over_the_mesh(dataset):
    from sga_jax import parallel

    directory, _, _ = dataset
    mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    batch = next(make_pipeline(_config(directory, global_batch_size=8, remainder="pad"), seed=0))
    out = parallel.host_to_global(batch, mesh, {"batch": ("data",)})
    assert isinstance(out["image"], jax.Array) and out["image"].shape == batch["image"].shape
    assert out["image"].sharding.spec == jax.sharding.PartitionSpec(("data",))
    np.testing.assert_array_equal(np.asarray(out["image"]), batch["image"])
    assert out["caption"] is batch["caption"] and isinstance(out["valid"], jax.Array)


def test_validate_cli_reports_json(dataset):
    directory, good, bad = dataset
    command = [sys.executable, "-m", "sga_jax.data", str(directory), "--json", f"--data.max_image_pixels={MAX_PIXELS}",
               *(f"--data.buckets.{k}={v}" for k, v in BUCKETS.items())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(result.stdout)
    assert set(report) == {"records", "readable", "skipped", "buckets"}
    assert report["readable"] == len(good)  # full decode: the truncated file is found too
    assert report["records"] == len(good) + len(bad) + 1
    skipped = {entry["path"].rsplit("/", 1)[-1]: entry["reason"] for entry in report["skipped"]}
    assert all(reason in skipped[name] for name, reason in bad.items())
    want = collections.Counter(f"{w}x{h}" for w, h in map(lambda s: _expected_bucket(*s), good.values()))
    assert report["buckets"] == dict(want)


def test_skimage_sample_dataset_trains_on_real_photographs(tmp_path):
    captions = {"astronaut": "an astronaut", "coffee": "a cup of coffee", "chelsea": "a cat", "rocket": "a rocket"}
    directory = skimage_sample_dataset(tmp_path / "demo", captions)
    pipeline = make_pipeline(_config(directory, global_batch_size=2, max_image_pixels=10**6), seed=0)
    assert pipeline.stats["readable"] == 4 and not pipeline.stats["skipped"]
    got = {key: caption for batch in pipeline for key, caption in zip(batch["key"], batch["caption"])}
    assert got == {"astronaut.png": "an astronaut", "coffee.png": "a cup of coffee", "chelsea.png": "a cat",
                   "rocket.jpg": "a rocket"}
    with pytest.raises(ValueError, match="no bundled scikit-image sample 'lena'"):
        skimage_sample_dataset(tmp_path / "x", {"lena": "?"})


def test_index_cache_reused_for_the_same_records(dataset, tmp_path, monkeypatch):
    directory, good, _ = dataset
    config = _config(directory, index_cache=str(tmp_path / "index.json"))
    first = make_pipeline(config, seed=0)
    assert (tmp_path / "index.json").is_file()
    import sga_jax.data.pipeline as pipeline_module

    def no_probe(*args, **kwargs):
        raise AssertionError("the index cache was not used")

    monkeypatch.setattr(pipeline_module, "_probe_all", no_probe)
    second = make_pipeline(config, seed=0)
    assert second.stats == first.stats
    np.testing.assert_array_equal(second.index.record_bucket, first.index.record_bucket)
    config.max_image_pixels = MAX_PIXELS + 1  # other settings: indexed again
    with pytest.raises(AssertionError, match="not used"):
        make_pipeline(config, seed=0)


def test_fixed_resolution_and_dropped_remainders(dataset):
    directory, good, _ = dataset
    config = _config(directory, remainder="drop", global_batch_size=4)
    config.buckets.fixed = "48x32"
    pipeline = make_pipeline(config, seed=0)
    batches = list(pipeline)
    readable = len(good) + 1  # the truncated file is only found when decoded
    assert len(batches) == readable // 4
    assert all(b["image"].shape == (4, 32, 48, 3) for b in batches)
    keys = _valid_keys(batches)
    assert len(set(keys)) == len(keys) and set(keys) <= set(good)
    assert len(keys) >= 4 * len(batches) - 1  # at most one filler slot: the truncated file, if not dropped
