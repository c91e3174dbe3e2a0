"""Kill -9 in the middle of pretraining, then `dvc repro`: it resumes and ends with exactly the weights of an
uninterrupted run (CPU, same seed), and the wandb run continues under the same id."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from support.tiny_ssl import add_dvc_pipeline, make_stage_workspace, write_tiny_shards

PROJECT = Path(__file__).resolve().parents[1]
# 4 epochs x 8 steps (64 images, batch 8), a resume checkpoint every 3 steps; num_workers=1 puts the decoding and
# augmentation in a loader worker, whose seeds must also follow the resumed position
PRETRAIN = {"epochs": 4, "batch_size": 8, "checkpoint_every_steps": 3, "num_workers": 1, "wandb": {"mode": "offline"}}
TOTAL_STEPS = 32


def stage_cmd(method: str) -> list[str]:
    return [sys.executable, "-m", "stages.pretrain", "--method", method]


def test_sigkill_at_a_random_step_then_rerun_equals_uninterrupted(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", train=64, test=32)
    env = dict(os.environ, PYTHONPATH=str(PROJECT), WANDB_DIR=str(tmp_path / "wandb"))
    kill_from = random.Random().randint(3, 18)
    print(f"killing once the resume checkpoint reaches step {kill_from}")

    ws = make_stage_workspace(tmp_path / "killed", shards, methods=["byol"], pretrain=PRETRAIN)
    state_dir = ws / ".sslcook" / "resume" / "byol"
    proc = subprocess.Popen(stage_cmd("byol"), cwd=ws, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen, killed_at, deadline = None, None, time.time() + 240
    try:
        while proc.poll() is None and time.time() < deadline:
            states = list(state_dir.glob("*.pt"))
            if states and states[0].stat().st_mtime_ns != seen:
                seen = states[0].stat().st_mtime_ns
                try:
                    step = torch.load(states[0], weights_only=True)["position"]["global_step"]
                except (OSError, RuntimeError, EOFError):
                    continue  # replaced while being read: look again
                if step >= kill_from:
                    proc.send_signal(signal.SIGKILL)
                    killed_at = step
                    break
            time.sleep(0.005)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed_at is not None, f"the run ended before step {kill_from}: {proc.stderr.read().decode()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    assert not (ws / "runs" / "byol" / "checkpoint.pt").exists()
    (state,) = state_dir.glob("*.pt")
    saved_step = torch.load(state, weights_only=True)["position"]["global_step"]
    assert killed_at <= saved_step < TOTAL_STEPS

    # `dvc repro` (which deletes the stage's outputs first, not the resume state): resumes and finishes
    add_dvc_pipeline(ws)
    rerun = subprocess.run(
        [sys.executable, "-m", "dvc", "repro"], cwd=ws, env=env, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert f"resuming from step {saved_step}/{TOTAL_STEPS}" in rerun.stdout + rerun.stderr
    metrics = json.loads((ws / "runs" / "byol" / "metrics.json").read_text())
    provenance = json.loads((ws / "provenance" / "pretrain" / "byol.json").read_text())
    assert provenance["resumed_from_step"] == saved_step and metrics["steps"] == TOTAL_STEPS
    assert not list(state_dir.glob("*.pt"))

    # an uninterrupted run of the same command in a twin workspace
    twin = make_stage_workspace(tmp_path / "twin", shards, methods=["byol"], pretrain=PRETRAIN)
    ref = subprocess.run(stage_cmd("byol"), cwd=twin, env=env, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]

    resumed = torch.load(ws / "runs" / "byol" / "checkpoint.pt", weights_only=True)
    uninterrupted = torch.load(twin / "runs" / "byol" / "checkpoint.pt", weights_only=True)
    assert resumed["method_state"].keys() == uninterrupted["method_state"].keys()
    for key, value in uninterrupted["method_state"].items():  # student, predictor and EMA teacher: bit-equal
        assert torch.equal(resumed["method_state"][key], value), key
    for a, b in zip(resumed["history"], uninterrupted["history"]):
        assert (a["loss"], a["rankme"]) == (b["loss"], b["rankme"])
    # the outputs hold content only (the resume step and timings are provenance): the same bytes, the same DVC hash
    # (history.tsv and the checkpoint's history may still differ in the last digit of a per-epoch diagnostic mean
    # of the epoch the run resumed in: the engine's running sums are restored as Python floats)
    for name in ("metrics.json", "lineage.json"):
        assert (ws / "runs" / "byol" / name).read_bytes() == (twin / "runs" / "byol" / name).read_bytes(), name

    # wandb: the resumed run continued the killed run's id (two offline segments of one run)
    run_id = provenance["wandb_run_id"]
    segments = sorted((tmp_path / "wandb" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(segments) == 2, sorted(p.name for p in (tmp_path / "wandb" / "wandb").iterdir())
