"""Stage ``shard``: data/raw -> data/shards/{split}-NNNNNN.tar (WebDataset) + manifest.json.

    python -m stages.shard          (dvc.yaml runs it; params: seed, data, shard)

Each split found in data/raw (train, val, test) is listed in sorted path order, shuffled with ``seed`` (so every
shard mixes classes and the order is reproducible) and cut into shards of ``shard.shard_size`` samples. Every image
is decoded and checked again (users can drop files into data/raw by hand) with the same checks as ingest, in
``shard.workers`` processes (0: one per CPU), converted to ``data.image_mode`` and stored as ``shard.image_format``;
a file already in that format and mode, which the loader's decoder reads, keeps its original bytes.

Shard format ``sslcook-shards/2``: a sample is two tar members, ``{key}.png`` (or ``.jpg``) and ``{key}.json``
= ``{"cls": class index (-1 for _unlabelled), "path": path under data/raw, "class": name}``, with ``key`` =
``{split}-{index:07d}`` (one member besides the image: every member read costs the decode-only loader time).

The manifest holds the format (``"format": "sslcook-shards/2"``; the loader refuses shards without it), per split
the counts (total and per class), the distinct stored image sizes (``image_sizes``: sorted [H, W] pairs, one when
the split can be batched as it is) and every shard's name, sha256, sample count and size; the class names; image
mode, format and size statistics; the skipped files with their reasons (and those skipped at
ingest); the conversions made; the data version, i.e. DVC's md5 of data/raw as read here (with whether it matches
data.dvc); and the lineage record (content only: a re-run on the same data/raw and params writes the same bytes,
so data/shards keeps its DVC hash). The run's time, commit and flow run go to provenance/shard.json. Everything is
written into a temporary folder that replaces data/shards only when
complete, so no partial shard is ever visible under its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from tqdm import tqdm

from ssl_models.data import MODE_CHANNELS

from .workspace import images
from .workspace.common import DataError, atomic_path, read_json, run_main, workspace, write_json
from .workspace.config import load_params
from .workspace.lineage import data_version as dvc_file_version
from .workspace.lineage import make_record, sha256_file, write_provenance
from .workspace.rawdata import RAW_DIR, SOURCE_FILE, SPLITS, UNLABELLED, dvc_dir_md5

SHARDS_DIR = Path("data") / "shards"
MANIFEST = "manifest.json"


def scan_raw(raw: Path) -> tuple[dict[str, list[tuple[str, str]]], list[str], list[str]]:
    """({split: [(path under raw, class)]} for image files, other files (hashed, not sharded), ignored names)."""
    if not raw.is_dir():
        raise DataError(f"{RAW_DIR.as_posix()}: not found (run `sslcook data ingest`, or `dvc pull`)")
    splits: dict[str, list[tuple[str, str]]] = {}
    others: list[str] = []
    ignored: list[str] = []
    for top in sorted(raw.iterdir()):
        rel_top = top.relative_to(raw).as_posix()
        if top.is_file():
            others.append(rel_top)
            continue
        if top.name not in SPLITS:
            raise DataError(
                f"{RAW_DIR.as_posix()}/{rel_top}: unexpected folder (data/raw holds "
                f"{', '.join(s + '/' for s in SPLITS)} with one folder per class)"
            )
        files: list[tuple[str, str]] = []
        for entry in sorted(top.iterdir()):
            if entry.is_file():
                raise DataError(
                    f"{RAW_DIR.as_posix()}/{entry.relative_to(raw).as_posix()}: file outside a class "
                    f"folder (expected {top.name}/<class>/<file>)"
                )
            for path in sorted(p for p in entry.rglob("*") if p.is_file()):
                rel = path.relative_to(raw).as_posix()
                parts = path.relative_to(entry).parts
                if any(p.startswith(".") for p in parts) or not images.is_image_name(path.name):
                    others.append(rel)
                    ignored.append(rel)
                else:
                    files.append((rel, entry.name))
        splits[top.name] = files
    if not any(splits.values()):
        raise DataError(f"{RAW_DIR.as_posix()}: no images (expected <split>/<class>/<file>)")
    return splits, others, ignored


class ShardWriter:
    """Writes ``{split}-NNNNNN.tar`` files of ``size`` samples into ``folder`` (reproducible tar headers)."""

    def __init__(self, folder: Path, split: str, size: int):
        self.folder, self.split, self.size = folder, split, size
        self.shards: list[dict[str, Any]] = []
        self._writer = None
        self._count = 0

    def write(self, sample: dict[str, Any]) -> None:
        if self._writer is None or self._count == self.size:
            self._close()
            name = f"{self.split}-{len(self.shards):06d}.tar"
            self.shards.append({"name": name})
            self._writer = wds.TarWriter(
                str(self.folder / name), encoder=False, mtime=0, user="sslcook", group="sslcook"
            )
            self._count = 0
        self._writer.write(sample)
        self._count += 1

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            path = self.folder / self.shards[-1]["name"]
            self.shards[-1].update(sha256=sha256_file(path), count=self._count, bytes=path.stat().st_size)
            self._writer = None

    def close(self) -> list[dict[str, Any]]:
        self._close()
        return self.shards


def _size_stats(sizes: Counter) -> dict[str, Any]:
    """Width/height statistics of a Counter of (width, height)."""
    if not sizes:
        return {}
    n = sum(sizes.values())
    return {
        "min": [min(w for w, _ in sizes), min(h for _, h in sizes)],
        "max": [max(w for w, _ in sizes), max(h for _, h in sizes)],
        "mean": [
            round(sum(w * c for (w, _), c in sizes.items()) / n, 2),
            round(sum(h * c for (_, h), c in sizes.items()) / n, 2),
        ],
        "distinct": len(sizes),
        "most_common": [[w, h, c] for (w, h), c in sizes.most_common(3)],
    }


def _worker_signals() -> None:
    """The pool ends its workers with SIGTERM, so they keep its default action; Ctrl-C is the parent's to handle."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def _mapper(workers: int) -> Iterator[Callable]:
    """An ordered map over ``workers`` processes (the builtin map when 1)."""
    if workers <= 1:
        yield map
        return
    # Not fork: a process forked from a threaded parent (torch's pools, a Prefect or wandb thread) can inherit a
    # lock held at that instant and never start, and the pool then waits for it forever. A fork server is one
    # clean process that imports the decoding code once and forks the workers from it (spawn where it is missing);
    # its start costs about 3 s per run of the stage (5k images: 4.8 s with fork, 8.2 s).
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([images.__name__, "ssl_models.data"])
    else:
        context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_worker_signals) as pool:
        yield lambda fn, items: pool.imap(fn, items, chunksize=64)


def _size_text(size) -> str:
    return "x".join(str(v) for v in size)


def _jobs(splits: dict[str, list[tuple[str, str]]], seed: int) -> list[tuple[str, str, str]]:
    """(split, path under raw, class) in shard order: each split's files shuffled from the seed, so shards mix
    classes reproducibly."""
    jobs: list[tuple[str, str, str]] = []
    for split in (s for s in SPLITS if s in splits):
        files = list(splits[split])
        random.Random(f"sslcook-shard:{seed}:{split}").shuffle(files)
        jobs += [(split, rel, cls) for rel, cls in files]
    return jobs


@dataclass
class _Tally:
    """What the manifest says about the images written: counts per class, sizes, conversions, digests."""

    file_md5: list[tuple[str, str]]
    per_split: dict[str, Counter] = field(default_factory=dict)
    split_sizes: dict[str, set] = field(default_factory=dict)  # split -> {(H, W)} as the loader's tensors have it
    first: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)  # split -> (first size, its file)
    source_sizes: Counter = field(default_factory=Counter)
    stored_sizes: Counter = field(default_factory=Counter)
    conversions: Counter = field(default_factory=Counter)
    kept_bytes: int = 0

    def size_problem(self, split: str, rel: str, size: tuple[int, int]) -> str | None:
        first = self.first.setdefault(split, (tuple(size), rel))
        if first[0] == tuple(size):
            return None
        return (
            f"{RAW_DIR.as_posix()}: split {split!r} mixes image sizes: {first[1]} is {_size_text(first[0])}, "
            f"{rel} is {_size_text(size)}; set shard.image_size to scale every image to one size"
        )

    def add(self, split: str, cls: str, res: dict[str, Any]) -> int:
        """Count one written sample; returns its index in the split."""
        per_class = self.per_split.setdefault(split, Counter())
        index = sum(per_class.values())
        per_class[cls] += 1
        self.split_sizes.setdefault(split, set()).add((res["size"][1], res["size"][0]))
        self.kept_bytes += res["kept"]
        self.source_sizes[res["source_size"]] += 1
        self.stored_sizes[res["size"]] += 1
        if res["conversion"]:
            self.conversions[res["conversion"]] += 1
        return index

    def image_size(self) -> dict[str, Any]:
        return {
            "source": _size_stats(self.source_sizes),
            "stored": _size_stats(self.stored_sizes),
            "uniform": list(next(iter(self.stored_sizes))) if len(self.stored_sizes) == 1 else None,
        }


def _write_samples(
    out: Path,
    jobs,
    results,
    *,
    tally: _Tally,
    policy,
    label_of: dict[str, int],
    fmt: str,
    shard_size: int,
    one_size: bool,
) -> dict[str, list[dict[str, Any]]]:
    """Write each good image with its one json member into ``{split}-NNNNNN.tar``; returns the shards per split."""
    writers: dict[str, ShardWriter] = {}
    try:
        for (split, rel, cls), res in tqdm(
            zip(jobs, results), total=len(jobs), desc="shard", unit="img", file=sys.stderr, mininterval=0.5
        ):
            tally.file_md5.append((rel, res["md5"]))
            if "bad" in res:
                policy.bad(f"{RAW_DIR.as_posix()}/{rel}", res["bad"])
                continue
            problem = tally.size_problem(split, rel, res["size"]) if one_size else None
            if problem:  # evaluation stacks a split into one batch: refuse now, not after the training
                raise DataError(problem)
            writer = writers.get(split) or writers.setdefault(split, ShardWriter(out, split, shard_size))
            index = tally.add(split, cls, res)
            writer.write(
                {
                    "__key__": f"{split}-{index:07d}",
                    fmt: res["payload"],
                    "json": json.dumps(
                        {"cls": label_of.get(cls, -1), "path": rel, "class": cls}, ensure_ascii=False
                    ).encode("utf-8"),
                }
            )
    finally:  # closed before a refused run's temporary folder goes
        shards = {split: writer.close() for split, writer in writers.items()}
    return shards


def _data_version(root: Path, file_md5: list[tuple[str, str]]) -> tuple[str, str | None]:
    """(md5 of data/raw as read here, the one data.dvc records); a mismatch is warned about, not refused."""
    version, recorded = dvc_dir_md5(file_md5), dvc_file_version(root)
    if recorded != version:
        state = f"differs from data.dvc ({recorded})" if recorded else "is not versioned (no data.dvc)"
        print(
            f"warning: data/raw (md5 {version}) {state}: `dvc add data/raw` (or `sslcook data ingest`) "
            f"versions what you shard",
            file=sys.stderr,
        )
    return version, recorded


def _manifest(
    root: Path,
    params,
    splits: dict[str, Any],
    shards: dict[str, list],
    tally: _Tally,
    policy,
    classes: list[str],
    ignored: list[str],
) -> dict[str, Any]:
    from ssl_models.data import SHARD_FORMAT  # the format the loader reads: defined once, beside it

    data_cfg, shard_cfg = params.data, params.shard
    manifest_splits = {
        split: {
            "count": sum(tally.per_split.get(split, Counter()).values()),
            "per_class": dict(sorted(tally.per_split.get(split, Counter()).items())),
            "image_sizes": [list(hw) for hw in sorted(tally.split_sizes.get(split, ()))],
            "shards": shards.get(split, []),
        }
        for split in SPLITS
        if split in splits
    }
    if not manifest_splits.get("train", {}).get("count"):
        raise DataError(f"{RAW_DIR.as_posix()}: no usable training images ({len(policy.skipped)} skipped)")
    version, recorded = _data_version(root, tally.file_md5)
    raw = root / RAW_DIR
    source = read_json(raw / SOURCE_FILE) if (raw / SOURCE_FILE).is_file() else {}
    lineage_params = {"seed": params.seed, "data": data_cfg.model_dump(), "shard": shard_cfg.model_dump()}
    return {
        "format": SHARD_FORMAT,
        "splits": manifest_splits,
        "classes": classes,
        "image_mode": data_cfg.image_mode,
        "channels": MODE_CHANNELS[data_cfg.image_mode],
        "image_format": shard_cfg.image_format,
        "image_size": tally.image_size(),
        "original_bytes_kept": tally.kept_bytes,
        "conversions": dict(sorted(tally.conversions.items())),
        "skipped": policy.skipped,
        "skipped_count": len(policy.skipped),
        "skipped_at_ingest": source.get("skipped", []),
        "ignored": ignored,
        "source": source.get("name"),
        "data_version": version,
        "data_dvc": {"md5": recorded, "matches": recorded == version},
        "seed": params.seed,
        "lineage": make_record(
            "shard",
            params=lineage_params,
            parents={"raw": RAW_DIR.as_posix()},
            seed=params.seed,
            root=root,
            extra={"data_version": version, "data_dvc_md5": recorded},
        ),
    }


def shard(root: Path | None = None) -> dict[str, Any]:
    """Run the stage in workspace ``root``; returns the manifest."""
    started = time.perf_counter()
    root = root or workspace()
    params = load_params(root / "params.yaml")  # every check on params happens before any work
    data_cfg, shard_cfg = params.data, params.shard
    raw = root / RAW_DIR
    splits, others, ignored = scan_raw(raw)
    classes = sorted({cls for files in splits.values() for _, cls in files if cls != UNLABELLED})
    prepare = images.PrepareForShard(
        str(raw),
        data_cfg.image_mode,
        MODE_CHANNELS[data_cfg.image_mode],
        data_cfg.max_image_pixels,
        shard_cfg.image_size,
        shard_cfg.image_format,
        shard_cfg.jpeg_quality,
    )
    policy = images.BadImagePolicy(data_cfg.on_bad_image)
    tally = _Tally([(rel, hashlib.md5((raw / rel).read_bytes()).hexdigest()) for rel in others])
    jobs = _jobs(splits, params.seed)
    workers = shard_cfg.workers or os.cpu_count() or 1
    with atomic_path(root / SHARDS_DIR) as out, _mapper(workers) as mapper:
        out.mkdir()
        shards = _write_samples(
            out,
            jobs,
            mapper(prepare, [rel for _, rel, _ in jobs]),
            tally=tally,
            policy=policy,
            label_of={cls: i for i, cls in enumerate(classes)},
            fmt=shard_cfg.image_format,
            shard_size=shard_cfg.shard_size,
            one_size=shard_cfg.image_size is None,
        )
        manifest = _manifest(root, params, splits, shards, tally, policy, classes, ignored)
        write_json(out / MANIFEST, manifest)
    write_provenance(
        "shard",
        SHARDS_DIR / MANIFEST,
        root=root,
        extra={"seconds": round(time.perf_counter() - started, 2), "workers": workers},
    )
    counts = ", ".join(f"{s} {e['count']} in {len(e['shards'])} shards" for s, e in manifest["splits"].items())
    print(
        f"{SHARDS_DIR.as_posix()}: {counts}; {len(policy.skipped)} skipped; data version {manifest['data_version']}",
        file=sys.stderr,
    )
    return manifest


def main() -> None:
    shard()


if __name__ == "__main__":
    run_main(main)
