"""The data paths the benchmarks compare, each reading the same WebDataset shards.

* **batched** (the project's training path): ``ssl_models.data.make_loader`` decodes only (workers collate uint8
  batches B x C x H x W), and ``ssl_models.augment.build_views`` makes every view of the batch at once, on the
  batch's device, with the parameters drawn from ``view_generator(seed, epoch, step, rank)``;
* **per-sample** (the baseline): ``bench.persample`` views made image by image in torch DataLoader workers;
* **lightly**: lightly's own transforms (PIL in, list of view tensors out) in torch DataLoader workers.

The project side is behind :func:`batched`, :func:`view_maker`, :func:`view_generator` and
:func:`decode_loader`: where the batched modules are not there (``ssl_models.augment`` without
``view_generator``, a ``make_loader`` that still takes ``transform``), they fall back to today's loader and the
per-sample views applied to the batch, and every result records ``"batched": false`` (its figures are then the
per-sample path's, run in the training process).
"""

from __future__ import annotations

import inspect
import io
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


# --------------------------------------------------------------------------------------------- project side
def batched_views() -> bool:
    """Whether ``ssl_models.augment`` makes views per batch (it has the seeding rule ``view_generator``)."""
    from ssl_models import augment

    return hasattr(augment, "view_generator")


def decode_only_loader() -> bool:
    """Whether ``ssl_models.data.make_loader`` decodes only (it no longer takes ``transform``)."""
    from ssl_models import data

    return "transform" not in inspect.signature(data.make_loader).parameters


def batched() -> bool:
    """Whether the tree has the whole batched data path (decode-only loader + views per batch)."""
    return batched_views() and decode_only_loader()


def view_generator(seed: int, epoch: int, step: int, rank: int = 0) -> torch.Generator:
    from ssl_models import augment

    if hasattr(augment, "view_generator"):
        return augment.view_generator(seed, epoch, step, rank)
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + step) * 101 + rank)


class _PerSampleOnBatch:
    """The fallback ViewMaker: per-sample views of each image of a batch (global RNG seeded from the generator)."""

    def __init__(self, views: Callable[[Tensor], list[Tensor]]) -> None:
        self.views = views
        self.num_views, self.sizes, self.out_channels = views.num_views, views.sizes, views.out_channels
        self.config = views.config

    def __call__(self, images: Tensor, generator: torch.Generator) -> list[Tensor]:
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        per_image = [self.views(img) for img in images.cpu()]
        return [torch.stack([v[k] for v in per_image]).to(images.device) for k in range(self.num_views)]


def view_maker(recipe: str, *, image_size: int, channels: int, grey: str = "skip", **strengths: Any):
    """``maker(images uint8 B x C x H x W, generator) -> list of float view batches`` for a recipe."""
    if batched_views():
        from ssl_models.augment import build_views

        return build_views(recipe, image_size=image_size, channels=channels, grey=grey, **strengths)
    from bench.persample import build_views

    return _PerSampleOnBatch(build_views(recipe, image_size=image_size, channels=channels, grey=grey, **strengths))


def decode_loader(
    urls: list[str],
    *,
    batch_size: int,
    num_workers: int,
    seed: int = 0,
    epoch: int = 0,
    shuffle_buffer: int = 1000,
    pin_memory: bool = False,
) -> Iterable[tuple[Tensor, Tensor]]:
    """The project's loader without views: batches of (uint8 images B x C x H x W, labels)."""
    from ssl_models.data import make_loader

    kw = dict(
        batch_size=batch_size,
        num_workers=num_workers,
        seed=seed,
        epoch=epoch,
        shuffle_buffer=shuffle_buffer,
        pin_memory=pin_memory,
    )
    if decode_only_loader():
        return make_loader(urls, **kw)
    return _FirstView(make_loader(urls, transform=None, **kw))


