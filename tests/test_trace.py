"""`sslcook trace`: from a number back to the data version and the commit; staleness agrees with `dvc status`."""

from __future__ import annotations

import json
import shutil

import pytest

import support.tiny_pipeline as tp


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> dict:
    """The tiny pipeline's workspace after run 1 (shared with test_report.py; read-only)."""
    return tp.shared_pipeline(tmp_path_factory)


def copy_workspace(src, dest):
    shutil.copytree(src, dest, symlinks=True)
    return dest


def data_dvc_md5(ws) -> str:
    return tp.yaml.safe_load((ws / "data.dvc").read_text())["outs"][0]["md5"]


def trace_json(ws, path, use_dvc: bool = True) -> dict:
    """flows.trace.trace in-process (what `sslcook trace --json` prints)."""
    from flows.trace import trace

    return json.loads(json.dumps(trace(ws / path, use_dvc=use_dvc), default=str))


def cli(args, cwd, monkeypatch, capsys) -> tuple[int, str, str]:
    """`sslcook ARGS` in-process, from ``cwd``: (exit code, stdout, stderr)."""
    from flows.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setenv("SSLCOOK_WORKSPACE", str(cwd))
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_trace_from_metrics_reaches_data_version_and_commit(pipeline, monkeypatch, capsys):
    ws, commit = pipeline["ws"], pipeline["commit"]
    md5 = data_dvc_md5(ws)
    code, out, _ = cli(["trace", "metrics/simclr.json"], ws, monkeypatch, capsys)
    assert code == 0
    # the chain, in order, with each step's stage and params
    order = [
        out.index(s)
        for s in (
            "metrics/simclr.json",
            "models/simclr/backbone.safetensors",
            "runs/simclr/checkpoint.pt",
            "data/shards/manifest.json",
            "data/raw",
        )
    ]
    assert order == sorted(order)
    assert "stage evaluate" in out and "stage export" in out and "stage pretrain" in out and "stage shard" in out
    assert "evaluate.knn_temperature=0.1" in out and "backbone.width=4" in out
    assert f"raw data version (data.dvc md5): {md5}" in out
    # the stages ran before `git commit`: the record holds the parent commit; the file itself is in `commit`
    parent = tp.sh(["git", "rev-parse", "HEAD~1"], ws).stdout.strip()
    assert f"git commit: {parent}" in out and f"this file is committed in {commit}" in out
    assert f"git checkout {commit} && dvc checkout" in out
    assert "verdict: up to date" in out and "dvc status: up to date" in out

    result = trace_json(ws, "metrics/simclr.json")
    assert [s["kind"] for s in result["steps"]] == ["metrics", "backbone", "checkpoint", "manifest", "raw data"]
    assert [s.get("dvc_stage") for s in result["steps"][:4]] == [
        "evaluate@simclr",
        "export@simclr",
        "pretrain@simclr",
        "shard",
    ]
    assert result["data_version"] == md5 and result["commit"] == parent and result["stale"] is False

    # every artifact kind is a valid starting point
    for start, kind in (
        ("models/simclr", "backbone"),
        ("runs/simclr/checkpoint.pt", "checkpoint"),
        ("data/shards", "manifest"),
        ("models/simclr/model_card.json", "model_card"),
    ):
        r = trace_json(ws, start, use_dvc=False)
        assert r["kind"] == kind and r["data_version"] == md5, start


def test_trace_a_backbone_copied_out_of_the_repository(pipeline, tmp_path, monkeypatch, capsys):
    ws = pipeline["ws"]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(ws / "models" / "simclr" / "backbone.safetensors", outside / "colleague.safetensors")
    code, out, _ = cli(["trace", "colleague.safetensors"], outside, monkeypatch, capsys)
    assert code == 0
    assert "not inside a pipeline workspace" in out
    assert "stage pretrain" in out and "stage shard" in out and "(record embedded in the child)" in out
    assert f"raw data version (data.dvc md5): {data_dvc_md5(ws)}" in out
    # the header holds content only: the run facts stay in the workspace's provenance/ ...
    assert "run facts (commit, time, flow run) not here" in out
    # ... where a trace run from the workspace finds them again by the file's sha256
    code, out, _ = cli(["trace", "--no-dvc", str(outside / "colleague.safetensors")], ws, monkeypatch, capsys)
    assert code == 0 and f"commit {tp.sh(['git', 'rev-parse', 'HEAD~1'], ws).stdout.strip()[:12]}" in out


