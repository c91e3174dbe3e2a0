"""A corpus of hostile inputs, built here: params, archives, links, images, resume states, safetensors headers.

Each case asserts the exit code (or the error class a CLI turns into one), a single-line message naming the file
or key, no traceback, and that the earlier outputs (metrics, models, data.dvc, data/raw) are byte-identical.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

import support.tiny_pipeline as tp
from conftest import run
from stages import pretrain as stage
from stages.workspace.common import ConfigError, DataError
from stages.workspace.ingest import ingest
from support.data_utils import encode, light_workspace, noise_rgb, set_params
from support.tiny_ssl import make_stage_workspace
from test_pretrain_stage import shards  # noqa: F401  (fixture)


def snapshot(root: Path, *patterns: str) -> dict[str, str]:
    """sha256 of every file matching the patterns under root (the earlier outputs a bad input must not touch)."""
    out = {}
    for pattern in patterns:
        for path in sorted(root.glob(pattern)):
            if path.is_file():
                out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def one_line_error(stderr: str, *names: str) -> str:
    """The error line of a refused input: one line (progress bars aside), naming every one of ``names``."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def cli(monkeypatch, capsys, root: Path, *args: str) -> tuple[int, str]:
    """``sslcook ARGS`` in-process in workspace ``root``: (exit code, stderr). An exception escaping it fails."""
    from flows.cli import main

    monkeypatch.setenv("SSLCOOK_WORKSPACE", str(root))
    monkeypatch.chdir(root)
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- params
OUTPUTS = ("runs/*/*", "models/*/*", "metrics/*", "data.dvc", "dvc.lock", "reports/*")


def _edit(params: dict, dotted: str, value) -> None:
    node = params
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


BAD_PARAMS = [
    ("methods", [], "methods"),
    ("pretrain.augment.affine_degrees", -5, "pretrain.augment.affine_degrees"),
    ("method.simclr.augment.brightness", -1, "method.simclr.augment.brightness"),
    ("method.simclr.augment.crop_scale", [2, 1], "method.simclr.augment.crop_scale"),
    ("pretrain.epohcs", 3, "pretrain.epohcs"),
    ("method.simclr.temperature", "hot", "method.simclr.temperature"),
    ("pretrain.backbone.width", -1, "pretrain.backbone"),
    ("evaluate.knn_temperature", -0.1, "evaluate.knn_temperature"),
    ("pretrain.on_bad_resume", "maybe", "pretrain.on_bad_resume"),
]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return tp.shared_pipeline(tmp_path_factory)


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_bad_params_stop_sslcook_run_before_dvc_deletes_anything(pipeline, monkeypatch, capsys):
    """`dvc repro` removes a stage's outputs before the stage runs: a value it would refuse must never reach it.
    Every case runs `sslcook run --no-prefect` (in-process: the CLI's own main) on the finished tiny pipeline;
    one also runs the Prefect path as a command."""
    ws = pipeline["ws"]
    original = (ws / "params.yaml").read_text()
    before = snapshot(ws, *OUTPUTS)
    assert any(k.startswith("runs/simclr/") for k in before) and "data.dvc" in before
    try:
        for dotted, value, named in BAD_PARAMS:
            params = yaml.safe_load(original)
            _edit(params, dotted, value)
            tp.write_params(ws, params)
            code, err = cli(monkeypatch, capsys, ws, "run", "--no-prefect", "-q")
            assert code == 2, (dotted, code, err[-2000:])
            one_line_error(err, "params.yaml", named)
            assert snapshot(ws, *OUTPUTS) == before, dotted
        (ws / "params.yaml").write_text(original.replace("seed: 0", "seed: [0", 1))  # not YAML at all
        proc = tp.sslcook(["run", "-q"], ws, check=False)  # the Prefect path: refused before a server starts
        assert proc.returncode == 2, proc.stderr[-2000:]
        one_line_error(proc.stderr, "params.yaml", "not valid YAML")
        assert snapshot(ws, *OUTPUTS) == before
    finally:
        (ws / "params.yaml").write_text(original)
    assert tp.dvc(["status"], ws).stdout.strip().endswith("up to date.")


