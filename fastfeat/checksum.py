"""sha256 of files, streamed: weights files and Parquet shards can be gigabytes."""

from __future__ import annotations

import hashlib

CHUNK = 1 << 22  # 4 MiB reads: large enough to be I/O-bound, small enough to keep memory flat


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()
