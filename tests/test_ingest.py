"""Ingest: mnist5k reproduces the committed data.dvc; folders and archives land in data/raw the same way."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import PROJECT_ROOT, run
from stages.workspace import ingest as ingest_mod
from stages.workspace.common import ConfigError, DataError
from stages.workspace.ingest import ingest, raw_dir_md5
from support.data_utils import encode, light_workspace, noise_rgb


def _committed_md5() -> str:
    return yaml.safe_load((PROJECT_ROOT / "data.dvc").read_text())["outs"][0]["md5"]


def test_mnist5k_reproduces_the_committed_data_dvc(workspace):
    """A fresh clone + `sslcook data ingest mnist5k` leaves `dvc status data.dvc` clean."""
    shutil.copy(PROJECT_ROOT / "data.dvc", workspace / "data.dvc")
    proc = run(
        [sys.executable, "-m", "flows.cli", "data", "ingest", "mnist5k"],
        workspace,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
    )
    assert _committed_md5() in proc.stdout and "git add data.dvc" in proc.stdout
    assert yaml.safe_load((workspace / "data.dvc").read_text())["outs"][0]["md5"] == _committed_md5()
    status = run([sys.executable, "-m", "dvc", "status", "--json", "data.dvc"], workspace)
    assert json.loads(status.stdout) == {}
    assert (workspace / "data" / ".gitignore").read_text().strip() == "/raw"
    # our DVC-compatible hash (used by the shard stage and --no-dvc) agrees with dvc's own
    assert raw_dir_md5(workspace / "data" / "raw") == _committed_md5()


def test_mnist5k_layout_and_bytes_are_deterministic(tmp_path):
    from stages.workspace.config.sections import DataConfig

    cfg = DataConfig(train_per_class=40, test_per_class=10)
    first, second = tmp_path / "a", tmp_path / "b"
    info = ingest_mod.materialise_mnist5k(first, cfg)
    ingest_mod.materialise_mnist5k(second, cfg)
    assert raw_dir_md5(first) == raw_dir_md5(second)
    assert info["counts"]["train"] == {str(d): 40 for d in range(10)}
    assert info["counts"]["test"] == {str(d): 10 for d in range(10)}
    files = sorted(first.rglob("*.png"))
    assert len(files) == 500 and {p.parts[-3] for p in files} == {"train", "test"}
    # the PNGs hold the CSV's pixels exactly
    pixels, labels = ingest_mod.read_mnist5k(ingest_mod.mnist5k_csv())
    row = int(files[0].stem)
    assert files[0].parent.name == str(labels[row])
    assert np.array_equal(np.asarray(Image.open(files[0])), pixels[row])
    # train and test never share a digit
    train_rows = {p.stem for p in (first / "train").rglob("*.png")}
    assert not train_rows & {p.stem for p in (first / "test").rglob("*.png")}


# --------------------------------------------------------------------------------------- folders / archives
@pytest.fixture(scope="module")
def cifar_tree(cifar_small, tmp_path_factory) -> Path:
    """cifar_small wrapped in a top folder (as archives often are), with a stray non-image file."""
    root = tmp_path_factory.mktemp("tree") / "cifar-subset"
    shutil.copytree(cifar_small, root)
    (root / "README.txt").write_text("not an image")
    return root


def test_folder_with_split_folders_keeps_them(tmp_path, cifar_tree):
    ws = light_workspace(tmp_path / "ws")
    result = ingest("folder", cifar_tree, run_dvc=False, root=ws)
    assert result.counts["train"] == {c: 30 for c in result.counts["train"]} and len(result.counts["train"]) == 10
    assert result.counts["test"] == {c: 10 for c in result.counts["train"]}
    raw = ws / "data" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == ["SOURCE.json", "test", "train"]
    source = json.loads((raw / "SOURCE.json").read_text())
    assert source["name"] == "folder" and source["layout"] == "split-folders" and source["images"] == 400
    assert source["ignored"] == {"count": 1, "examples": ["README.txt"]}
    # original bytes, original names
    one = sorted((cifar_tree / "train" / "cat").iterdir())[0]
    assert (raw / "train" / "cat" / one.name).read_bytes() == one.read_bytes()
    assert result.data_version == raw_dir_md5(raw)


def test_tar_gz_and_zip_of_the_tree_give_the_same_data_version_as_the_folder(tmp_path, cifar_tree):
    tgz, archive_zip = tmp_path / "set.tar.gz", tmp_path / "set.zip"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(cifar_tree, arcname=cifar_tree.name)
    with zipfile.ZipFile(archive_zip, "w") as zf:
        for path in sorted(cifar_tree.rglob("*")):
            zf.write(path, Path(cifar_tree.name) / path.relative_to(cifar_tree))
    versions = {}
    for name, source, path in [
        ("folder", "folder", cifar_tree),
        ("tgz", "archive", tgz),
        ("zip", "archive", archive_zip),
    ]:
        ws = light_workspace(tmp_path / name)
        result = ingest(source, path, run_dvc=False, root=ws)
        assert result.total == 400
        source_json = json.loads((ws / "data" / "raw" / "SOURCE.json").read_text())
        raw = ws / "data" / "raw"
        assert source_json["ignored"]["count"] == 1  # README.txt (its path is relative to each source's root)
        versions[name] = (
            {k: v for k, v in source_json.items() if k not in ("origin", "name", "ignored")},
            raw_dir_md5(raw / "train"),
            raw_dir_md5(raw / "test"),
        )
    assert versions["folder"] == versions["tgz"] == versions["zip"]


def test_tar_archive_is_read_as_a_stream(tmp_path, cifar_tree, monkeypatch):
    """Members are read one by one from a non-seekable stream: no unpacked copy of the archive."""
    tgz = tmp_path / "set.tgz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(cifar_tree, arcname="x")
    modes = []
    real_open = tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda *a, **kw: modes.append(kw.get("mode")) or real_open(*a, **kw))
    names = [name for name, _, read in ingest_mod.iter_archive(tgz) if read()]
    assert modes == ["r|*"] and len(names) == 401


def test_class_folders_without_splits_get_a_stratified_deterministic_test_split(tmp_path, cifar_small):
    tree = tmp_path / "classes"
    for cls_dir in sorted((cifar_small / "train").iterdir()):
        shutil.copytree(cls_dir, tree / cls_dir.name)
    ws = light_workspace(tmp_path / "ws", data__test_fraction=0.2)
    result = ingest("folder", tree, run_dvc=False, root=ws)
    assert result.counts["train"] == {c: 24 for c in result.counts["train"]}
    assert result.counts["test"] == {c: 6 for c in result.counts["train"]}
    first = sorted(p.relative_to(ws / "data" / "raw").as_posix() for p in (ws / "data" / "raw" / "test").rglob("*"))
    again = ingest("folder", tree, run_dvc=False, root=light_workspace(tmp_path / "ws2", seed=7))
    assert again.data_version == result.data_version  # the split does not move with the training seed
    assert json.loads((ws / "data" / "raw" / "SOURCE.json").read_text())["test_split"]["fraction"] == 0.2
    assert len(first) == 70  # 10 class folders + 60 images


def test_flat_folder_is_unlabelled_and_eval_path_brings_a_labelled_set(tmp_path, cifar_small):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(12):
        (flat / f"img {i}.png").write_bytes(encode(noise_rgb(i), "PNG"))
    ws = light_workspace(tmp_path / "ws")
    alone = ingest("folder", flat, run_dvc=False, root=ws)
    assert alone.counts == {"train": {"_unlabelled": 12}}
    assert "eval_path" in json.loads((ws / "data" / "raw" / "SOURCE.json").read_text())["warning"]

    ws2 = light_workspace(tmp_path / "ws2", data__eval_path=str(cifar_small))
    both = ingest("folder", flat, run_dvc=False, root=ws2)
    assert both.counts["train"]["_unlabelled"] == 12 and both.counts["train"]["cat"] == 30
    assert both.counts["test"]["cat"] == 10 and "_unlabelled" not in both.counts["test"]


def test_cifar10_source_reads_the_local_archive(tmp_path, cifar_small):
    # a small archive with the layout of the real one (train/<class>/NNNN.jpg, test/<class>/NNNN.jpg)
    small = tmp_path / "cifar-mini.tar.gz"
    with tarfile.open(small, "w:gz") as tf:
        for split in ("train", "test"):
            for cls_dir in sorted((cifar_small / split).iterdir()):
                for img in sorted(cls_dir.iterdir())[:3]:
                    tf.add(img, arcname=f"{split}/{cls_dir.name}/{img.name}")
    ws = light_workspace(tmp_path / "ws")
    result = ingest("cifar10", small, run_dvc=False, root=ws)
    assert result.counts["train"] == {c: 3 for c in result.counts["train"]} and len(result.counts["train"]) == 10
    assert result.counts["test"] == result.counts["train"]
    origin = json.loads((ws / "data" / "raw" / "SOURCE.json").read_text())["origin"]
    assert origin["file"] == "cifar-mini.tar.gz" and len(origin["sha256"]) == 64


def test_cifar10_without_a_path_uses_torchvision(tmp_path, monkeypatch):
    """The download branch, with torchvision's CIFAR10 replaced by a stand-in (no network in tests)."""
    import torchvision.datasets

    class FakeCIFAR10:
        classes = ["airplane", "automobile"]

        def __init__(self, root, train, download):
            assert download and Path(root).name == "cifar10"
            n = 6 if train else 2
            self.data = (np.random.default_rng(n).random((n, 32, 32, 3)) * 255).astype(np.uint8)
            self.targets = [i % 2 for i in range(n)]

        def __len__(self):
            return len(self.targets)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    ws = light_workspace(tmp_path / "ws", data__path=None)
    result = ingest("cifar10", None, run_dvc=False, root=ws)
    assert result.counts == {"test": {"airplane": 1, "automobile": 1}, "train": {"airplane": 3, "automobile": 3}}
    img = ws / "data" / "raw" / "train" / "automobile" / "00001.png"
    assert np.array_equal(np.asarray(Image.open(img)), FakeCIFAR10("x/cifar10", True, True).data[1])


