"""Random-access record sources for the formats image-text datasets come in.

Every source is a Grain `RandomAccessDataSource`: `len(source)` and `source[i]` -> a dict with
`"key"` (a stable record id, also the key of caption / latent caches), `"caption"` (str) and the
image as either `"path"` (a file) or `"data"` (encoded bytes). Cache sources give arrays instead.
Sources list records without decoding anything; `listing_errors` holds entries that could not even
be listed (bad JSON lines, missing caption files), as {"path", "reason"}.

(a) `MetadataJsonlSource`: a folder with `metadata.jsonl` ({"file_name", "text", ...} per line),
    the Hugging Face imagefolder / Diffusion-4K convention.
(b) `CaptionsTxtSource`: a folder of images, each with a same-name `.txt` caption.
(c) `TfdsSource`: a tensorflow-datasets ArrayRecord dataset through `tfds.data_source` (no TensorFlow).
(d) `sga_jax.data.cache.ArrayCacheSource`: arrays written by the encode step.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from sga_jax.data.cache import ArrayCacheSource, open_cache
from sga_jax.errors import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".jxl", ".avif")


class _FolderListing:
    """A folder's records listed up front: random access, length, an identity and a repr."""

    directory: Path
    records: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.records[index]

    def identity(self) -> str:
        """Names this listing: the folder and a hash of its record keys (for index caches)."""
        keys = "\n".join(record["key"] for record in self.records)
        return f"{type(self).__name__}:{self.directory.resolve()}:{hashlib.sha1(keys.encode()).hexdigest()}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.directory)!r}, records={len(self)})"


