"""Scale-out from params: `pretrain.processes` / `pretrain.nodes` relaunch the stage through torchrun.

On CPU (gloo) with DINO on a 1-block ViT (LayerNorm only: no batch statistics) and deterministic views (full-image
crops, no photometric ops), one train shard split into interleaved halves: 2 ranks of 8 read exactly the 16
samples 1 process of 16 reads, so the 2-process run equals 1 process on the double batch. `dvc repro` with
`processes: 2` equals the hand torchrun run bit for bit; 2 "nodes" (two launchers, static rendezvous on
127.0.0.1) equal 1 node of 2; a rank SIGKILLed mid-run, then `dvc repro`, resumes and ends with the same weights.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from support.tiny_ssl import TINY_VIT, add_dvc_pipeline, make_stage_workspace, write_tiny_shards

PROJECT = Path(__file__).resolve().parents[1]
METHOD = "dino"
# 3 epochs x 4 steps (64 images, 2 ranks x 8), a resume checkpoint every 2 steps, samples in shard order
PRETRAIN = {
    "epochs": 3,
    "batch_size": 8,
    "shuffle_buffer": 0,
    "num_workers": 0,
    "checkpoint_every_steps": 2,
    "processes": 2,
}
TOTAL_STEPS = 12
VIEWS = {
    "n_local": 0,
    "global_scale": [1.0, 1.0],
    "crop_ratio": [1.0, 1.0],
    "affine_degrees": 0,
    "affine_translate": 0,
    "flip_prob": 0.0,
    "jitter_prob": 0.0,
    "grayscale_prob": 0.0,
    "blur_probs": [0, 0, 0],
    "solarize_probs": [0, 0, 0],
}
DINO = {"augment": VIEWS, "backbone": TINY_VIT}


def _env(tmp_path: Path, **extra: str) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK")
    }
    return dict(env, PYTHONPATH=str(PROJECT), OMP_NUM_THREADS="1", WANDB_DIR=str(tmp_path / "wandb"), **extra)


def _workspace(dest: Path, shards: Path, **pretrain) -> Path:
    return make_stage_workspace(
        dest, shards, methods=[METHOD], pretrain={**PRETRAIN, **pretrain}, method_overrides={METHOD: DINO}
    )


def _stage(ws: Path, env: dict, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stages.pretrain", "--method", METHOD],
        cwd=ws,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _weights(ws: Path) -> dict:
    return torch.load(ws / "runs" / METHOD / "checkpoint.pt", weights_only=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("scale") / "shards", train=64, test=32, shard_size=64)


@pytest.fixture(scope="module")
def two_process_repro(shards, tmp_path_factory) -> Path:
    """`dvc repro` with pretrain.processes: 2: the stage launches itself through torchrun."""
    tmp = tmp_path_factory.mktemp("repro")
    ws = add_dvc_pipeline(_workspace(tmp / "ws", shards))
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "repro"], cwd=ws, env=_env(tmp), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 process(es) x 1 node(s) through torchrun" in proc.stderr + proc.stdout
    return ws


@pytest.mark.integration
@pytest.mark.slow
def test_dvc_repro_with_two_processes_equals_torchrun_and_one_process_on_the_double_batch(
    two_process_repro, shards, tmp_path
):
    ws = two_process_repro
    metrics = json.loads((ws / "runs" / METHOD / "metrics.json").read_text())
    lineage = json.loads((ws / "runs" / METHOD / "lineage.json").read_text())
    assert metrics["world_size"] == 2 and metrics["effective_batch"] == 16 and metrics["steps"] == TOTAL_STEPS
    assert lineage["params"]["world_size"] == 2 and lineage["params"]["nodes"] == 1
    assert lineage["params"]["effective_batch"] == 16
    repro = _weights(ws)

    # the hand-typed torchrun of the same stage (processes: 1 in params: torchrun decides)
    hand = _workspace(tmp_path / "hand", shards, processes=1)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=2",
        "-m",
        "stages.pretrain",
        "--method",
        METHOD,
    ]
    proc = subprocess.run(cmd, cwd=hand, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    by_hand = _weights(hand)
    for key, value in by_hand["method_state"].items():
        assert torch.equal(repro["method_state"][key], value), key

    # one process on the double batch: the same 16 samples per step, the gradient of the same mean loss
    single = _workspace(tmp_path / "single", shards, processes=1, batch_size=16)
    proc = _stage(single, _env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "through torchrun" not in proc.stderr
    one = _weights(single)
    assert one["summary"]["world_size"] == 1 and one["summary"]["effective_batch"] == 16
    for key, value in one["method_state"].items():
        got = repro["method_state"][key]
        if key.endswith("attn.qkv.bias"):
            # the key bias shifts every logit of a query's softmax equally: its gradient is 0 in exact arithmetic,
            # so what it holds is rounding noise that AdamW scales up to a full step; the rest must agree
            dim = TINY_VIT["embed_dim"]
            got, value = torch.cat([got[:dim], got[2 * dim :]]), torch.cat([value[:dim], value[2 * dim :]])
        torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6, msg=key)
    first = "backbone.blocks.0.attn.qkv.weight"
    start = _initial_state(single)
    assert first in start and not torch.allclose(start[first], one["method_state"][first])  # the weights moved


def _initial_state(ws: Path) -> dict:
    """The method's weights at step 0 (built as the stage builds them)."""
    from stages.pretrain import Run
    from stages.workspace.config import load_params

    os.environ.pop("WORLD_SIZE", None)
    method, _ = Run(load_params(ws / "params.yaml"), METHOD, ws, 1).build()
    return method.state_dict()