@pytest.mark.parametrize(
    "args, message",
    [
        (("folder", None), "needs a path"),
        (("archive", "nowhere.tar"), "not an archive file"),
        (("folder", "nowhere"), "not a folder"),
        (("imagenet", None), "unknown data source 'imagenet'"),
    ],
)
def test_bad_source_arguments_are_one_line_config_errors(tmp_path, args, message):
    ws = light_workspace(tmp_path / "ws")
    with pytest.raises(ConfigError, match=message):
        ingest(args[0], (tmp_path / args[1]) if args[1] else None, run_dvc=False, root=ws)
    assert not (ws / "data").exists()


def test_empty_source_is_refused(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    ws = light_workspace(tmp_path / "ws")
    with pytest.raises(DataError, match="no usable images"):
        ingest("folder", tmp_path / "empty", run_dvc=False, root=ws)
    assert not (ws / "data" / "raw").exists()


def test_cli_without_dvc_repository_says_so(tmp_path, monkeypatch, capsys):
    from flows import cli

    ws = light_workspace(tmp_path / "ws")
    monkeypatch.chdir(ws)
    assert cli.main(["data", "ingest", "mnist5k"]) == 2
    assert "not a DVC repository" in capsys.readouterr().err
    assert cli.main(["data", "ingest", "nope"]) == 2
    assert "unknown data source 'nope'" in capsys.readouterr().err
