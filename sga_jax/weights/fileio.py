"""What every checkpoint file reader shares: the error type and positional reads into a buffer.

Positional reads, not memory maps: every page of a mapped file that has been touched counts towards
the process's resident memory until the map closes, which would make a streaming conversion hold
the whole checkpoint.
"""

from __future__ import annotations

from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: missing, unexpected or mis-shaped tensors, or a bad file."""


def read_into(path: Path, offset: int, buffer: memoryview, what: str) -> None:
    """Fill `buffer` with the bytes of `path` from `offset`; a short file is a CheckpointError
    naming the file and `what` was being read."""
    with open(path, "rb", buffering=0) as handle:
        handle.seek(offset)
        done = 0
        while done < len(buffer):
            count = handle.readinto(buffer[done:])
            if not count:
                raise CheckpointError(f"{path}: truncated while reading {what}")
            done += count