@pytest.mark.integration
@pytest.mark.slow
def test_two_nodes_on_one_machine_equal_one_node(two_process_repro, shards, tmp_path):
    port = _free_port()
    ws = _workspace(tmp_path / "nodes", shards, processes=1, nodes=2, rdzv_endpoint=f"127.0.0.1:{port}")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "stages.pretrain", "--method", METHOD],
            cwd=ws,
            env=_env(tmp_path, NODE_RANK=str(node)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "1 process(es) x 2 node(s) through torchrun" in outs[0][1]
    two_nodes = _weights(ws)
    assert two_nodes["lineage"]["params"]["nodes"] == 2 and two_nodes["summary"]["world_size"] == 2
    one_node = _weights(two_process_repro)
    for key, value in one_node["method_state"].items():
        assert torch.equal(two_nodes["method_state"][key], value), key


def _worker_pids(launcher: int) -> dict[int, int]:
    """{RANK: pid} of the torchrun workers under ``launcher`` (their environment names their rank)."""
    import psutil

    ranks = {}
    for child in psutil.Process(launcher).children(recursive=True):
        try:
            env = child.environ()
        except (psutil.Error, OSError):
            continue
        if "RANK" in env and "TORCHELASTIC_RUN_ID" in env:
            ranks[int(env["RANK"])] = child.pid
    return ranks


@pytest.mark.integration
@pytest.mark.slow
def test_sigkill_of_one_rank_then_dvc_repro_resumes_with_identical_weights(two_process_repro, shards, tmp_path):
    ws = add_dvc_pipeline(_workspace(tmp_path / "killed", shards))
    env = _env(tmp_path)
    state_dir = ws / ".sslcook" / "resume" / METHOD
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.pretrain", "--method", METHOD],
        cwd=ws,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    killed_at, deadline = None, time.time() + 240
    try:
        while proc.poll() is None and time.time() < deadline and killed_at is None:
            for state in state_dir.glob("*.pt"):
                try:
                    step = torch.load(state, weights_only=True)["position"]["global_step"]
                except (OSError, RuntimeError, EOFError):
                    continue
                ranks = _worker_pids(proc.pid)
                if step >= 2 and 1 in ranks:
                    os.kill(ranks[1], signal.SIGKILL)
                    killed_at = step
            time.sleep(0.005)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed_at is not None, "the run ended before a resume checkpoint was seen"
    assert proc.returncode != 0
    # the launcher names every failed worker (the order in which it sees them varies): the SIGKILLed rank among them
    assert "rank 1 killed by signal 9" in err, err[-3000:]
    assert not (ws / "runs" / METHOD / "checkpoint.pt").exists()  # rank 0 was stopped too: no partial output
    (state,) = state_dir.glob("*.pt")
    saved = torch.load(state, weights_only=True)["position"]["global_step"]
    assert killed_at <= saved < TOTAL_STEPS

    rerun = subprocess.run(
        [sys.executable, "-m", "dvc", "repro"], cwd=ws, env=env, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert f"resuming from step {saved}/{TOTAL_STEPS}" in rerun.stdout + rerun.stderr
    resumed = _weights(ws)
    # the step a run resumed from is a fact of that run: provenance, not the (content-stable) checkpoint
    provenance = json.loads((ws / "provenance" / "pretrain" / f"{METHOD}.json").read_text())
    assert provenance["resumed_from_step"] == saved
    for key, value in _weights(two_process_repro)["method_state"].items():
        assert torch.equal(resumed["method_state"][key], value), key


def test_more_processes_than_gpus_is_a_one_line_error_naming_the_key(monkeypatch):
    from stages.workspace.common import ConfigError
    from stages.workspace.config.pretrain import PretrainConfig
    from stages.workspace.launch import resolve_layout, torchrun_args

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_layout(PretrainConfig(processes="auto"), METHOD).processes == 2
    with pytest.raises(
        ConfigError,
        match=r"^params.yaml: pretrain.processes: 4 processes per node need 4 GPUs, "
        r"2 visible$",
    ):
        resolve_layout(PretrainConfig(processes=4), METHOD)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert resolve_layout(PretrainConfig(processes="auto"), METHOD).world_size == 1  # CPU: one process
    with pytest.raises(ConfigError, match="pretrain.rdzv_endpoint: needed when pretrain.nodes is 2"):
        resolve_layout(PretrainConfig(nodes=2), METHOD)
    with pytest.raises(ConfigError, match="pretrain.node_rank: 2 is outside 0..1"):
        resolve_layout(PretrainConfig(nodes=2, node_rank=2, rdzv_endpoint="10.0.0.1:29500"), METHOD)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29501")
    monkeypatch.setenv("NODE_RANK", "1")
    layout = resolve_layout(PretrainConfig(nodes=2, processes=4), METHOD)
    assert torchrun_args(layout, ["-m", "x"]) == [
        "--nnodes=2",
        "--nproc_per_node=4",
        "--max_restarts=0",
        "--rdzv_backend=static",
        "--rdzv_endpoint=10.0.0.1:29501",
        "--node_rank=1",
        f"--rdzv_id=sslcook-{METHOD}",
        "-m",
        "x",
    ]


def test_launch_keys_are_validated(tmp_path):
    import yaml

    from stages.workspace.common import ConfigError
    from stages.workspace.config import load_params
    from stages.workspace.config.pretrain import resolve_method

    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    for key, value, message in (
        ("processes", 0, "pretrain.processes: Value error, expected auto or an integer"),
        ("nodes", 0, "pretrain.nodes: Input should be greater than or equal to 1"),
        ("rdzv_endpoint", "node0", "pretrain.rdzv_endpoint: String should match"),
    ):
        bad = {**params, "pretrain": {**params["pretrain"], key: value}}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
        with pytest.raises(ConfigError, match=message):
            resolve_method(load_params(tmp_path / "params.yaml"), "simclr")


@pytest.mark.integration
@pytest.mark.slow
def test_export_and_evaluate_after_a_ddp_pretrain_run_in_one_process(two_process_repro, tmp_path):
    ws = tmp_path / "eval"
    import shutil

    shutil.copytree(two_process_repro, ws, ignore=shutil.ignore_patterns(".dvc", ".git", "dvc.yaml", "dvc.lock"))
    env = _env(tmp_path)
    for stage in ("export", "evaluate"):
        proc = subprocess.run(
            [sys.executable, "-m", f"stages.{stage}", "--method", METHOD],
            cwd=ws,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "through torchrun" not in proc.stderr and "process group" not in proc.stderr
    metrics = json.loads((ws / "metrics" / f"{METHOD}.json").read_text())
    assert 0.0 <= metrics["linear_probe_top1"] <= 1.0 and 0.0 <= metrics["knn_top1_k20"] <= 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluation_runs_on_cuda_and_agrees_with_cpu():
    from ssl_models.backbones import build_backbone
    from ssl_models.evaluation import extract_features, knn_evaluate, linear_probe
    from stages.evaluate import pick_device

    device = pick_device("auto")
    assert device.type == "cuda"
    torch.manual_seed(0)
    net = build_backbone("resnet18", in_chans=1, small_image=True, width=4, image_size=28)
    images = torch.randint(0, 256, (96, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(96) % 4
    on_gpu = extract_features(net, images, device=device, progress=False)
    on_cpu = extract_features(net, images, device="cpu", progress=False)
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-3, atol=1e-3)
    train, test = slice(0, 64), slice(64, 96)
    gpu_knn = knn_evaluate(
        on_cpu[train], labels[train], on_cpu[test], labels[test], ks=[5], num_classes=4, device=device
    )
    cpu_knn = knn_evaluate(on_cpu[train], labels[train], on_cpu[test], labels[test], ks=[5], num_classes=4)
    assert gpu_knn == pytest.approx(cpu_knn)
    probe = linear_probe(
        on_cpu[train], labels[train], on_cpu[test], labels[test], num_classes=4, epochs=5, device=device
    )
    assert 0.0 <= probe["top1"] <= 1.0
