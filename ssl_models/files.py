"""File digests: the one sha256 of a file that shard manifests, backbone files, model cards and lineage use."""

from __future__ import annotations

import hashlib
import os


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of the file's bytes, read in ``chunk``-byte blocks (memory stays flat for any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
