"""params.yaml validation: one line naming the key, exit code 2, no traceback, nothing written."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from support.data_utils import PROJECT_ROOT, light_workspace, set_params

# (override as data_utils.set_params keywords, or raw YAML text) -> what the one-line error must name
CASES = {
    "unknown key": ({"data__colour": "red"}, "data.colour: unknown key"),
    "unknown section": ({"colour": "red"}, "colour: unknown key"),
    "wrong type": ({"shard__shard_size": "many"}, "shard.shard_size: "),
    "negative lr": ({"pretrain__base_lr": -1}, "pretrain.base_lr: "),
    "shard size 0": ({"shard__shard_size": 0}, "shard.shard_size: "),
    "unknown method": ({"methods": ["simclr", "sinclair"]}, "methods[1]: unknown method 'sinclair'"),
    "unknown data source": ({"data__source": "imagenet"}, "data.source: "),
    "unknown bad-image policy": ({"data__on_bad_image": "ignore"}, "data.on_bad_image: "),
    "mnist5k split larger than the data": ({"data__train_per_class": 450}, "exceeds the 500 mnist5k digits"),
    "not YAML": ("data: [unclosed\n", "not valid YAML"),
}


def test_invalid_params_stop_the_shard_stage_with_one_line(tmp_path):
    procs = {}
    for i, (name, (override, _)) in enumerate(CASES.items()):
        ws = light_workspace(tmp_path / f"case{i}")
        if isinstance(override, str):
            (ws / "params.yaml").write_text(override)
        else:
            set_params(ws, **override)
        (ws / "data" / "raw" / "train" / "a").mkdir(parents=True)  # something to shard, were params valid
        procs[name] = (ws, subprocess.Popen([sys.executable, "-m", "stages.shard"], cwd=ws, text=True,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}))
    for name, (ws, proc) in procs.items():
        out, err = proc.communicate(timeout=300)
        expected = CASES[name][1]
        assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{err}"
        assert "Traceback" not in err and out == "", f"{name}: {err}"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: params.yaml:"), f"{name}: {err}"
        assert expected in lines[0], f"{name}: {lines[0]!r} does not name {expected!r}"
        assert not (ws / "data" / "shards").exists(), name
        assert sorted(p.name for p in (ws / "data").iterdir()) == ["raw"], name


def test_the_project_params_are_valid():
    from stages.config import load_params

    params = load_params(PROJECT_ROOT / "params.yaml")
    assert params.data.source == "mnist5k" and params.shard.shard_size >= 1


@pytest.mark.parametrize("override, expected", [({"data__image_mode": "CMYK"}, "data.image_mode"),
                                                ({"data__test_fraction": 1.5}, "data.test_fraction")])
def test_ingest_validates_params_before_touching_data_raw(tmp_path, monkeypatch, capsys, override, expected):
    from flows import cli

    ws = light_workspace(tmp_path / "ws", **override)
    monkeypatch.chdir(ws)
    assert cli.main(["data", "ingest", "mnist5k", "--no-dvc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0]
    assert not (ws / "data").exists()
