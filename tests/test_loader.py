"""The WebDataset loader: exact coverage across ranks and workers, equal batches, determinism, shard checks."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from support.data_utils import light_workspace, pixels, read_shards
from ssl_models import data as shard_data
from stages.ingest import ingest
from stages.shard import shard

# torchvision 0.29 (pinned) warns that its image codecs will move to TorchCodec; the loader copes without them
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


@pytest.fixture(scope="module")
def shards(tmp_path_factory, cifar_small) -> Path:
    """300 train images in 5 shards (64 each, the last 44), 100 test images in 2 shards (64 + 36)."""
    ws = light_workspace(tmp_path_factory.mktemp("loader") / "ws", data__image_mode="RGB", shard__shard_size=64)
    ingest("folder", cifar_small, run_dvc=False, root=ws)
    shard(ws)
    return ws / "data" / "shards"


@pytest.fixture(scope="module")
def source(shards) -> dict[str, tuple[np.ndarray, int]]:
    """key -> (pixels of the original raw file, label), the reference every loaded sample is compared with."""
    raw = shards.parent / "raw"
    classes = json.loads((shards / "manifest.json").read_text())["classes"]
    out = {}
    for split in ("train", "test"):
        for s in read_shards(shards, split):
            meta = json.loads(s["json"])
            out[s["__key__"].decode()] = (pixels((raw / meta["path"]).read_bytes(), "RGB"),
                                          classes.index(meta["class"]))
    return out


@pytest.mark.parametrize("split", ["train", "test"])  # test: 2 shards for 4 readers (more workers than shards)
def test_every_sample_exactly_once_across_2_ranks_x_2_workers(shards, source, split):
    keys: list[str] = []
    for rank in range(2):
        loader = shard_data.make_loader(shard_data.shard_urls(shards, split), batch_size=32, transform=None,
                                        rank=rank, world_size=2, num_workers=2, drop_last=False, return_keys=True,
                                        seed=3, epoch=1)
        batches = list(loader)
        assert len(batches) == len(loader)
        for views, labels, batch_keys in batches:
            assert len(views) == 1 and views[0].dtype == torch.uint8 and views[0].shape[1:] == (3, 32, 32)
            for image, label, key in zip(views[0], labels.tolist(), batch_keys):
                expected_pixels, expected_label = source[key]
                assert label == expected_label
                assert np.array_equal(image.numpy(), expected_pixels), key
            keys += batch_keys
    expected = {k for k in source if k.startswith(split)}
    assert Counter(keys) == Counter(expected)  # every sample, each exactly once


def test_training_mode_gives_equal_full_batches_and_no_repeats(shards):
    urls = shard_data.shard_urls(shards, "train")
    runs = {}
    for rank in range(2):
        loader = shard_data.make_loader(urls, batch_size=32, transform=None, rank=rank, world_size=2, num_workers=2,
                                        seed=3, epoch=0, return_keys=True)
        batches = list(loader)
        runs[rank] = [k for b in batches for k in b[2]]
        # 10 units (5 shards split in 2 parts) of 32 or 22 samples, 5 per rank: at least 140 -> 4 batches of 32
        assert len(batches) == len(loader) == 4
        assert all(len(b[1]) == 32 for b in batches)
    assert not set(runs[0]) & set(runs[1]) and len(set(runs[0])) == 128

    # deterministic for (seed, epoch); another epoch is another order
    again = shard_data.make_loader(urls, batch_size=32, transform=None, rank=0, world_size=2, num_workers=2, seed=3,
                                   epoch=0, return_keys=True)
    assert [k for b in again for k in b[2]] == runs[0]
    again.set_epoch(1)
    assert [k for b in again for k in b[2]] != runs[0]
    single = shard_data.make_loader(urls, batch_size=32, transform=None, seed=3, num_workers=0, return_keys=True)
    assert len(single) == 9 and len({k for b in single for k in b[2]}) == 288
    with pytest.raises(shard_data.DataError, match="fewer than batch_size 400"):
        shard_data.make_loader(urls, batch_size=400, transform=None)


def test_views_come_from_the_per_sample_transform(shards):
    from torchvision.transforms import v2

    first = v2.Compose([v2.RandomResizedCrop(24, antialias=True), v2.ToDtype(torch.float32, scale=True)])
    second = v2.Compose([v2.Resize(16, antialias=True), v2.ToDtype(torch.float32, scale=True)])
    loader = shard_data.make_loader(shard_data.shard_urls(shards, "test"), batch_size=10, num_workers=0,
                                    transform=lambda img: [first(img), second(img)])
    views, labels = next(iter(loader))
    assert views[0].shape == (10, 3, 24, 24) and views[1].shape == (10, 3, 16, 16)
    assert views[0].dtype == torch.float32 and 0 <= float(views[0].min()) and float(views[0].max()) <= 1
    assert labels.dtype == torch.long and labels.shape == (10,)


def test_load_split_returns_the_whole_split(shards, source):
    images, labels, classes = shard_data.load_split(shards, "test")
    assert images.shape == (100, 3, 32, 32) and images.dtype == torch.uint8 and len(classes) == 10
    keys = [s["__key__"].decode() for s in read_shards(shards, "test")]
    for i in (0, 37, 99):
        assert np.array_equal(images[i].numpy(), source[keys[i]][0]) and labels[i] == source[keys[i]][1]


def test_pillow_decodes_the_same_when_torchvision_has_no_codecs(shards, source, monkeypatch):
    sample = read_shards(shards, "test")[0]
    fast = shard_data.decode_image_bytes(sample["png"], 3)
    monkeypatch.setattr(shard_data, "_TORCHVISION_DECODE", None)
    slow = shard_data.decode_image_bytes(sample["png"], 3)
    assert torch.equal(fast, slow) and np.array_equal(slow.numpy(), source[sample["__key__"].decode()][0])
    assert shard_data.decode_image_bytes(sample["png"], 1).shape == (1, 32, 32)
    with pytest.raises(RuntimeError):
        shard_data.decode_image_bytes(b"not an image", 3)


def test_corrupted_or_truncated_shards_are_named(shards, tmp_path):
    broken = tmp_path / "shards"
    shutil.copytree(shards, broken)
    target = broken / "train-000002.tar"
    data = bytearray(target.read_bytes())
    data[5000] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(shard_data.DataError, match=r"train-000002\.tar: shard corrupted"):
        shard_data.verify_shards(broken)
    with pytest.raises(shard_data.DataError, match=r"train-000002\.tar"):
        shard_data.make_loader(shard_data.shard_urls(broken, "train"), batch_size=8, transform=None)
    shard_data.verify_shards(broken, splits=["test"])  # the other split is fine

    target.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(shard_data.DataError, match=r"train-000002\.tar: shard truncated"):
        shard_data.verify_shards(broken)
    # without a manifest to check against, reading the truncated shard still fails naming it
    (broken / "manifest.json").unlink()
    with pytest.raises(shard_data.DataError, match=r"train-000002\.tar"):
        loader = shard_data.make_loader([str(target)], batch_size=8, transform=None, drop_last=False)
        list(loader)