class MetadataJsonlSource(_FolderListing):
    """Records of `directory/metadata.jsonl`: one JSON object per line with `file_name` (relative to
    the directory) and a caption under `caption_field` ("text" by default). Extra fields are kept
    under `"extra"`. Lines that are not JSON objects with both fields are listing errors."""

    def __init__(self, directory: str | os.PathLike, caption_field: str = "text"):
        self.directory = Path(directory)
        metadata = self.directory / "metadata.jsonl"
        if not metadata.is_file():
            raise ConfigError(
                f"{self.directory} has no metadata.jsonl (expected lines of {{\"file_name\", \"{caption_field}\"}})")
        self.records: list[dict[str, Any]] = []
        self.listing_errors: list[dict[str, str]] = []
        seen: set[str] = set()
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{metadata}:{number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                self.listing_errors.append({"path": where, "reason": f"bad JSON: {error.msg}"})
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
                self.listing_errors.append({"path": where, "reason": "no 'file_name' string"})
                continue
            caption = entry.get(caption_field)
            if not isinstance(caption, str):
                self.listing_errors.append({"path": where, "reason": f"no '{caption_field}' string"})
                continue
            key = entry["file_name"]
            if key in seen:
                self.listing_errors.append({"path": where, "reason": f"duplicate file_name {key!r}"})
                continue
            seen.add(key)
            extra = {k: v for k, v in entry.items() if k not in ("file_name", caption_field)}
            self.records.append({"key": key, "caption": caption, "path": str(self.directory / key), "extra": extra})


class CaptionsTxtSource(_FolderListing):
    """Images under `directory` (recursively, by extension), each captioned by the `.txt` file of
    the same name; an image without one is a listing error. Keys are paths relative to `directory`."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ConfigError(f"{self.directory} is not a directory")
        self.records: list[dict[str, Any]] = []
        self.listing_errors: list[dict[str, str]] = []
        for path in sorted(self.directory.rglob("*")):
            if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
                continue
            caption_file = path.with_suffix(".txt")
            try:
                caption = caption_file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as error:
                missing = isinstance(error, FileNotFoundError)
                reason = f"no caption file {caption_file.name}" if missing else f"unreadable caption: {error}"
                self.listing_errors.append({"path": str(path), "reason": reason})
                continue
            key = path.relative_to(self.directory).as_posix()
            self.records.append({"key": key, "caption": caption, "path": str(path)})


class TfdsSource:
    """A tensorflow-datasets dataset prepared in ArrayRecord format, read with `tfds.data_source`
    and the image feature left encoded (decoded later by PIL, like every other source)."""

    def __init__(self, name: str, split: str, data_dir: str | None = None, *,
                 image_feature: str = "image", caption_feature: str = "caption"):
        import tensorflow_datasets as tfds  # imported lazily: only this source needs it

        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_feature, self.caption_feature = image_feature, caption_feature
        self._source = tfds.data_source(name, split=split, data_dir=data_dir,
                                        decoders={image_feature: tfds.decode.SkipDecoding()})
        features = self._source.dataset_info.features
        for feature in (image_feature, caption_feature):
            if feature not in features:
                raise ConfigError(f"tfds dataset {name} has no feature {feature!r}; it has {sorted(features.keys())}")
        self.listing_errors: list[dict[str, str]] = []

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self._source[index]
        caption = example[self.caption_feature]
        if isinstance(caption, bytes):
            caption = caption.decode("utf-8")
        key = f"{self.name}/{self.split}/{index}"
        return {"key": key, "caption": str(caption), "data": example[self.image_feature]}

    def identity(self) -> str:
        """Names this dataset split (for index caches)."""
        return f"tfds:{self.name}/{self.split}:{self.data_dir}:{len(self)}"

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, records={len(self)})"


def open_source(config: Any) -> MetadataJsonlSource | CaptionsTxtSource | TfdsSource | ArrayCacheSource:
    """The source named by a data config (see `sga_jax.data.default_data_config`): `config.source`
    is "metadata_jsonl", "captions_txt", "tfds", "cache" or "auto" (decided from `config.path`:
    a cache.json means a cache, a metadata.jsonl a metadata folder, else captions)."""
    kind = config.source
    if kind == "auto":
        kind = detect_source_kind(config.path)
    if kind == "metadata_jsonl":
        return MetadataJsonlSource(config.path, caption_field=config.caption_field)
    if kind == "captions_txt":
        return CaptionsTxtSource(config.path)
    if kind == "tfds":
        if not config.tfds.name:
            raise ConfigError("data.source='tfds' needs data.tfds.name")
        return TfdsSource(config.tfds.name, config.tfds.split, config.tfds.data_dir or None,
                          image_feature=config.tfds.image_feature, caption_feature=config.tfds.caption_feature)
    if kind == "cache":
        return open_cache(config.path)
    raise ConfigError(f"unknown data.source {kind!r}; expected metadata_jsonl, captions_txt, tfds, cache or auto")


def detect_source_kind(path: str | os.PathLike) -> str:
    """"cache", "metadata_jsonl" or "captions_txt" for a dataset directory."""
    directory = Path(path)
    if not directory.is_dir():
        raise ConfigError(f"dataset path {directory} is not a directory")
    if (directory / "cache.json").is_file():
        return "cache"
    if (directory / "metadata.jsonl").is_file():
        return "metadata_jsonl"
    return "captions_txt"


SKIMAGE_SAMPLES = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "hubble_deep_field",
                   "retina", "camera")


def skimage_sample_dataset(directory: str | os.PathLike, captions: Mapping[str, str]) -> Path:
    """Write scikit-image's bundled sample photographs named in `captions` (keys from
    `SKIMAGE_SAMPLES`, e.g. {"astronaut": "an astronaut ...", "coffee": "a cup of coffee"}) into
    `directory`, with a `metadata.jsonl`, and return the directory: a tiny real-image dataset that
    needs no download (the files ship inside the scikit-image wheel)."""
    import skimage.data  # imported lazily: only the demo dataset needs it

    files = {p.stem: p for p in Path(skimage.data.__file__).parent.iterdir()}
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, caption in captions.items():
        if name not in SKIMAGE_SAMPLES or name not in files:
            available = sorted(set(SKIMAGE_SAMPLES) & set(files))
            raise ConfigError(f"no bundled scikit-image sample {name!r}; available: {available}")
        target = out / files[name].name
        shutil.copyfile(files[name], target)
        lines.append(json.dumps({"file_name": target.name, "text": caption}))
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
