"""The shard stage: manifest, round trip of every image and label, determinism, atomic output, formats."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import shard as shard_mod
from stages.shard import shard
from stages.workspace.ingest import ingest, raw_dir_md5
from support import PROJECT_ROOT
from support.data_utils import light_workspace, pixels, read_shards, set_params

# torchvision 0.29 (pinned) warns that its image codecs will move to TorchCodec; the loader copes without them
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, cifar_small) -> tuple[Path, dict]:
    """cifar_small (300 train, 100 test JPEGs) ingested and sharded as RGB PNGs, 64 samples per shard."""
    ws = light_workspace(
        tmp_path_factory.mktemp("shard") / "ws",
        data__image_mode="RGB",
        shard__shard_size=64,
        shard__image_format="png",
        seed=5,
    )
    ingest("folder", cifar_small, run_dvc=False, root=ws)
    return ws, shard(ws)


def test_manifest_describes_the_shards(sharded):
    ws, manifest = sharded
    shards = ws / "data" / "shards"
    assert sorted(p.name for p in shards.iterdir()) == ["manifest.json"] + [f"test-00000{i}.tar" for i in range(2)] + [
        f"train-00000{i}.tar" for i in range(5)
    ]
    assert json.loads((shards / "manifest.json").read_text())["splits"] == manifest["splits"]
    train, test = manifest["splits"]["train"], manifest["splits"]["test"]
    assert (train["count"], test["count"]) == (300, 100)
    assert [s["count"] for s in train["shards"]] == [64, 64, 64, 64, 44]
    assert train["per_class"] == {c: 30 for c in manifest["classes"]} and len(manifest["classes"]) == 10
    assert manifest["classes"] == sorted(manifest["classes"])
    for entry in train["shards"] + test["shards"]:
        data = (shards / entry["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
    assert (manifest["image_mode"], manifest["channels"], manifest["image_format"]) == ("RGB", 3, "png")
    assert manifest["image_size"]["uniform"] == [32, 32]
    assert manifest["format"] == "sslcook-shards/2"
    assert train["image_sizes"] == [[32, 32]] == test["image_sizes"]
    assert manifest["image_size"]["source"]["min"] == [32, 32] == manifest["image_size"]["source"]["max"]
    assert manifest["skipped"] == [] and manifest["skipped_count"] == 0
    assert manifest["data_version"] == raw_dir_md5(ws / "data" / "raw")
    assert manifest["data_dvc"] == {"md5": None, "matches": False}  # this workspace has no data.dvc
    lineage = manifest["lineage"]
    assert lineage["stage"] == "shard" and lineage["data_version"] == manifest["data_version"]
    assert set(lineage["params"]) == {"seed", "data", "shard"} and lineage["params"]["shard"]["shard_size"] == 64
    assert lineage["seed"] == 5 and lineage["parents"]["raw"]["path"] == "data/raw"


def test_every_image_and_label_round_trips(sharded):
    ws, manifest = sharded
    raw = ws / "data" / "raw"
    for split, expected in (("train", 300), ("test", 100)):
        samples = read_shards(ws / "data" / "shards", split)
        assert len(samples) == expected and len({s["__key__"] for s in samples}) == expected
        seen = set()
        for s in samples:
            meta = json.loads(s["json"])
            assert set(s) == {"__key__", "png", "json"}  # format 2: one member besides the image
            assert set(meta) == {"cls", "path", "class"}
            assert meta["path"].startswith(f"{split}/{meta['class']}/")
            assert meta["cls"] == manifest["classes"].index(meta["class"])
            assert np.array_equal(pixels(s["png"], "RGB"), pixels((raw / meta["path"]).read_bytes(), "RGB"))
            seen.add(meta["path"])
        assert seen == {p.relative_to(raw).as_posix() for p in (raw / split).rglob("*.jpg")}


def test_order_is_shuffled_by_the_seed_and_reproducible(sharded, tmp_path):
    ws, manifest = sharded
    first_shard = read_shards(ws / "data" / "shards", "train")[:64]
    assert len(Counter(json.loads(s["json"])["class"] for s in first_shard)) >= 8  # shards mix classes

    again = shard(ws)
    assert [s["sha256"] for s in again["splits"]["train"]["shards"]] == [
        s["sha256"] for s in manifest["splits"]["train"]["shards"]
    ]  # byte-identical shards

    other = light_workspace(tmp_path / "ws", **{"data__image_mode": "RGB", "shard__shard_size": 64, "seed": 6})
    shutil.copytree(ws / "data" / "raw", other / "data" / "raw")
    reseeded = shard(other)
    order = [json.loads(s["json"])["path"] for s in read_shards(other / "data" / "shards", "train")]
    original = [json.loads(s["json"])["path"] for s in read_shards(ws / "data" / "shards", "train")]
    assert order != original and sorted(order) == sorted(original)
    assert reseeded["data_version"] == manifest["data_version"]


def test_a_crash_mid_way_leaves_no_partial_shard(sharded, tmp_path, monkeypatch):
    ws, _ = sharded
    other = light_workspace(tmp_path / "ws", data__image_mode="RGB", shard__shard_size=64, shard__workers=1)
    shutil.copytree(ws / "data" / "raw", other / "data" / "raw")
    written = []
    real_write = shard_mod.ShardWriter.write

    def crash_after_some(self, sample):
        written.append(sample["__key__"])
        if len(written) == 150:  # two shards closed, a third half-written
            raise KeyboardInterrupt
        real_write(self, sample)

    monkeypatch.setattr(shard_mod.ShardWriter, "write", crash_after_some)
    with pytest.raises(KeyboardInterrupt):
        shard(other)
    assert sorted(p.name for p in (other / "data").iterdir()) == ["raw"]  # no data/shards, no temp folder


# A caller holding a lock while the stage starts its workers, and a library hook that needs it in a forked child
_HELD_LOCK_AT_FORK = """
import os, sys, threading
from pathlib import Path
from stages.shard import shard

