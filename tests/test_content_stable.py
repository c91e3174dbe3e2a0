"""Content-stable outputs: a stage re-run on unchanged inputs writes the same bytes, so nothing goes stale.

The run's volatile facts (time, commit, flow run, durations) live in provenance/, which no stage hashes, and
`sslcook trace` still prints them for every step.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import yaml

import support.tiny_pipeline as tp

STAGES = ("shard", "pretrain@simclr", "export@simclr", "evaluate@simclr", "report")
# the report shows the runs' timings (read from provenance/pretrain): the only run facts in a stage output
TIMED_OUTS = ("reports/summary.md", "reports/summary.html")

pytestmark = pytest.mark.integration  # re-runs the stages of a real DVC pipeline


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A private copy of the tiny pipeline's workspace after run 1 (these tests re-run its stages)."""
    src = tp.shared_pipeline(tmp_path_factory)["ws"]
    return shutil.copytree(src, tmp_path_factory.mktemp("stable") / "ws", symlinks=True)


def lock_outs(ws) -> dict[str, str]:
    """Every out of every stage in dvc.lock -> its md5 (what a downstream dep would hash)."""
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for st in lock["stages"].values() for o in st.get("outs") or []}


def untimed(path) -> str:
    """A report file with its pretraining time and images/s cells blanked."""
    text = path.read_text()
    if path.suffix == ".html":  # figures are compared through reports/figures; the table cells are masked
        text = re.sub(r"data:image/png;base64,[^'\"]*", "", text)
        return re.sub(r"<td>[\d.]+ (?:s|min)</td>\s*<td>\d+</td>", "<td>T</td><td>T</td>", text)
    return re.sub(r"\| [\d.]+ (?:s|min) \| \d+ \|", "| T | T |", text)


def test_every_stage_rerun_on_unchanged_inputs_keeps_its_hash_and_dvc_status(ws):
    before = lock_outs(ws)
    provenance_before = {p: json.loads((ws / p).read_text()) for p in before if p.startswith("provenance/")}
    assert set(provenance_before) == {
        "provenance/shard.json",
        "provenance/pretrain/simclr.json",
        "provenance/export/simclr.json",
        "provenance/evaluate/simclr.json",
        "provenance/report.json",
    }
    timed_before = {p: untimed(ws / p) for p in TIMED_OUTS}
    shard_manifest = (ws / "data" / "shards" / "manifest.json").read_bytes()
    for stage in STAGES:
        tp.dvc(["repro", "-q", "--force", "-s", stage], ws)
        after = lock_outs(ws)
        changed = sorted(
            p for p in before if before[p] != after.get(p) and not p.startswith("provenance/") and p not in TIMED_OUTS
        )
        assert changed == [], f"re-running {stage} changed {changed}"
        status = json.loads(tp.dvc(["status", "--json"], ws).stdout or "{}")
        assert status == {}, f"after re-running {stage}: {status}"
    assert (ws / "data" / "shards" / "manifest.json").read_bytes() == shard_manifest
    # the report differs at most in the timing cells, which are facts of the (re-)run of pretrain
    assert {p: untimed(ws / p) for p in TIMED_OUTS} == timed_before
    # ... and every stage did run again: each wrote a fresh provenance file naming the same artifact
    for path, old in provenance_before.items():
        new = json.loads((ws / path).read_text())
        assert new["artifact"] == old["artifact"], path
        assert set(new["git"]) == {"commit", "dirty"} and new["created_at"] and "prefect_flow_run_id" in new
    pretrain = json.loads((ws / "provenance/pretrain/simclr.json").read_text())
    assert pretrain["train_seconds"] > 0 and pretrain["epochs"][0]["epoch_seconds"] > 0
    assert json.loads((ws / "provenance/evaluate/simclr.json").read_text())["seconds"] > 0


def test_no_run_fact_in_a_hashed_output(ws):
    """No time, commit or run id in what later stages hash (the records are content only)."""
    manifest = json.loads((ws / "data" / "shards" / "manifest.json").read_text())
    metrics = json.loads((ws / "metrics" / "simclr.json").read_text())
    lineage = json.loads((ws / "runs" / "simclr" / "lineage.json").read_text())
    for record in (manifest["lineage"], metrics["lineage"], lineage):
        assert not {"created_at", "git", "prefect_flow_run_id", "wandb_run_id"} & set(record), record.keys()
    assert "eval_seconds" not in metrics and "train_seconds" not in metrics["pretraining"]
    assert not {"train_seconds", "images_per_s"} & set(json.loads((ws / "runs/simclr/metrics.json").read_text()))
    header = (ws / "runs" / "simclr" / "history.tsv").read_text().splitlines()[0].split("\t")
    assert "epoch_seconds" not in header and "images_per_s" not in header


def test_trace_still_prints_commit_time_and_flow_run_of_every_step(ws, monkeypatch):
    from flows.trace import render, trace

    monkeypatch.setenv("SSLCOOK_WORKSPACE", str(ws))
    result = trace(ws / "metrics" / "simclr.json", use_dvc=False)
    made = [s for s in result["steps"] if s["kind"] != "raw data"]
    assert [s["kind"] for s in made] == ["metrics", "backbone", "checkpoint", "manifest"]
    # the stages ran before the commit of run 1 (HEAD~1) or, re-run by the test above, at HEAD
    commits = {tp.sh(["git", "rev-parse", rev], ws).stdout.strip() for rev in ("HEAD", "HEAD~1")}
    out = render(result)
    for step in made:
        facts = step["provenance"]
        assert facts["git"]["commit"] in commits and facts["created_at"], step["path"]
        assert f"made {facts['created_at']}, commit {facts['git']['commit'][:12]}" in out
    assert out.count("flow run -, data version") == 4
    assert result["commit"] in commits and result["made"]


def test_two_exports_of_one_backbone_are_byte_identical(tmp_path):
    """safetensors writes its header from a hash map (order varies per process): save_backbone sorts it."""
    code = (
        "import sys, torch; from ssl_models.backbones import build_backbone; from ssl_models.io import "
        "save_backbone; torch.manual_seed(0); b = build_backbone(name='resnet18', small_image=True, width=4, "
        "in_chans=1); save_backbone(sys.argv[1], b, {'method': 'simclr', 'lineage': {'z': 1, 'a': [1, 2]}, "
        "'input': {'image_size': 28}, 'family': 'x'})"
    )
    files = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for f in files:
        subprocess.run([sys.executable, "-c", code, str(f)], check=True, cwd=tp.PROJECT_ROOT)
    assert len({f.read_bytes() for f in files}) == 1
    from ssl_models.io import load_backbone

    assert load_backbone(files[0]).export_header["lineage"] == {"z": 1, "a": [1, 2]}
