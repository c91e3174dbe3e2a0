"""The raw-data layout the ingest writes and the shard stage reads: data/raw/{train,val,test}/<class>/<file>
(``_unlabelled`` for images without a class), SOURCE.json beside them, and DVC's hash of the folder."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

RAW_DIR = Path("data") / "raw"
SOURCE_FILE = "SOURCE.json"
SPLITS = ("train", "val", "test")
UNLABELLED = "_unlabelled"


# ----------------------------------------------------------------------------------------------- DVC hash
def dvc_dir_md5(files: Iterable[tuple[str, str]]) -> str:
    """DVC 3's hash of a directory from (posix relpath, md5 of content) pairs: ``md5(json(sorted entries)).dir``.

    Lets the shard stage (and ``ingest --no-dvc``) state the data version of what it actually read without
    running dvc inside a dvc stage (dvc holds its repo lock there). tests/test_ingest.py checks it against
    ``dvc add``.
    """
    entries = sorted(({"md5": md5, "relpath": rel} for rel, md5 in files), key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def raw_dir_md5(raw: Path) -> str:
    """:func:`dvc_dir_md5` of every file under ``raw`` (what ``dvc add`` would record)."""
    files = []
    for path in sorted(p for p in raw.rglob("*") if p.is_file()):
        files.append((path.relative_to(raw).as_posix(), hashlib.md5(path.read_bytes()).hexdigest()))
    return dvc_dir_md5(files)
