"""A Hugging Face hub cache written as huggingface_hub lays it out, from local folders, for offline
tests of hub ids: HF_HUB_CACHE/models--ORG--NAME/{blobs/<sha256>, snapshots/<commit>/<files as
relative symlinks into blobs>, refs/<revision> holding the commit}."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def write_hub_cache(cache: Path, repo_id: str, folder: Path, revision: str = "main") -> Path:
    """Put every file under `folder` into `cache` as the snapshot of `repo_id` at `revision`;
    returns the snapshot directory."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    commit = hashlib.sha1(b"".join(str(p.relative_to(folder)).encode() + p.read_bytes() for p in files)).hexdigest()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for path in files:
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot
