"""Streaming WebDataset shards into training: split by rank and worker, shuffled, decoded, batched as uint8.

Knows nothing of the pipeline: it reads tar shards of format ``sslcook-shards/2`` (:data:`SHARD_FORMAT`), whose
samples are two members, an image (``png`` or ``jpg``) and a ``json`` holding ``{"cls": int (-1 unlabelled), ...}``,
plus (when there is one) the ``manifest.json`` written beside them: ``{"format": "sslcook-shards/2", "splits":
{split: {"image_sizes": [[H, W], ...], "shards": [{"name", "sha256", "count", "bytes"}]}}, "image_mode": ...}``.
A manifest of another (or no) format is refused with a "re-run the shard stage" :class:`DataError`.

The loader only decodes: batches are ``(images uint8 B x C x H x W, labels int64 B)`` (``(..., keys)`` with
``return_keys``); the views are made from them per batch on the training device (``ssl_models.augment``), so the
workers never compete with the step for augmentation work. Batching needs one image size per split: the
manifest's ``image_sizes``, or ``resize=N`` (shorter side to N, centre crop N x N, in the workers); mixed sizes
without it are a DataError naming the split and two of the sizes.

How an epoch is cut (:func:`make_loader`):

- Units of work. Each shard is one unit, or, when there are fewer shards than ``world_size * num_workers``
  readers (or they would not divide evenly across ranks), ``parts`` interleaved units (sample ``i`` of a shard
  belongs to part ``i % parts``). Every sample is in exactly one unit, so more workers than shards still
  read each sample once.
- The unit list is shuffled with ``(seed, epoch)`` (the same on every rank), unit ``j`` goes to rank
  ``j % world_size`` and, there, to worker ``(j // world_size) % num_workers``. Within a worker a buffer of
  ``shuffle_buffer`` samples is shuffled with ``(seed, epoch, rank, worker)``. Order is thus a function of
  ``seed`` and ``epoch`` (and of world_size/num_workers), never of timing: DataLoader delivers its workers'
  batches in a fixed round-robin order.
- Workers decode (and resize) each sample and batch; the main process merges the workers' partial batches and,
  for a CUDA consumer (``pin_memory``), hands them over in pinned memory. ``drop_last=True`` (training): every
  rank yields the same number of full batches,
  ``len(loader)``, fixed for all epochs: what the rank that receives the fewest samples can fill, so no sample
  is repeated and ranks never wait on each other. ``drop_last=False`` (evaluation, coverage checks): every
  sample of the rank's units exactly once, the last batch partial; batch counts can then differ by one
  between ranks.

Nothing is resampled: an epoch sees each sample at most once. Shard integrity is checked before use:
:func:`verify_shards` compares sha256 and size against the manifest (:class:`DataError` naming the shard), and
:func:`make_loader` does it for the local shards it is given (once per file version); a shard that breaks while
being read is also named.

Remote shards (:class:`RemoteShards`, :func:`fetch_verified`): ``urls`` may be ``http(s)://`` URLs, any fsspec
protocol (``s3://``, ``gs://``, ...) or WebDataset's ``pipe:COMMAND``; the manifest comes from beside them (or
``manifest=``). Each remote shard is streamed into a temporary file while its sha256 is computed, and compared
with the manifest before any of its samples is read: a modified shard is named and never used.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch import Tensor

from .files import sha256_file

try:
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as _TORCHVISION_DECODE
except ImportError:  # a torchvision without image codecs: Pillow decodes
    _TORCHVISION_DECODE = None

MANIFEST = "manifest.json"
SHARD_FORMAT = "sslcook-shards/2"  # the stage stages/shard.py writes and this module reads
IMAGE_KEYS = ("png", "jpg", "jpeg")
MODE_CHANNELS = {"L": 1, "RGB": 3}  # the manifest's image_mode -> channels of the decoded tensors


class DataError(ValueError):
    """A shard or manifest is missing, corrupted or inconsistent; the message is one line naming it."""


# ------------------------------------------------------------------------------------------- shards on disk
def read_manifest(shards_dir: str | os.PathLike) -> dict[str, Any]:
    if not _is_local(str(shards_dir)):
        return RemoteShards(str(shards_dir)).manifest()
    path = Path(shards_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: manifest not found (shard the data first)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    return check_format(manifest, str(path))


def check_format(manifest: Any, where: str) -> dict[str, Any]:
    """``manifest`` if it describes shards of :data:`SHARD_FORMAT`; a DataError asking for a re-shard otherwise."""
    if not isinstance(manifest, dict):
        raise DataError(f"{where}: not a shard manifest (a JSON object)")
    found = manifest.get("format")
    if found != SHARD_FORMAT:
        what = "an older format (no format key)" if found is None else f"format {found!r}"
        raise DataError(
            f"{where}: shards of {what}, this loader reads {SHARD_FORMAT}; re-run the shard stage (dvc repro shard)"
        )
    return manifest


def _split_entry(manifest: Mapping[str, Any], split: str, where: str) -> Mapping[str, Any]:
    splits = manifest.get("splits") or {}
    if split not in splits:
        raise DataError(f"{where}: no {split!r} split (has: {', '.join(splits) or 'none'})")
    return splits[split]


def shard_urls(shards_dir: str | os.PathLike, split: str) -> list[str]:
    """Paths of a split's shards, in manifest order (or ``{split}-*.tar`` sorted when there is no manifest).

    ``shards_dir`` may be a base URL (see :class:`RemoteShards`): the URLs of the shards its manifest lists.
    """
    if not _is_local(str(shards_dir)):
        remote = RemoteShards(str(shards_dir))
        entry = _split_entry(remote.manifest(), split, remote.url(MANIFEST))
        return [remote.url(s["name"]) for s in entry["shards"]] or _no_shards(shards_dir, split)
    shards_dir = Path(shards_dir)
    if (shards_dir / MANIFEST).is_file():
        entry = _split_entry(read_manifest(shards_dir), split, str(shards_dir / MANIFEST))
        urls = [str(shards_dir / s["name"]) for s in entry["shards"]]
    else:
        urls = [str(p) for p in sorted(shards_dir.glob(f"{split}-*.tar"))]
    return urls or _no_shards(shards_dir, split)


def _no_shards(shards_dir: Any, split: str) -> list[str]:
    raise DataError(f"{shards_dir}: no {split!r} shards")


_VERIFIED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256 already checked


def _verify_file(path: Path, expected: Mapping[str, Any]) -> None:
    if not path.is_file():
        raise DataError(f"{path}: shard missing")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if _VERIFIED.get(key) == expected["sha256"]:
        return
    if "bytes" in expected and stat.st_size != expected["bytes"]:
        raise DataError(
            f"{path}: shard truncated or modified ({stat.st_size} bytes, manifest says "
            f"{expected['bytes']}); rebuild the shards"
        )
    actual = sha256_file(path)
    if actual != expected["sha256"]:
        raise DataError(
            f"{path}: shard corrupted (sha256 {actual[:12]}... != manifest {expected['sha256'][:12]}...); "
            f"rebuild the shards"
        )
    _VERIFIED[key] = actual


def verify_shards(shards_dir: str | os.PathLike, splits: Sequence[str] | None = None) -> dict[str, Any]:
    """Check every shard listed in the manifest (sha256 and size); returns the manifest."""
    shards_dir = Path(shards_dir)
    manifest = read_manifest(shards_dir)
    for split, entry in (manifest.get("splits") or {}).items():
        if splits is None or split in splits:
            for shard in entry["shards"]:
                _verify_file(shards_dir / shard["name"], shard)
    return manifest


def _is_local(url: str) -> bool:
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def _local_path(url: str) -> Path:
    return Path(urlparse(url).path if url.startswith("file:") else url)


# ---------------------------------------------------------------------------------------- remote shards
class RemoteShards:
    """Shards and their manifest under a base URL: ``http(s)://`` (urllib), any fsspec protocol (``s3://``,
    ``gs://``, ... when fsspec and its driver are installed). Single shard URLs may also be WebDataset's
    ``pipe:COMMAND`` (the command's stdout is the shard), given with a manifest."""

    def __init__(self, base: str):
        self.base = base.rstrip("/")

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def manifest(self) -> dict[str, Any]:
        url = self.url(MANIFEST)
        with open_url(url) as fh:
            data = fh.read()
        try:
            manifest = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{url}: not valid JSON ({exc})") from None
        return check_format(manifest, url)


def open_url(url: str):
    """A binary stream reading ``url``; DataError naming it when it cannot be opened."""
    scheme = urlparse(url).scheme
    try:
        if scheme in ("http", "https"):
            import urllib.request

            return urllib.request.urlopen(url, timeout=60)  # noqa: S310 - scheme checked above
        if scheme == "pipe":
            return wds.gopen(url)
        try:
            import fsspec
        except ImportError:
            raise DataError(
                f"{url}: reading {scheme}:// needs fsspec (pip install fsspec and its {scheme} "
                f"driver, e.g. s3fs or gcsfs)"
            ) from None
        return fsspec.open(url, "rb").open()
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - urllib, fsspec drivers and pipes raise many types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{url}: cannot read ({reason})") from None


def fetch_verified(url: str, expected: Mapping[str, Any] | None):
    """The shard at ``url`` in a temporary file (memory up to 64 MiB), hashed as it streams in and compared with
    its manifest entry before any sample is read from it: a modified shard is named and never used."""
    import tempfile

    if expected is None:
        raise DataError(f"{url}: remote shard not listed in the manifest")
    digest = hashlib.sha256()
    size = 0
    out = tempfile.SpooledTemporaryFile(max_size=64 << 20)
    with open_url(url) as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
            size += len(block)
            out.write(block)
    actual = digest.hexdigest()
    if ("bytes" in expected and size != expected["bytes"]) or actual != expected["sha256"]:
        out.close()
        raise DataError(
            f"{url}: remote shard modified ({size} bytes, sha256 {actual[:12]}...; manifest says "
            f"{expected.get('bytes', '?')} bytes, {expected['sha256'][:12]}...); not used"
        )
    out.seek(0)
    return out


def _manifest_entries(urls: Sequence[str], manifest: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    by_name = {
        shard["name"]: shard for entry in ((manifest or {}).get("splits") or {}).values() for shard in entry["shards"]
    }
    return {
        u: by_name[os.path.basename(urlparse(u).path)] for u in urls if os.path.basename(urlparse(u).path) in by_name
    }


# ---------------------------------------------------------------------------------------------- decoding
def decode_image_bytes(data: bytes, channels: int | None = None) -> Tensor:
    """PNG/JPEG bytes -> uint8 tensor C x H x W (``channels`` 1 or 3 converts, None keeps the file's).

    torchvision's libpng/libjpeg-turbo decoders are 2-4x faster than Pillow on small images; Pillow takes over
    where torchvision lacks them (its image codecs are deprecated since 0.29 in favour of TorchCodec).
    RuntimeError when the bytes are not a decodable image.
    """
    if _TORCHVISION_DECODE is not None:
        mode = {None: ImageReadMode.UNCHANGED, 1: ImageReadMode.GRAY, 3: ImageReadMode.RGB}[channels]
        return _TORCHVISION_DECODE(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
    try:
        img = Image.open(io.BytesIO(data))
        if channels is not None and img.mode != ("L" if channels == 1 else "RGB"):
            img = img.convert("L" if channels == 1 else "RGB")
        arr = np.array(img)
    except (OSError, ValueError, SyntaxError) as exc:
        raise RuntimeError(str(exc)) from None
    tensor = torch.from_numpy(arr)
    return tensor.unsqueeze(0) if arr.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


def _image_entry(sample: Mapping[str, Any]) -> bytes:
    for key in IMAGE_KEYS:
        if key in sample:
            return sample[key]
    raise DataError(f"{sample.get('__url__')}: sample {sample.get('__key__')!r} has no png/jpg image")


def _label(sample: Mapping[str, Any]) -> int:
    """The class index from the sample's one metadata member (``json``: ``{"cls": int, ...}``)."""
    try:
        meta = json.loads(sample["json"])
        return int(meta["cls"])
    except (KeyError, TypeError, ValueError, UnicodeDecodeError):
        raise DataError(
            f"{sample.get('__url__')}: sample {sample.get('__key__')!r} has no json member with a "
            f'"cls" label (shards of an older format?); re-run the shard stage (dvc repro shard)'
        ) from None


def resize_and_crop(image: Tensor, size: int) -> Tensor:
    """uint8 C x H x W -> C x size x size: the shorter side scaled to ``size`` (antialiased), then centre-cropped."""
    if tuple(image.shape[-2:]) == (size, size):
        return image
    from torchvision.transforms.v2 import functional as tvf

    return tvf.center_crop(tvf.resize(image, size, antialias=True), [size, size])


def _size_text(hw: Sequence[int]) -> str:
    return f"{hw[-2]}x{hw[-1]}"


def mixed_sizes_error(split: str, sizes: Sequence[Sequence[int]], where: str) -> DataError:
    a, b = sizes[0], next(s for s in sizes if tuple(s[-2:]) != tuple(sizes[0][-2:]))
    return DataError(
        f"{where}: split {split!r} mixes image sizes ({_size_text(a)} and {_size_text(b)} H x W); "
        f"batching needs one: shard with one image size (shard.image_size) or resize in the loader "
        f"(resize=N; params: pretrain.loader_image_size)"
    )


def _stack(images: Sequence[Tensor], split: str, where: str) -> Tensor:
    first = images[0].shape
    if any(im.shape != first for im in images):
        raise mixed_sizes_error(split, [tuple(im.shape) for im in images], where)
    return torch.stack(list(images))


# -------------------------------------------------------------------------------------------- the loader
def _derive_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


class _Unit:
    """One reader's share of a shard: samples ``part, part + parts, ...`` of ``url``."""

    __slots__ = ("url", "count", "part", "parts")

    def __init__(self, url: str, count: int, part: int, parts: int):
        self.url, self.count, self.part, self.parts = url, count, part, parts

    @property
    def size(self) -> int:
        return len(range(self.part, self.count, self.parts))


def _plan_units(urls: Sequence[str], counts: Sequence[int], world_size: int, workers: int) -> list[_Unit]:
    readers = world_size * workers
    parts = max(1, math.ceil(readers / len(urls)))
    while (len(urls) * parts) % world_size:  # let every rank get the same number of units
        parts += 1
    return [_Unit(url, count, part, parts) for url, count in zip(urls, counts) for part in range(parts)]


def _read_units(
    units: Iterable[_Unit], expected: Mapping[str, Mapping[str, Any]] | None = None
) -> Iterator[dict[str, Any]]:
    """Samples of each unit; a remote shard is fetched and checked against ``expected[url]`` before any is read."""
    for unit in units:
        try:
            if _is_local(unit.url):
                samples = wds.tarfile_samples([{"url": unit.url}])
            else:
                stream = fetch_verified(unit.url, (expected or {}).get(unit.url))
                samples = wds.tariterators.group_by_keys(
                    wds.tariterators.tar_file_expander([{"url": unit.url, "stream": stream}])
                )
            for index, sample in enumerate(samples):
                if index % unit.parts == unit.part:
                    yield sample
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
            if isinstance(exc, DataError):
                raise
            raise DataError(
                f"{unit.url}: unreadable shard ({str(exc).splitlines()[0] if str(exc) else exc!r}); rebuild the shards"
            ) from None


class _WorkerStream(torch.utils.data.IterableDataset):
    """What one DataLoader worker (or the main process) yields: decoded uint8 samples, batched."""

    def __init__(self, loader: ShardLoader):
        super().__init__()
        self.loader = loader

    def __iter__(self) -> Iterator[tuple]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        ld = self.loader
        mine = [
            u
            for j, u in enumerate(ld.epoch_units())
            if j % ld.world_size == ld.rank and (j // ld.world_size) % ld.workers == worker
        ]
        # (a bare list would be spliced into the stages)
        stages: list[Any] = [lambda: iter(mine), lambda units: _read_units(units, ld.expected)]
        if ld.shuffle_buffer > 1:
            rng = random.Random(_derive_seed("samples", ld.seed, ld.epoch, ld.rank, worker))
            stages.append(wds.shuffle(ld.shuffle_buffer, min(ld.shuffle_buffer, 100), rng=rng))
        stages.append(wds.map(ld.prepare))
        stages.append(wds.batched(ld.batch_size, collation_fn=ld.collate, partial=True))
        return iter(wds.DataPipeline(*stages))


class ShardLoader:
    """The iterable :func:`make_loader` returns; ``len()`` is the number of batches this rank yields per epoch."""

    def __init__(
        self,
        urls: Sequence[str],
        counts: Sequence[int],
        *,
        batch_size: int,
        shuffle_buffer: int,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        num_workers: int,
        drop_last: bool,
        channels: int | None,
        return_keys: bool,
        pin_memory: bool,
        resize: int | None = None,
        split: str = "?",
        expected: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize < 1):
            raise ValueError(f"resize must be a positive int or None (got {resize!r})")
        self.urls, self.counts = list(urls), list(counts)
        self.batch_size, self.resize, self.split = batch_size, resize, split
        self.shuffle_buffer, self.seed, self.epoch = shuffle_buffer, seed, epoch
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.workers = num_workers, max(1, num_workers)
        self.drop_last, self.channels, self.return_keys, self.pin_memory = drop_last, channels, return_keys, pin_memory
        self.expected = dict(expected or {})  # remote url -> manifest entry, checked as each shard streams in
        self.units = _plan_units(self.urls, self.counts, world_size, self.workers)
        # The fewest samples any rank can receive, whatever the epoch's shuffle: the floor(units/world) smallest.
        per_rank = len(self.units) // world_size
        self.min_rank_samples = sum(sorted(u.size for u in self.units)[:per_rank])

    # -- epoch plan
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_units(self) -> list[_Unit]:
        units = list(self.units)
        if self.shuffle_buffer > 1:
            random.Random(_derive_seed("units", self.seed, self.epoch)).shuffle(units)
        return units

    def rank_samples(self) -> int:
        """Samples this rank reads this epoch (all of them are yielded when drop_last=False)."""
        return sum(u.size for j, u in enumerate(self.epoch_units()) if j % self.world_size == self.rank)

    def __len__(self) -> int:
        if self.drop_last:
            return self.min_rank_samples // self.batch_size
        return math.ceil(self.rank_samples() / self.batch_size)

    # -- per sample / per batch (run in the workers)
    def prepare(self, sample: Mapping[str, Any]) -> tuple:
        try:
            image = decode_image_bytes(_image_entry(sample), self.channels)
        except RuntimeError as exc:
            raise DataError(
                f"{sample.get('__url__')}: sample {sample.get('__key__')!r}: undecodable image ({exc})"
            ) from None
        if self.resize is not None:
            image = resize_and_crop(image, self.resize)
        return image, _label(sample), sample["__key__"]

    def collate(self, samples: list[tuple]) -> tuple:
        images = _stack([s[0] for s in samples], self.split, str(self.urls[0]))
        return images, torch.tensor([s[1] for s in samples], dtype=torch.long), [s[2] for s in samples]

    # -- main process
    def _worker_batches(self) -> Iterator[tuple]:
        stream = _WorkerStream(self)
        if self.num_workers == 0:
            # Decoding small images runs single-threaded, as DataLoader workers do: torch's intra-op threads
            # only add barrier waits there, and on a busy machine each costs a time slice.
            batches = iter(stream)
            while True:
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                finally:
                    torch.set_num_threads(threads)
                yield batch
        # Worker seeds follow from (seed, epoch, rank), not the global RNG (the workers draw nothing random
        # today; this keeps it so should a decoder ever do).
        generator = torch.Generator().manual_seed(_derive_seed("workers", self.seed, self.epoch, self.rank))
        try:
            yield from torch.utils.data.DataLoader(
                stream,
                batch_size=None,
                num_workers=self.num_workers,
                generator=generator,
                pin_memory=self.pin_memory,
                prefetch_factor=4,
            )
        except DataError as exc:  # re-raised from a worker with its traceback in the message: keep the one line
            raise DataError(str(exc).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None

    def __iter__(self) -> Iterator[tuple]:
        limit = len(self) if self.drop_last else None
        produced = 0
        pending: list[tuple] = []
        pending_size = 0
        bs = self.batch_size

        def emit(batch: tuple) -> tuple:
            images = batch[0]
            if self.pin_memory and not images.is_pinned():  # merged batches are new tensors
                images = images.pin_memory()
            return (images, batch[1], batch[2]) if self.return_keys else (images, batch[1])

        if limit == 0:
            return
        for batch in self._worker_batches():
            n = len(batch[1])
            if n == bs and not pending:
                produced += 1
                yield emit(batch)
            else:
                pending.append(batch)
                pending_size += n
                while pending_size >= bs and produced != limit:
                    merged = self._concat(pending)
                    head, tail = _take(merged, bs), _drop(merged, bs)
                    pending, pending_size = ([tail] if len(tail[1]) else []), len(tail[1])
                    produced += 1
                    yield emit(head)
            if produced == limit:
                return  # leaving the DataLoader iterator shuts its workers down
        if limit is None and pending_size:
            produced += 1
            yield emit(self._concat(pending))
        if limit is not None and produced < limit:
            raise DataError(
                f"rank {self.rank} got {produced} of {limit} batches: the shards hold fewer samples "
                f"than their manifest counts"
            )

    def _concat(self, batches: list[tuple]) -> tuple:
        if len(batches) == 1:
            return batches[0]
        images = [b[0] for b in batches]
        if any(im.shape[1:] != images[0].shape[1:] for im in images):  # two workers' batches of other sizes
            raise mixed_sizes_error(self.split, [tuple(im.shape[1:]) for im in images], str(self.urls[0]))
        return torch.cat(images), torch.cat([b[1] for b in batches]), [k for b in batches for k in b[2]]


def _take(batch: tuple, n: int) -> tuple:
    return batch[0][:n], batch[1][:n], batch[2][:n]


def _drop(batch: tuple, n: int) -> tuple:
    return batch[0][n:], batch[1][n:], batch[2][n:]


def _shard_counts(urls: Sequence[str], manifest: Mapping[str, Any] | None, verify: bool) -> list[int]:
    """Samples per shard, from the manifest (verifying local shards against it) or by reading tar headers."""
    by_name: dict[str, Mapping[str, Any]] = {}
    if manifest is not None:
        for entry in (manifest.get("splits") or {}).values():
            for shard in entry["shards"]:
                by_name[shard["name"]] = shard
    counts = []
    for url in urls:
        name = os.path.basename(urlparse(url).path if not _is_local(url) else url)
        if name in by_name:
            if verify and _is_local(url):
                _verify_file(_local_path(url), by_name[name])
            counts.append(int(by_name[name]["count"]))
        elif manifest is not None:
            raise DataError(f"{url}: shard not listed in the manifest")
        elif _is_local(url):
            counts.append(_count_local(_local_path(url)))
        else:
            raise DataError(f"{url}: remote shard without a manifest (pass manifest= so sample counts are known)")
    return counts


def _count_local(path: Path) -> int:
    try:
        with tarfile.open(path) as tf:
            return len({m.name.split("/")[-1].split(".", 1)[0] for m in tf.getmembers() if m.isfile()})
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"{path}: unreadable shard ({exc})") from None


def _split_of(urls: Sequence[str], manifest: Mapping[str, Any] | None) -> tuple[str, Mapping[str, Any] | None]:
    """(the split the shards belong to, its manifest entry): by the manifest, else by the ``{split}-`` prefix."""
    names = {os.path.basename(urlparse(u).path if not _is_local(u) else u) for u in urls}
    for split, entry in ((manifest or {}).get("splits") or {}).items():
        if names & {s["name"] for s in entry.get("shards", [])}:
            return split, entry
    return os.path.basename(urlparse(urls[0]).path).split("-", 1)[0], None


def make_loader(
    urls: str | Sequence[str],
    *,
    batch_size: int,
    shuffle_buffer: int = 2000,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    manifest: Mapping[str, Any] | str | os.PathLike | None = None,
    drop_last: bool = True,
    return_keys: bool = False,
    pin_memory: bool = False,
    resize: int | None = None,
    verify: bool = True,
) -> ShardLoader:
    """Iterable of ``(images, labels)`` uint8 batches over WebDataset shards (see the module docstring).

    ``urls``: shard paths or URLs (a list, or a brace pattern such as ``train-{000000..000003}.tar``).
    ``manifest``: the shards' manifest (dict or path); by default the ``manifest.json`` beside local shards.
    It gives the sample counts, the image sizes and the checksums verified before use (``verify``).
    ``shuffle_buffer`` 0 or 1: no shuffling at all (units in order, samples in shard order). ``return_keys``:
    batches are ``(images, labels, keys)``. Images are decoded to the manifest's ``image_mode`` channels, as
    uint8 B x C x H x W; ``resize=N``: each image's shorter side scaled to N and centre-cropped to N x N (needed
    when a split mixes sizes). ``pin_memory``: batches in pinned memory (for a CUDA consumer).
    """
    urls = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else list(urls)
    if not urls:
        raise DataError("no shards given")
    where = urls[0]
    if manifest is None and _is_local(urls[0]):
        beside = _local_path(urls[0]).parent / MANIFEST
        manifest = read_manifest(beside.parent) if beside.is_file() else None
        where = str(beside)
    elif manifest is None and urlparse(urls[0]).scheme != "pipe":
        manifest = read_manifest(urls[0].rsplit("/", 1)[0])
    elif isinstance(manifest, str) and not _is_local(manifest):
        manifest = read_manifest(manifest[: -len(MANIFEST)].rstrip("/") if manifest.endswith(MANIFEST) else manifest)
    elif isinstance(manifest, (str, os.PathLike)):
        path = Path(manifest)
        manifest = read_manifest(path.parent if path.name == MANIFEST else path)
        where = str(path if path.name == MANIFEST else path / MANIFEST)
    elif manifest is not None:
        check_format(manifest, "manifest")
    counts = _shard_counts(urls, manifest, verify)
    split, entry = _split_of(urls, manifest)
    sizes = (entry or {}).get("image_sizes") or []
    if resize is None and len({tuple(hw) for hw in sizes}) > 1:
        raise mixed_sizes_error(split, sizes, where)
    mode = (manifest or {}).get("image_mode")
    channels = MODE_CHANNELS.get(mode) if mode else None
    loader = ShardLoader(
        urls,
        counts,
        batch_size=batch_size,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        drop_last=drop_last,
        channels=channels,
        return_keys=return_keys,
        pin_memory=pin_memory,
        resize=resize,
        split=split,
        expected=_manifest_entries([u for u in urls if not _is_local(u)], manifest),
    )
    if drop_last and len(loader) == 0:
        raise DataError(
            f"{urls[0]}{' ...' if len(urls) > 1 else ''}: a rank is only sure to get "
            f"{loader.min_rank_samples} samples, fewer than batch_size {batch_size} (world_size "
            f"{world_size}): lower the batch size"
        )
    return loader


# ---------------------------------------------------------------------------------------- whole splits
def load_split(
    shards_dir: str | os.PathLike,
    split: str,
    *,
    labelled_only: bool = True,
    verify: bool = True,
    resize: int | None = None,
) -> tuple[Tensor, Tensor, list[str]]:
    """A whole split in memory: (uint8 N x C x H x W, labels, class names), in shard order.

    For evaluation and baselines on small datasets. Unlabelled samples (label -1) are left out unless
    ``labelled_only`` is False. Every image must have the same size, or ``resize=N`` makes them N x N (as
    :func:`make_loader` does).
    """
    shards_dir = Path(shards_dir)
    manifest = read_manifest(shards_dir)
    where = str(shards_dir / MANIFEST)
    entry = _split_entry(manifest, split, where)
    sizes = entry.get("image_sizes") or []
    if resize is None and len({tuple(hw) for hw in sizes}) > 1:
        raise mixed_sizes_error(split, sizes, where)
    channels = MODE_CHANNELS.get(manifest.get("image_mode"))
    images: list[Tensor] = []
    labels: list[int] = []
    for shard in entry["shards"]:
        path = shards_dir / shard["name"]
        if verify:
            _verify_file(path, shard)
        for sample in _read_units([_Unit(str(path), int(shard["count"]), 0, 1)]):
            label = _label(sample)
            if labelled_only and label < 0:
                continue
            image = decode_image_bytes(_image_entry(sample), channels)
            images.append(resize_and_crop(image, resize) if resize is not None else image)
            labels.append(label)
    if not images:
        raise DataError(f"{where}: split {split!r} has no {'labelled ' if labelled_only else ''}images")
    return _stack(images, split, where), torch.tensor(labels, dtype=torch.long), list(manifest.get("classes") or [])


__all__ = [
    "DataError",
    "MANIFEST",
    "SHARD_FORMAT",
    "RemoteShards",
    "ShardLoader",
    "check_format",
    "decode_image_bytes",
    "fetch_verified",
    "load_split",
    "make_loader",
    "open_url",
    "read_manifest",
    "resize_and_crop",
    "shard_urls",
    "verify_shards",
]