class _FirstView:
    """Today's loader without a transform yields ([images], labels): unwrap the one 'view'."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for views, labels, *_ in self.loader:
            yield views[0], labels


# --------------------------------------------------------------------------------------------- per-sample sides
class _Sample:
    """One shard sample -> (views, label) by a per-image view function, on a uint8 tensor or a PIL image."""

    def __init__(self, views: Callable, pil: bool, mode: str) -> None:
        self.views, self.pil, self.mode = views, pil, mode

    def __call__(self, sample: dict[str, Any]) -> tuple[list[Tensor], int]:
        from PIL import Image
        from torchvision.transforms.v2.functional import pil_to_tensor

        data = next(sample[k] for k in ("png", "jpg", "jpeg") if k in sample)
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert(self.mode)
            image = img if self.pil else pil_to_tensor(img)
            views = self.views(image)
        if "cls" in sample:
            label = int(sample["cls"])
        else:
            import json

            label = int(json.loads(sample["json"]).get("cls", -1))
        return views, label


def _collate(samples: list[tuple[list[Tensor], int]]) -> tuple[list[Tensor], Tensor]:
    views = [torch.stack([s[0][k] for s in samples]) for k in range(len(samples[0][0]))]
    return views, torch.tensor([s[1] for s in samples], dtype=torch.long)


def sample_loader(
    urls: list[str],
    views: Callable,
    *,
    pil: bool,
    mode: str,
    batch_size: int,
    num_workers: int,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """A torch DataLoader over the shards, ``views`` per image in its workers (shuffle buffer as the project's)."""
    import webdataset as wds

    ds = (
        wds.WebDataset(
            urls, shardshuffle=False, workersplitter=wds.split_by_worker, nodesplitter=None, empty_check=False
        )
        .shuffle(shuffle_buffer, rng=__import__("random").Random(seed))
        .map(_Sample(views, pil, mode))
    )
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        drop_last=True,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def lightly_views(method: str, *, image_size: int, channels: int, strengths: dict[str, Any] | None = None):
    """lightly's own transform for a method, at the workload's size, with the view counts of the project's recipe.

    ``strengths`` (the SimCLR recipe only): the project's recipe strengths mapped onto SimCLRTransform's arguments
    (crop scale, jitter, grayscale, blur, flip, rotation for the affine degrees; lightly has no translation).
    """
    from lightly import transforms as T

    grey = channels == 1
    norm = {"mean": [0.449], "std": [0.226]} if grey else None
    norm_kw = {"normalize": norm} if norm else {}
    if method == "simclr" and strengths is not None:
        s = strengths
        jitter = s.get("jitter_strength")
        b = s.get("brightness", 0.8 * jitter if jitter is not None else 0.4)
        c = s.get("contrast", 0.8 * jitter if jitter is not None else 0.4)
        sat = 0.0 if grey else s.get("saturation", 0.8 * jitter if jitter is not None else 0.4)
        hue = 0.0 if grey else s.get("hue", 0.2 * jitter if jitter is not None else 0.1)
        degrees = float(s.get("affine_degrees", 0.0))
        return T.SimCLRTransform(
            input_size=image_size,
            cj_prob=s.get("jitter_prob", 0.8),
            cj_strength=1.0,
            cj_bright=b,
            cj_contrast=c,
            cj_sat=sat,
            cj_hue=hue,
            min_scale=s.get("crop_scale", (0.08, 1.0))[0],
            random_gray_scale=0.0 if grey else s.get("grayscale_prob", 0.2),
            gaussian_blur=s.get("blur_prob", 0.5),
            sigmas=tuple(s.get("blur_sigma", (0.1, 2.0))),
            hf_prob=s.get("flip_prob", 0.5),
            vf_prob=0.0,
            rr_prob=1.0 if degrees else 0.0,
            rr_degrees=degrees or None,
            **norm_kw,
        )
    local = max(2, round(image_size * 96 / 224))
    if method in ("simclr", "nnclr"):
        return T.SimCLRTransform(input_size=image_size, **norm_kw)
    if method == "simsiam":
        return T.SimSiamTransform(input_size=image_size, **norm_kw)
    if method == "moco":
        return T.MoCoV2Transform(input_size=image_size, **norm_kw)
    if method == "vicreg":
        return T.VICRegTransform(input_size=image_size, **norm_kw)
    if method in ("byol", "barlowtwins"):
        return T.BYOLTransform(
            view_1_transform=T.BYOLView1Transform(input_size=image_size, **norm_kw),
            view_2_transform=T.BYOLView2Transform(input_size=image_size, **norm_kw),
        )
    if method == "dino":
        return T.DINOTransform(global_crop_size=image_size, local_crop_size=local, n_local_views=6, **norm_kw)
    if method == "swav":
        return T.SwaVTransform(crop_sizes=(image_size, local), crop_counts=(2, 6), **norm_kw)
    if method == "mae":
        return _OneView(T.MAETransform(input_size=image_size, min_scale=0.2, **norm_kw))
    raise ValueError(f"lightly has no transform for {method!r}")


class _OneView:
    """MAETransform returns [view]; keep the list shape every side uses."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, img):
        out = self.transform(img)
        return out if isinstance(out, list) else [out]


# --------------------------------------------------------------------------------------------- shards
def make_shards(wl, root: Path, *, test_images: int = 100) -> Path:
    """Shards of a workload's train images (and a few test images) by the project's own ingest + shard stages.

    The images are written as PNG into a folder, ingested as a ``folder`` source and sharded (PNG, the size
    kept), in a workspace under ``root``; returns its ``data/shards``.
    """
    from PIL import Image

    from bench.bench_data import workspace
    from stages.shard import shard
    from stages.workspace.ingest import ingest

    mode = "L" if wl.channels == 1 else "RGB"
    folder = root / "images"
    for split, images, labels in (
        ("train", wl.train_images, wl.train_labels),
        ("test", wl.test_images[:test_images], wl.test_labels[:test_images]),
    ):
        for i, (img, label) in enumerate(zip(images, labels)):
            d = folder / split / wl.classes[int(label)]
            d.mkdir(parents=True, exist_ok=True)
            array = img.permute(1, 2, 0).numpy()
            Image.fromarray(array[..., 0] if mode == "L" else array, mode).save(d / f"{i:06d}.png")
    ws = workspace(root / "ws", **{"data.image_mode": mode, "shard.image_format": "png"})
    ingest("folder", folder, run_dvc=False, root=ws)
    shard(ws)
    return ws / "data" / "shards"


def train_urls(shards: Path) -> list[str]:
    from ssl_models.data import shard_urls

    return shard_urls(shards, "train")


class Viewed:
    """A decode-only loader with the views made per batch in this process (as the engine does): (views, labels)."""

    def __init__(self, loader, maker, *, seed: int = 0, epoch: int = 0) -> None:
        self.loader, self.maker, self.seed, self.epoch = loader, maker, seed, epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[list[Tensor], Tensor]]:
        for step, (images, labels, *_) in enumerate(self.loader):
            yield self.maker(images, view_generator(self.seed, self.epoch, step)), labels