def test_trace_bad_path_is_one_line_error(pipeline, tmp_path, monkeypatch, capsys):
    ws = pipeline["ws"]
    proc = tp.sslcook(["trace", "nope.json"], ws, check=False)  # once through the console entry point
    assert proc.returncode == 1 and proc.stderr.strip() == "error: nope.json: file not found"
    (tmp_path / "x.safetensors").write_bytes(b"not a safetensors file at all")
    (tmp_path / "plain.json").write_text('{"a": 1}')
    for bad, expected in (
        ("params.yaml", "unknown artifact type"),
        (tmp_path / "x.safetensors", "not a readable safetensors file"),
        (tmp_path / "plain.json", "no lineage record"),
    ):
        code, _, err = cli(["trace", str(bad)], ws, monkeypatch, capsys)
        assert code == 1 and err.strip().count("\n") == 0 and expected in err, err


def test_new_data_version_shows_in_trace_and_report_and_old_numbers_stay_in_git(
    pipeline, tmp_path, monkeypatch, capsys
):
    ws = copy_workspace(pipeline["ws"], tmp_path / "ws")
    old_commit, old_md5 = pipeline["commit"], data_dvc_md5(ws)
    old_metrics = json.loads((ws / "metrics" / "simclr.json").read_text())

    # ingest a changed dataset: more digits per class
    tp.write_params(ws, tp.tiny_params(train_per_class=12))
    assert cli(["data", "ingest"], ws, monkeypatch, capsys)[0] == 0
    new_md5 = data_dvc_md5(ws)
    assert new_md5 != old_md5

    # before re-running: the result is stale, and dvc status agrees
    stale = trace_json(ws, "metrics/simclr.json")
    assert stale["stale"] is True and stale["data_version"] == old_md5 and stale["data_version_now"] == new_md5
    assert any("data.dvc now" in reason for step in stale["steps"] for reason in step["stale"])
    assert stale["dvc_stale"] is True and "shard" in stale["dvc_status"]
    code, out, _ = cli(["trace", "--no-dvc", "metrics/simclr.json"], ws, monkeypatch, capsys)
    assert code == 0 and "STALE: made from data version" in out and "verdict: STALE" in out

    new_commit = tp.repro_and_commit(ws, "run 2: new data version")
    fresh = trace_json(ws, "metrics/simclr.json")
    assert fresh["data_version"] == new_md5 and fresh["stale"] is False and fresh["dvc_stale"] is False
    assert fresh["committed_in"] == new_commit
    assert new_md5 in (ws / "reports" / "summary.md").read_text()
    assert json.loads((ws / "metrics" / "simclr.json").read_text())["n_train"] == 120

    # the old numbers are one `git show` (or `git checkout && dvc checkout`) away
    old_file = json.loads(tp.sh(["git", "show", f"{old_commit}:metrics/simclr.json"], ws).stdout)
    assert old_file == old_metrics and old_file["data_version"] == old_md5
    assert old_md5 in tp.sh(["git", "show", f"{old_commit}:reports/summary.md"], ws).stdout
    diff = json.loads(tp.dvc(["metrics", "diff", old_commit, "--json"], ws).stdout)
    assert "metrics/simclr.json" in diff
    tp.sh(["git", "checkout", "-q", old_commit], ws)
    tp.dvc(["checkout", "-q"], ws)
    assert data_dvc_md5(ws) == old_md5
    assert len(list((ws / "data" / "raw" / "train").glob("*/*"))) == 100