def test_augment_value_names_the_key_it_came_from(tmp_path, shards):  # noqa: F811
    ws = make_stage_workspace(
        tmp_path / "ws", shards, methods=["simclr"], method_overrides={"simclr": {"augment": {"contrast": -2}}}
    )
    with pytest.raises(ConfigError, match=r"method\.simclr\.augment\.contrast: .*non negative"):
        stage.pretrain("simclr", root=ws)
    set_params(ws, method__simclr__augment={"contrast": 0.4}, pretrain__augment={"flip_prob": 1.5})
    with pytest.raises(ConfigError, match=r"pretrain\.augment\.flip_prob: .*\[0\.0, 1\.0\]"):
        stage.pretrain("simclr", root=ws)
    assert not (ws / "runs").exists()


# ------------------------------------------------------------------------------------------ archives, links
def _image_tree(dest: Path, classes=("a", "b"), per_class: int = 4, size: int = 16) -> Path:
    for c, cls in enumerate(classes):
        (dest / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (dest / cls / f"{i}.png").write_bytes(encode(noise_rgb(100 * c + i, size), "PNG"))
    return dest


def _tar_gz(tree: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        for path in sorted(tree.rglob("*.png")):
            tf.add(path, arcname=path.relative_to(tree).as_posix())
    return dest


def _zip(tree: Path, dest: Path, compression=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(dest, "w", compression) as zf:
        for path in sorted(tree.rglob("*.png")):
            zf.write(path, path.relative_to(tree).as_posix())
    return dest


def truncated_tar_gz(tree: Path, dest: Path) -> tuple[Path, str]:
    data = _tar_gz(tree, dest).read_bytes()
    dest.write_bytes(data[: len(data) * 2 // 3])
    return dest, "member '"


def zip_bad_crc(tree: Path, dest: Path) -> tuple[Path, str]:
    _zip(tree, dest)
    with zipfile.ZipFile(dest) as zf:
        info = zf.getinfo("a/1.png")
    data = bytearray(dest.read_bytes())
    at = info.header_offset + 30 + len(info.filename) + 40  # inside the stored member's bytes
    data[at] ^= 0xFF
    dest.write_bytes(bytes(data))
    return dest, "a/1.png"


def zip_unsupported_method(tree: Path, dest: Path) -> tuple[Path, str]:
    _zip(tree, dest)
    data = bytearray(dest.read_bytes())
    with zipfile.ZipFile(dest) as zf:
        infos = {i.filename: i for i in zf.infolist()}
    # compression method 99 (AES) in the central directory entry of one member: cannot be read here
    start = 0
    while (cd := data.find(b"PK\x01\x02", start)) != -1:
        name_len = int.from_bytes(data[cd + 28 : cd + 30], "little")
        if data[cd + 46 : cd + 46 + name_len] == b"b/2.png":
            data[cd + 10 : cd + 12] = (99).to_bytes(2, "little")
        start = cd + 4
    assert "b/2.png" in infos
    dest.write_bytes(bytes(data))
    return dest, "b/2.png"


def zip_truncated(tree: Path, dest: Path) -> tuple[Path, str]:
    data = _zip(tree, dest).read_bytes()
    dest.write_bytes(data[: len(data) // 2])  # no central directory: not recognisable as a zip any more
    return dest, "not a tar or zip archive"


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    """A DVC workspace with a small folder ingested: the earlier data.dvc and data/raw that a bad ingest must keep."""
    ws = tmp_path_factory.mktemp("ingested") / "ws"
    ws.mkdir()
    shutil.copy(tp.PROJECT_ROOT / "params.yaml", ws / "params.yaml")
    run(["git", "init", "-q"], ws)
    run([sys.executable, "-m", "dvc", "init", "-q"], ws)
    tree = _image_tree(ws.parent / "good")
    ingest("folder", tree, root=ws)
    return ws


@pytest.mark.parametrize("make", [truncated_tar_gz, zip_bad_crc, zip_unsupported_method, zip_truncated])
def test_damaged_archive_is_one_line_and_nothing_is_written(make, ingested, tmp_path, monkeypatch, capsys):
    suffix = ".tar.gz" if "tar" in make.__name__ else ".zip"
    archive, named = make(_image_tree(tmp_path / "tree"), tmp_path / f"damaged{suffix}")
    before = snapshot(ingested, "data.dvc", "data/raw/**/*")
    code, err = cli(monkeypatch, capsys, ingested, "data", "ingest", "archive", "--path", str(archive))
    assert code == 1
    one_line_error(err, str(archive), named)
    assert snapshot(ingested, "data.dvc", "data/raw/**/*") == before
    assert not list((ingested / "data").glob(".raw.*"))  # no staging folder left behind


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_folder_symlink_outside_is_refused_unless_followed(kind, ingested, tmp_path, monkeypatch, capsys):
    tree = _image_tree(tmp_path / "tree")
    outside = _image_tree(tmp_path / "outside", classes=("c",))
    link = tree / "a" / "9.png" if kind == "file" else tree / "c"
    link.symlink_to(outside / "c" / "0.png" if kind == "file" else outside / "c")
    before = snapshot(ingested, "data.dvc", "data/raw/**/*")
    code, err = cli(monkeypatch, capsys, ingested, "data", "ingest", "folder", "--path", str(tree))
    assert code == 1
    one_line_error(err, str(tree), link.relative_to(tree).as_posix(), "data.follow_symlinks")
    assert snapshot(ingested, "data.dvc", "data/raw/**/*") == before
    # the documented way to read such links: data.follow_symlinks: true (no DVC: the shared workspace stays)
    ws = light_workspace(tmp_path / "follow", data__follow_symlinks=True)
    result = ingest("folder", tree, run_dvc=False, root=ws)
    assert result.total == 9 if kind == "file" else result.total == 12


def test_folder_symlink_inside_the_folder_is_read_once(tmp_path):
    tree = _image_tree(tmp_path / "tree")
    (tree / "a" / "again").symlink_to(tree / "b")  # inside: read where it really is, not twice
    result = ingest("folder", tree, run_dvc=False, root=light_workspace(tmp_path / "ws"))
    assert result.total == 8


def test_mixed_image_sizes_are_refused_by_the_shard_stage(tmp_path):
    from stages.shard import shard

    ws = light_workspace(tmp_path / "ws", data__image_mode="RGB", data__test_fraction=0.25)
    ingest("folder", _image_tree(tmp_path / "same"), run_dvc=False, root=ws)
    shard(root=ws)
    before = snapshot(ws, "data/shards/*")
    tree = _image_tree(tmp_path / "mixed")
    (tree / "a" / "1.png").write_bytes(encode(noise_rgb(7, 24), "PNG"))
    ingest("folder", tree, run_dvc=False, root=ws)
    with pytest.raises(DataError) as err:
        shard(root=ws)
    message = str(err.value)
    assert "\n" not in message and "split 'train'" in message and "16x16" in message and "24x24" in message
    assert "shard.image_size" in message
    assert snapshot(ws, "data/shards/*") == before
    set_params(ws, shard__image_size=16)  # the remedy the message names
    assert shard(root=ws)["image_size"]["uniform"] == [16, 16]


# ---------------------------------------------------------------------------------------------- resume states
class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('HOSTILE_MARKER', '/nonexistent/marker')}",))


def _garbage(path: Path, good: bytes) -> None:
    path.write_bytes(b"\x00garbage" * 64)


def _truncated(path: Path, good: bytes) -> None:
    path.write_bytes(good[: len(good) // 2])


def _pickle_with_code(path: Path, good: bytes) -> None:
    path.write_bytes(pickle.dumps({"format": "sslcook-train-state/1", "payload": _RunsCode()}))


def _other_format(path: Path, good: bytes) -> None:
    state = torch.load(io.BytesIO(good), weights_only=True)
    state["format"] = "sslcook-train-state/0"
    torch.save(state, path)


def _other_model(path: Path, good: bytes) -> None:
    state = torch.load(io.BytesIO(good), weights_only=True)
    state["method_state"] = {"weight": torch.zeros(3)}
    torch.save(state, path)


@pytest.fixture(scope="module")
def resume_case(tmp_path_factory, shards):  # noqa: F811
    """A real resume state of a 2-epoch SimCLR run (stopped after epoch 1), and the workspace it belongs to."""
    from ssl_models import engine

    ws = make_stage_workspace(
        tmp_path_factory.mktemp("resume") / "ws", shards, methods=["simclr"], pretrain={"epochs": 2}
    )
    real_fit = engine.Trainer._fit

    def stop_after_first_epoch(self, total):
        self.config.epochs = 1
        try:
            return real_fit(self, total)
        finally:
            raise KeyboardInterrupt

    engine.Trainer._fit = stop_after_first_epoch
    try:
        with pytest.raises(KeyboardInterrupt):
            stage.pretrain("simclr", root=ws)
    finally:
        engine.Trainer._fit = real_fit
    [state] = list((ws / stage.RESUME_DIR / "simclr").glob("*.pt"))
    return ws, state.name, state.read_bytes()


@pytest.mark.parametrize("damage", [_garbage, _truncated, _pickle_with_code, _other_format, _other_model])
def test_unusable_resume_state_is_set_aside_and_training_starts_fresh(
    damage, resume_case, tmp_path, capsys, monkeypatch
):
    ws0, name, good = resume_case
    ws = tmp_path / "ws"
    shutil.copytree(ws0, ws)
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("HOSTILE_MARKER", str(marker))
    state = ws / stage.RESUME_DIR / "simclr" / name
    damage(state, good)
    damaged = state.read_bytes()
    capsys.readouterr()
    summary = stage.pretrain("simclr", root=ws)
    err = capsys.readouterr().err
    assert summary["resumed_from_step"] is None and summary["epochs"] == 2
    warnings = [line for line in err.splitlines() if "resume state" in line]
    assert len(warnings) == 1 and str(state) in warnings[0] and "starting from step 0" in warnings[0], err
    [aside] = list(state.parent.glob(f"{name}.bad-*"))
    assert aside.read_bytes() == damaged  # moved aside, not deleted
    assert not marker.exists() and "Traceback" not in err
    if damage is _pickle_with_code:  # torch's own warning travels with the reason, whole
        assert "arbitrary code execution" in warnings[0]


def test_unusable_resume_state_stops_with_on_bad_resume_fail(resume_case, tmp_path):
    ws0, name, good = resume_case
    ws = tmp_path / "ws"
    shutil.copytree(ws0, ws)
    set_params(ws, pretrain__on_bad_resume="fail")
    state = ws / stage.RESUME_DIR / "simclr" / name
    _truncated(state, good)
    with pytest.raises(DataError) as err:
        stage.pretrain("simclr", root=ws)
    message = str(err.value)
    assert "\n" not in message and str(state) in message and "on_bad_resume: fail" in message
    assert list(state.parent.glob(f"{name}.bad-*")) and not state.exists()
    assert not [p for p in (ws / "runs").rglob("*") if p.is_file()]  # no outputs
    summary = stage.pretrain("simclr", root=ws)  # the next run starts fresh: it no longer blocks anything
    assert summary["resumed_from_step"] is None


# ------------------------------------------------------------------------------------------ safetensors headers
def _backbone_file(path: Path, config: dict, tensors: dict | None = None, **header) -> Path:
    from safetensors.torch import save_file

    from ssl_models.backbones import build_backbone

    if tensors is None:
        tensors = {k: v.contiguous().clone() for k, v in build_backbone(**config).state_dict().items()}
    meta = {"format": "sslcook.backbone/1", "backbone_config": json.dumps(config), "feature_dim": json.dumps(16)}
    meta.update({k: json.dumps(v) for k, v in header.items()})
    save_file(tensors, str(path), metadata=meta)
    return path


SMALL = {"name": "resnet18", "small_image": True, "width": 2, "in_chans": 1}


def _small_tensors() -> dict:
    from ssl_models.backbones import build_backbone

    return {k: v.contiguous().clone() for k, v in build_backbone(**SMALL).state_dict().items()}


CRAFTED = [
    ({**SMALL, "width": 100_000}, "backbone_config.width"),  # 360 GB were tried once
    ({**SMALL, "name": "os.system"}, "not a known backbone"),
    ({**SMALL, "name": ["resnet18"]}, "not a known backbone"),
    ({**SMALL, "in_chans": 0}, "backbone_config.in_chans"),
    ({**SMALL, "in_chans": "3"}, "backbone_config.in_chans"),
    ({**SMALL, "stem_stride": 64}, "backbone_config.stem_stride"),
    ({**SMALL, "exec": "rm -rf /"}, "backbone_config.exec: unknown key"),
    ({"name": "vit_tiny", "depth": 10_000, "image_size": 16, "patch_size": 4}, "backbone_config.depth"),
    ({"name": "vit_tiny", "embed_dim": 1 << 20}, "backbone_config.embed_dim"),
    ({"name": "vit_tiny", "image_size": 1 << 20, "patch_size": 1}, "backbone_config.image_size"),
    ({"name": "vit_tiny", "image_size": 16, "patch_size": 32}, "cannot be built"),
    ({"name": "vit_tiny", "image_size": 16, "patch_size": 4, "init": "__import__"}, "backbone_config.init"),
    ({**SMALL, "width": 4}, "with another shape"),  # the config asks for more than the file holds
]


@pytest.mark.parametrize(
    "config,named", CRAFTED, ids=[c[1].split(".")[-1][:24] + str(i) for i, c in enumerate(CRAFTED)]
)
def test_crafted_backbone_header_is_a_one_line_error(config, named, tmp_path):
    from ssl_models.io import BackboneFileError, load_backbone

    path = _backbone_file(tmp_path / "backbone.safetensors", config, tensors=_small_tensors())
    with pytest.raises(BackboneFileError) as err:
        load_backbone(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value) and named in str(err.value), err.value


def test_backbone_bytes_must_match_what_the_config_implies(tmp_path):
    from ssl_models.io import BackboneFileError, load_backbone

    tensors = _small_tensors()
    tensors["conv1.weight"] = tensors["conv1.weight"].double()  # same shapes, twice the bytes
    path = _backbone_file(tmp_path / "b.safetensors", SMALL, tensors=tensors)
    with pytest.raises(BackboneFileError, match="implies .* bytes of parameters, the file holds"):
        load_backbone(path)
    huge_input = _backbone_file(tmp_path / "c.safetensors", SMALL, input={"channels": 1, "image_size": 1 << 20})
    with pytest.raises(BackboneFileError, match="image_size"):
        load_backbone(huge_input)
    good = _backbone_file(tmp_path / "d.safetensors", SMALL, input={"channels": 1, "image_size": 8})
    assert load_backbone(good).feature_dim == 16


def test_checkpoint_with_code_keeps_torchs_warning(tmp_path):
    from stages.export import load_checkpoint

    path = tmp_path / "checkpoint.pt"
    path.write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(DataError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "arbitrary code execution" in message and "Do it only if you got the file from a trusted source" in message


@pytest.mark.integration
def test_evaluate_reports_a_crafted_backbone_in_one_line(pipeline, tmp_path):
    """The evaluate stage, as DVC runs it, on a copy of the finished pipeline whose exported header was crafted."""
    ws = tmp_path / "ws"
    shutil.copytree(pipeline["ws"], ws, symlinks=True)
    weights = ws / "models" / "simclr" / "backbone.safetensors"
    (ws / "models" / "simclr" / "model_card.json").unlink()
    _backbone_file(weights, {**SMALL, "width": 100_000}, tensors=_small_tensors())
    before = snapshot(ws, "metrics/*")
    proc = tp.sh(
        [sys.executable, "-m", "stages.evaluate", "--method", "simclr"],
        ws,
        check=False,
        env={"SSLCOOK_WORKSPACE": str(ws)},
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    one_line_error(proc.stderr, str(weights), "backbone_config.width")
    assert snapshot(ws, "metrics/*") == before
