"""bench.seeds on the tiny pipeline: two seeds as DVC experiments in a scratch clone, the workspace untouched."""

from __future__ import annotations

import json

import pytest

import support.tiny_pipeline as tp


@pytest.mark.integration
@pytest.mark.slow  # two tiny pipeline runs (shard, SimCLR 1 epoch, export, evaluate, report): ~1-2 min on 2 cores
def test_seeds_bench_runs_each_seed_and_leaves_the_workspace_alone(tmp_path, tmp_path_factory):
    from bench import seeds

    ws = tp.shared_pipeline(tmp_path_factory)["ws"]
    before = {p: (ws / p).read_bytes() for p in ("params.yaml", "dvc.lock", "metrics/simclr.json")}
    head = tp.sh(["git", "rev-parse", "HEAD"], ws).stdout.strip()
    out = tmp_path / "results"
    assert (
        seeds.main(
            [
                "--seeds",
                "0",
                "1",
                "--workspace",
                str(ws),
                "--scratch",
                str(tmp_path),
                "--results-dir",
                str(out),
                "--tag",
                "tiny",
            ]
        )
        == 0
    )

    doc = json.loads((out / "seeds-tiny.json").read_text())
    committed = json.loads(before["metrics/simclr.json"])
    row = doc["rows"]["simclr"]
    probe = row["linear_probe_top1"]
    assert len(probe["values"]) == 2 and probe["single_run"] == committed["linear_probe_top1"]
    assert probe["mean"] == pytest.approx(sum(probe["values"]) / 2)
    assert probe["sd"] == pytest.approx(abs(probe["values"][0] - probe["values"][1]) / 2**0.5)
    # seed 0 is the committed run's seed, re-measured here (same machine: the same numbers, bit for bit)
    knn = max((k for k in row if k.startswith("knn_top1_k")), key=lambda k: int(k.rsplit("k", 1)[1]))
    assert row[knn]["values"][0] == committed[knn] and probe["values"][0] == committed["linear_probe_top1"]
    assert "baseline: raw pixels" in doc["rows"] and any(r.startswith("baseline: random init") for r in doc["rows"])
    losses = doc["epoch1_loss"]
    assert losses["0"]["simclr"] != losses["1"]["simclr"]  # another seed is another draw
    md = (out / "seeds-tiny.md").read_text()
    assert "| simclr | linear_probe_top1 |" in md and " +- " in md
    # the workspace: same params, lock, results and commit; no scratch clone left behind
    assert {p: (ws / p).read_bytes() for p in before} == before
    assert tp.sh(["git", "rev-parse", "HEAD"], ws).stdout.strip() == head
    assert not list(tmp_path.glob("sslcook-seeds-*"))


def test_isa_probe_repeats_bit_for_bit_and_sees_another_kernel_set(one_thread):
    """bench.isa's measurement: same process settings, same bits; ATen's scalar kernels, another trajectory."""
    import os
    import subprocess
    import sys

    import torch

    from bench import isa

    first, again = isa.child(2), isa.child(2)
    assert first == again and len(first["losses"]) == 2
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("this CPU already runs ATen's scalar kernels")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tp.PROJECT_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.isa", "--child", "--steps", "2"],
        cwd=tp.PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    scalar = json.loads(proc.stdout.strip().splitlines()[-1])
    assert scalar["aten_capability"] == "DEFAULT" and scalar["weights"] != first["weights"]
