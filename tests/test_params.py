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
        procs[name] = (
            ws,
            subprocess.Popen(
                [sys.executable, "-m", "stages.shard"],
                cwd=ws,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
            ),
        )
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
    from stages.workspace.config import load_params

    params = load_params(PROJECT_ROOT / "params.yaml")
    assert params.data.source == "mnist5k" and params.shard.shard_size >= 1


@pytest.mark.parametrize(
    "override, expected",
    [({"data__image_mode": "CMYK"}, "data.image_mode"), ({"data__test_fraction": 1.5}, "data.test_fraction")],
)
def test_ingest_validates_params_before_touching_data_raw(tmp_path, monkeypatch, capsys, override, expected):
    from flows import cli

    ws = light_workspace(tmp_path / "ws", **override)
    monkeypatch.chdir(ws)
    assert cli.main(["data", "ingest", "mnist5k", "--no-dvc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0]
    assert not (ws / "data").exists()


def test_the_schema_defaults_are_the_project_params():
    """One set of defaults: a key left out of params.yaml keeps the value params.yaml shows (the method blocks
    are choices with no schema default)."""
    import yaml

    from stages.workspace.config import Params, parse_params

    shipped = parse_params(yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())).model_dump()
    defaults = Params().model_dump()
    assert set(shipped) == set(defaults)
    for section in shipped:
        if section != "method":
            assert defaults[section] == shipped[section], section


def test_the_engine_monitor_is_built_from_the_params_monitor():
    import dataclasses

    import torch

    from ssl_models import engine, monitors
    from stages.workspace.config.pretrain import MonitorConfig

    assert engine.MonitorConfig is monitors.MonitorConfig and engine.detect_collapse is monitors.detect_collapse
    params_fields = {k: f.default for k, f in MonitorConfig.model_fields.items() if k != "online_knn"}
    assert {f.name: f.default for f in dataclasses.fields(monitors.MonitorConfig)} == params_fields
    assert monitors.MonitorConfig(**MonitorConfig().model_dump(exclude={"online_knn"})) == monitors.MonitorConfig()
    # collapse_report applies the engine's rule: a std at 0.07 of the healthy 1/sqrt(d) is collapsed only under
    # a 0.1 threshold (the default is 0.05)
    torch.manual_seed(0)
    d = 64
    spread = torch.randn(4096, d)
    narrow = torch.nn.functional.normalize(torch.randn(1, d), dim=1) + 0.07 * spread / d**0.5
    report = monitors.collapse_report(narrow)
    assert 0.05 < report["emb_std_ratio"] < 0.1 and report["rankme"] > 1.5, report
    assert not report["collapsed"]
    assert monitors.collapse_report(narrow, monitors.MonitorConfig(min_std_ratio=0.1))["collapsed"]


def test_the_pretrain_library_deps_are_the_dvc_yaml_deps():
    import yaml

    from stages.pretrain import LIBRARY_DEPS

    deps = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]["pretrain"]["do"]["deps"]
    library = [d.removeprefix("ssl_models/") for d in deps if d.startswith("ssl_models/") and "${item}" not in d]
    # and the other way round (every file the resume key hashes is a dep): test_pretrain_stage.py
    assert sorted(LIBRARY_DEPS) == sorted(library)


def test_method_hyperparameters_are_checked_against_the_constructor():
    """Every constructor hyperparameter of every method refuses a value of the wrong type, in one line naming
    method.<name>.<key>; the annotated type itself is accepted."""
    import copy

    import yaml

    from ssl_models import registry
    from stages.workspace.common import ConfigError
    from stages.workspace.config import parse_params

    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    checked = 0
    for name in registry.names():
        for key, default in registry.get(name).defaults().items():
            bad = copy.deepcopy(raw)
            bad["method"][name][key] = {"not": "a value"}
            with pytest.raises(ConfigError) as err:
                parse_params(bad)
            assert str(err.value).startswith(f"params.yaml: method.{name}.{key}: "), err.value
            assert "\n" not in str(err.value)
            if default is not None:
                good = copy.deepcopy(raw)
                good["method"][name][key] = default
                assert parse_params(good).method[name][key] == default
            checked += 1
    assert checked > 100
    bad = copy.deepcopy(raw)
    bad["method"]["byol"]["base_momentum"] = True  # a bool is not a number, a float accepts an int
    with pytest.raises(ConfigError, match=r"method\.byol\.base_momentum: Input should be a valid number"):
        parse_params(bad)
    bad["method"]["byol"]["base_momentum"] = 1
    assert parse_params(bad).method["byol"]["base_momentum"] == 1


def test_one_device_rule():
    import torch

    from ssl_models.device import DeviceError, select_device
    from stages.evaluate import pick_device
    from stages.workspace.common import ConfigError

    assert select_device("cpu") == torch.device("cpu") == pick_device("cpu")
    assert pick_device("auto") == select_device("auto")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA device"):
            select_device("cuda")
        with pytest.raises(ConfigError, match=r"^params.yaml: evaluate.device: .*no CUDA device"):
            pick_device("cuda")
