"""The WebDataset loader: exact coverage across ranks and workers, equal batches, determinism, shard checks."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_models import data as shard_data
from stages.shard import shard
from stages.workspace.ingest import ingest
from support.data_utils import light_workspace, pixels, read_shards

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
            out[s["__key__"].decode()] = (
                pixels((raw / meta["path"]).read_bytes(), "RGB"),
                classes.index(meta["class"]),
            )
    return out


@pytest.mark.parametrize("split", ["train", "test"])  # test: 2 shards for 4 readers (more workers than shards)
def test_every_sample_exactly_once_across_2_ranks_x_2_workers(shards, source, split):
    keys: list[str] = []
    for rank in range(2):
        loader = shard_data.make_loader(
            shard_data.shard_urls(shards, split),
            batch_size=32,
            rank=rank,
            world_size=2,
            num_workers=2,
            drop_last=False,
            return_keys=True,
            seed=3,
            epoch=1,
        )
        batches = list(loader)
        assert len(batches) == len(loader)
        for images, labels, batch_keys in batches:
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32) and labels.dtype == torch.long
            assert images.shape[0] == labels.shape[0] == len(batch_keys)
            for image, label, key in zip(images, labels.tolist(), batch_keys):
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
        loader = shard_data.make_loader(
            urls, batch_size=32, rank=rank, world_size=2, num_workers=2, seed=3, epoch=0, return_keys=True
        )
        batches = list(loader)
        runs[rank] = [k for b in batches for k in b[2]]
        # 10 units (5 shards split in 2 parts) of 32 or 22 samples, 5 per rank: at least 140 -> 4 batches of 32
        assert len(batches) == len(loader) == 4
        assert all(len(b[1]) == 32 for b in batches)
    assert not set(runs[0]) & set(runs[1]) and len(set(runs[0])) == 128

    # deterministic for (seed, epoch); another epoch is another order
    again = shard_data.make_loader(
        urls, batch_size=32, rank=0, world_size=2, num_workers=2, seed=3, epoch=0, return_keys=True
    )
    assert [k for b in again for k in b[2]] == runs[0]
    again.set_epoch(1)
    assert [k for b in again for k in b[2]] != runs[0]
    single = shard_data.make_loader(urls, batch_size=32, seed=3, num_workers=0, return_keys=True)
    assert len(single) == 9 and len({k for b in single for k in b[2]}) == 288
    with pytest.raises(shard_data.DataError, match="fewer than batch_size 400"):
        shard_data.make_loader(urls, batch_size=400)


def test_batches_are_uint8_images_with_their_labels_and_resize_crops_the_centre(shards, source):
    urls = shard_data.shard_urls(shards, "test")
    images, labels = next(iter(shard_data.make_loader(urls, batch_size=10, shuffle_buffer=0)))
    assert images.shape == (10, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (10,) and labels.dtype == torch.long
    resized, _, keys = next(
        iter(shard_data.make_loader(urls, batch_size=10, shuffle_buffer=0, resize=16, return_keys=True, num_workers=1))
    )
    assert resized.shape == (10, 3, 16, 16) and resized.dtype == torch.uint8
    from torchvision.transforms.v2 import functional as tvf

    original = torch.from_numpy(np.array(source[keys[0]][0]))
    assert torch.equal(resized[0], tvf.resize(original, 16, antialias=True))  # square: the crop keeps it all
    # a 20 x 40 image: shorter side to 16 (16 x 32), then the middle 16 columns
    wide = torch.arange(20 * 40, dtype=torch.int32).reshape(1, 20, 40).remainder(251).to(torch.uint8)
    out = shard_data.resize_and_crop(wide, 16)
    assert out.shape == (1, 16, 16)
    assert torch.equal(out, tvf.resize(wide, [16, 32], antialias=True)[..., 8:24])
    with pytest.raises(ValueError, match="resize"):
        shard_data.make_loader(urls, batch_size=10, resize=0)


def _rewrite_manifest(src: Path, dest: Path, edit) -> Path:
    shutil.copytree(src, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    edit(manifest)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_mixed_image_sizes_are_refused_naming_the_split_and_two_sizes(shards, tmp_path):
    def two_sizes(manifest):
        manifest["splits"]["train"]["image_sizes"] = [[28, 28], [32, 32]]

    mixed = _rewrite_manifest(shards, tmp_path / "mixed", two_sizes)
    urls = shard_data.shard_urls(mixed, "train")
    with pytest.raises(shard_data.DataError, match=r"split 'train' mixes image sizes \(28x28 and 32x32"):
        shard_data.make_loader(urls, batch_size=8)
    with pytest.raises(shard_data.DataError, match=r"split 'train' mixes image sizes"):
        shard_data.load_split(mixed, "train")
    images, _ = next(iter(shard_data.make_loader(urls, batch_size=8, resize=24)))  # resize makes them one size
    assert images.shape == (8, 3, 24, 24)
    assert shard_data.load_split(mixed, "train", resize=8)[0].shape == (300, 3, 8, 8)

    # shards without image_sizes (or not telling the truth): the batch itself is checked
    loader = shard_data.make_loader(shard_data.shard_urls(shards, "test"), batch_size=4, shuffle_buffer=0)
    decode = loader.prepare

    def odd_keys_cut_to_20_rows(sample):
        image, label, key = decode(sample)
        return (image[:, :20] if key[-1] in "13579" else image), label, key

    loader.prepare = odd_keys_cut_to_20_rows
    with pytest.raises(
        shard_data.DataError,
        match=r"split 'test' mixes image sizes \((32x32 and 20x32|20x32 and "
        r"32x32)",
    ):
        next(iter(loader))


@pytest.mark.parametrize("fmt", [None, "sslcook-shards/1"])
def test_shards_of_an_older_format_ask_for_a_re_shard(shards, tmp_path, fmt):
    def old(manifest):
        manifest.pop("format")
        if fmt is not None:
            manifest["format"] = fmt

    stale = _rewrite_manifest(shards, tmp_path / "old", old)
    message = r"manifest\.json: shards of .*re-run the shard stage \(dvc repro shard\)"
    with pytest.raises(shard_data.DataError, match=message):
        shard_data.make_loader(shard_data.shard_urls(stale, "train"), batch_size=8)
    with pytest.raises(shard_data.DataError, match=message):
        shard_data.load_split(stale, "test")
    with pytest.raises(shard_data.DataError, match=r"re-run the shard stage"):
        shard_data.make_loader(
            shard_data.shard_urls(shards, "train"),
            batch_size=8,
            manifest=json.loads((stale / "manifest.json").read_text()),
        )
    # a format-1 sample (label in a separate cls member, no cls in its json) read without a manifest
    import io
    import tarfile

    tar = tmp_path / "train-000000.tar"
    with tarfile.open(tar, "w") as tf:
        for name, data in (
            ("a.png", read_shards(shards, "test")[0]["png"]),
            ("a.cls", b"3"),
            ("a.json", b'{"path": "x", "class": "y"}'),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with pytest.raises(shard_data.DataError, match=r"'a' has no json member with a \"cls\" label.*re-run the shard"):
        list(shard_data.make_loader([str(tar)], batch_size=1, drop_last=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batches_for_a_cuda_consumer_are_pinned(shards):
    urls = shard_data.shard_urls(shards, "train")
    for workers in (0, 2):
        loader = shard_data.make_loader(urls, batch_size=32, num_workers=workers, pin_memory=True, seed=1)
        for images, _labels in loader:
            assert images.is_pinned() and images.dtype == torch.uint8
            on_gpu = images.to("cuda", non_blocking=True)
            assert torch.equal(on_gpu.cpu(), images)


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
        shard_data.make_loader(shard_data.shard_urls(broken, "train"), batch_size=8)
    shard_data.verify_shards(broken, splits=["test"])  # the other split is fine

    target.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(shard_data.DataError, match=r"train-000002\.tar: shard truncated"):
        shard_data.verify_shards(broken)
    # without a manifest to check against, reading the truncated shard still fails naming it
    (broken / "manifest.json").unlink()
    with pytest.raises(shard_data.DataError, match=r"train-000002\.tar"):
        loader = shard_data.make_loader([str(target)], batch_size=8, drop_last=False)
        list(loader)
