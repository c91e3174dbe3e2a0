"""Distributed pretraining on CPU (gloo): 2 processes equal 1 process on the double batch; torchrun runs the stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssl_models import engine
from ssl_models.optim import build_optimizer, build_scheduler, scaled_lr
from support.dist_utils import run_distributed
from support.tiny_ssl import (
    SyntheticLoader,
    TinyBackbone,
    TinyMethod,
    make_stage_workspace,
    toy_images,
    write_tiny_shards,
)

PROJECT = Path(__file__).resolve().parents[1]
PER_RANK_BATCH = 8
RECIPE = {"name": "sgd", "base_lr": 0.8, "momentum": 0.9, "weight_decay": 1e-4}


def train(rank: int, world_size: int, batch_size: int, contrastive: bool) -> dict:
    """Build, train 2 epochs with the engine, return the final weights (identical code for every layout)."""
    engine.seed_everything(0)
    method = TinyMethod(TinyBackbone(), dropout=0.0, contrastive=contrastive)
    optimizer = build_optimizer(method, RECIPE, effective_batch=batch_size * world_size)  # the lr rule
    images, labels = toy_images(48)
    steps = len(images) // (batch_size * world_size)
    scheduler = build_scheduler(optimizer, total_steps=2 * steps, warmup_steps=2)
    runtime = engine.Runtime(device=torch.device("cpu"), rank=rank, world_size=world_size)
    trainer = engine.Trainer(
        method,
        optimizer,
        scheduler=scheduler,
        runtime=runtime,
        config=engine.TrainConfig(epochs=2, steps_per_epoch=steps, progress=False),
        make_loader=lambda epoch: SyntheticLoader(
            images,
            labels,
            batch_size=batch_size,
            seed=0,
            epoch=epoch,
            rank=rank,
            world_size=world_size,
            global_noise=False,
        ),
    )
    history = trainer.fit().history
    return {
        "state": {k: v.clone() for k, v in method.state_dict().items()},
        "loss": torch.tensor([r["loss"] for r in history]),
        "lr": optimizer.param_groups[0]["lr"],
    }


def ddp_worker(rank: int, world_size: int) -> dict:
    return {case: train(rank, world_size, PER_RANK_BATCH, contrastive) for case, contrastive in CASES.items()}


CASES = {"per_sample_loss": False, "gathered_loss": True}


def test_two_processes_equal_one_process_on_the_double_batch():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the spawned ranks (dist_utils): same kernels, same rounding
    try:
        _check_equality()
    finally:
        torch.set_num_threads(threads)


def _check_equality():
    ranks = run_distributed(ddp_worker, world_size=2)
    for case, contrastive in CASES.items():
        single = train(0, 1, 2 * PER_RANK_BATCH, contrastive)
        for r in ranks:  # every rank holds the same weights, and they are the single process's
            assert r[case]["lr"] == pytest.approx(single["lr"])
            for k, v in single["state"].items():
                torch.testing.assert_close(r[case]["state"][k], v, rtol=1e-5, atol=1e-6, msg=f"{case}: {k}")
        torch.testing.assert_close(ranks[0][case]["loss"], single["loss"], rtol=1e-5, atol=1e-6)
    # the weights moved: equality is not the trivial one of two untrained models
    engine.seed_everything(0)
    untrained = TinyMethod(TinyBackbone(), dropout=0.0).state_dict()
    assert not torch.allclose(untrained["backbone.net.0.weight"], single["state"]["backbone.net.0.weight"])


def test_torchrun_runs_the_stage_with_two_processes(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", train=64, test=32)
    ws = make_stage_workspace(tmp_path / "ws", shards, pretrain={"epochs": 2})
    env = dict(os.environ, PYTHONPATH=str(PROJECT), OMP_NUM_THREADS="1")
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
        "simclr",
    ]
    proc = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("pretrain simclr: 2 epochs") == 1  # rank 0 alone reports and writes
    metrics = json.loads((ws / "runs" / "simclr" / "metrics.json").read_text())
    config = json.loads((ws / "runs" / "simclr" / "config.json").read_text())
    assert metrics["world_size"] == 2 and metrics["effective_batch"] == 32
    assert config["steps_per_epoch"] == 2  # 64 images / (16 per rank x 2 ranks)
    recipe = config["optimizer"]  # the lr rule sees the global batch
    assert config["lr"] == pytest.approx(scaled_lr(recipe["base_lr"], 32, recipe["lr_scaling"]))
    assert config["lr"] != pytest.approx(scaled_lr(recipe["base_lr"], 16, recipe["lr_scaling"]))
    ckpt = torch.load(ws / "runs" / "simclr" / "checkpoint.pt", weights_only=True)
    assert ckpt["summary"]["world_size"] == 2


class _RecordingViews:
    """The simclr views, keeping a copy of every first view batch the Trainer asks for."""

    def __init__(self):
        from ssl_models.augment import build_views

        self.views = build_views("simclr", image_size=12, channels=1, flip_prob=0.5)
        self.made: list[torch.Tensor] = []

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        out = self.views(images, generator)
        self.made.append(out[0].clone())
        return out


def _views_run(rank: int, world_size: int) -> dict:
    """Two steps on the same uint8 batch on every rank: the views differ only through the rank's generator."""
    engine.seed_everything(0)
    images = torch.randint(0, 256, (8, 1, 12, 12), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    batches = [(images, torch.zeros(8, dtype=torch.long))] * 2
    method = TinyMethod(TinyBackbone(), dropout=0.0)
    recording = _RecordingViews()
    trainer = engine.Trainer(
        method,
        torch.optim.SGD(method.parameters(), lr=0.1),
        runtime=engine.Runtime(device=torch.device("cpu"), rank=rank, world_size=world_size),
        config=engine.TrainConfig(epochs=1, steps_per_epoch=2, seed=7, progress=False),
        make_loader=lambda epoch: batches,
        views=recording,
    )
    trainer.fit()
    return {"views": torch.stack(recording.made)}


def test_ddp_ranks_draw_different_view_parameters_from_the_same_images():
    ranks = run_distributed(_views_run, world_size=2)
    first, second = ranks[0]["views"], ranks[1]["views"]
    assert first.shape == second.shape == (2, 8, 1, 12, 12)
    for step in range(2):  # every step, each image's view differs between the ranks
        assert all(not torch.allclose(a, b) for a, b in zip(first[step], second[step]))
    assert not torch.allclose(first[0], first[1])  # and between the steps of one rank
    # a rank's views are a function of (seed, epoch, step, rank): a 1-process run as rank 0 draws rank 0's
    alone = _views_run(0, 1)["views"]
    torch.testing.assert_close(alone, first, rtol=0, atol=0)