held = threading.Lock()
os.register_at_fork(after_in_child=lambda: held.acquire(timeout=150))
with held:
    shard(Path(sys.argv[1]))
"""


def test_decoding_workers_start_clean_whatever_locks_the_caller_holds(sharded, tmp_path):
    """A worker forked straight from a threaded caller (a notebook, Prefect, torch's pools) gets the caller's locks
    as they were at that instant; one held then is never released in the worker, which never starts, and the
    stage waits for it forever. The workers come from a clean process instead."""
    ws, manifest = sharded
    other = light_workspace(
        tmp_path / "ws",
        data__image_mode="RGB",
        shard__shard_size=64,
        shard__image_format="png",
        shard__workers=2,
        seed=5,
    )
    shutil.copytree(ws / "data" / "raw", other / "data" / "raw")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")]))
    subprocess.run(
        [sys.executable, "-c", _HELD_LOCK_AT_FORK, str(other)], env=env, check=True, timeout=120, capture_output=True
    )
    again = json.loads((other / "data" / "shards" / "manifest.json").read_text())
    assert [s["sha256"] for s in again["splits"]["train"]["shards"]] == [
        s["sha256"] for s in manifest["splits"]["train"]["shards"]
    ]


def test_jpeg_shards_keep_the_original_bytes(sharded, tmp_path):
    ws, _ = sharded
    other = light_workspace(tmp_path / "ws", data__image_mode="RGB", shard__image_format="jpg")
    shutil.copytree(ws / "data" / "raw", other / "data" / "raw")
    manifest = shard(other)
    assert manifest["original_bytes_kept"] == 400 and manifest["conversions"] == {}
    for s in read_shards(other / "data" / "shards", "test")[:20]:
        assert s["jpg"] == (other / "data" / "raw" / json.loads(s["json"])["path"]).read_bytes()


def test_grey_mode_and_resize(sharded, tmp_path):
    ws, _ = sharded
    other = light_workspace(tmp_path / "ws", data__image_mode="L", shard__image_size=20)
    shutil.copytree(ws / "data" / "raw", other / "data" / "raw")
    manifest = shard(other)
    assert manifest["channels"] == 1 and manifest["image_size"]["uniform"] == [20, 20]
    assert manifest["image_size"]["source"]["max"] == [32, 32]
    assert manifest["conversions"] == {"-> L; resized to 20x20": 400}
    img = Image.open(io.BytesIO(read_shards(other / "data" / "shards", "train")[0]["png"]))
    assert (img.mode, img.size) == ("L", (20, 20))


def test_unexpected_raw_layout_is_a_one_line_error(tmp_path):
    from stages.workspace.common import DataError

    ws = light_workspace(tmp_path / "ws")
    (ws / "data" / "raw" / "cats").mkdir(parents=True)
    with pytest.raises(DataError, match="data/raw/cats: unexpected folder"):
        shard(ws)
    set_params(ws, data__image_mode="L")
    (ws / "data" / "raw" / "cats").rmdir()
    with pytest.raises(DataError, match="data/raw: no images"):
        shard(ws)
    assert not (ws / "data" / "shards").exists()
