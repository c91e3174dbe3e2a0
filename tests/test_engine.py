"""The training engine on tiny synthetic data: hooks, resume equality, non-finite loss, collapse, kNN monitor."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from ssl_models import engine
from ssl_models.engine import (
    CollapseError,
    DataStream,
    KnnMonitor,
    MonitorConfig,
    NonFiniteLossError,
    Runtime,
    TrainConfig,
    Trainer,
    load_state,
)
from support.tiny_ssl import CollapsingMethod, SyntheticLoader, TinyBackbone, TinyMethod, toy_images

CPU = Runtime(device=torch.device("cpu"))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def build(seed=0, method_cls=TinyMethod, **kw):
    engine.seed_everything(seed)
    method = method_cls(TinyBackbone(), **kw)
    opt = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
    return method, opt, sched


def loader_factory(images, labels, batch_size=8, seed=0, **kw):
    return lambda epoch: SyntheticLoader(images, labels, batch_size=batch_size, seed=seed, epoch=epoch, **kw)


def fit(tmp_path, *, epochs=3, every=0, seed=0, method_cls=TinyMethod, monitor=None, method_kw=None, **kw):
    images, labels = toy_images()
    method, opt, sched = build(seed, method_cls, **(method_kw or {}))
    cfg = TrainConfig(
        epochs=epochs,
        steps_per_epoch=len(images) // 8,
        seed=seed,
        checkpoint_every_steps=every,
        progress=False,
        monitor=monitor or MonitorConfig(),
        **kw,
    )
    trainer = Trainer(
        method,
        opt,
        scheduler=sched,
        config=cfg,
        make_loader=loader_factory(images, labels, seed=seed),
        runtime=CPU,
        checkpoint_path=tmp_path / "state.pt",
    )
    return trainer, method


def test_fit_runs_hooks_and_records_history(tmp_path):
    trainer, method = fit(tmp_path, epochs=2)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    result = trainer.fit()
    assert method.calls == ["start:12"]
    assert [r["epoch"] for r in result.history] == [1, 2]
    rec = result.history[-1]
    for key in ("loss", "lr", "emb_std", "rankme", "images_per_s", "pos_similarity"):
        assert math.isfinite(rec[key]), key
    assert rec["lr"] == pytest.approx(0.1 / (1 + 0.1 * 12))
    assert 0 < rec["emb_std"] <= 1 and 1 <= rec["rankme"] <= 8
    # the EMA teacher moved (after_step ran) and the student learned
    assert not torch.equal(before["teacher.0.weight"], method.teacher[0].weight)
    assert not torch.equal(before["backbone.net.0.weight"], method.backbone.net[0].weight)
    state = load_state(tmp_path / "state.pt")
    assert state["position"] == {
        "epoch": 2,
        "step_in_epoch": 0,
        "global_step": 12,
        "steps_per_epoch": 6,
        "world_size": 1,
    }
    assert result.summary["epochs"] == 2 and result.summary["steps"] == 12


def test_data_stream_is_independent_of_model_randomness():
    images, labels = toy_images()
    make = loader_factory(images, labels)

    def batches(consume_between: bool):
        torch.manual_seed(999)
        stream = DataStream(make(0), seed=5)
        out = []
        for _ in range(3):
            out.append(next(stream)[0][0])
            if consume_between:  # what a model's dropout or MAE masking does between batches
                torch.rand(100), np.random.rand(3), random.random()
        return out

    a, b = batches(False), batches(True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # the stream also leaves the global generator where the model expects it
    torch.manual_seed(1)
    expected = torch.rand(1)
    torch.manual_seed(1)
    stream = DataStream(make(0), seed=5)
    next(stream)
    assert torch.equal(torch.rand(1), expected)


class _Crash(Exception):
    pass


@pytest.mark.parametrize("crash_at", [4, 9])  # mid-epoch (after the step-3 checkpoint) and early in epoch 2
def test_resume_after_crash_equals_uninterrupted(tmp_path, crash_at):
    ref_trainer, ref = fit(tmp_path / "ref", every=3)
    ref_result = ref_trainer.fit()

    trainer, _ = fit(tmp_path / "run", every=3)
    original = trainer.make_loader

    def crashing(epoch):
        inner = original(epoch)

        def gen():
            for i, batch in enumerate(inner):
                if epoch * 6 + i == crash_at:
                    raise _Crash()
                yield batch

        return gen()

    trainer.make_loader = crashing
    with pytest.raises(_Crash):
        trainer.fit()
    saved = load_state(tmp_path / "run" / "state.pt")["position"]["global_step"]
    assert 0 < saved <= crash_at
    # consume global randomness as a fresh process would differ: the checkpoint's RNG state must win
    torch.rand(17)
    resumed_trainer, resumed = fit(tmp_path / "run", every=3, seed=0)
    result = resumed_trainer.fit()
    assert result.resumed_from_step == saved
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    for k in ("loss", "emb_std", "rankme", "pos_similarity"):
        assert [r[k] for r in result.history] == [r[k] for r in ref_result.history], k


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    trainer, method = fit(tmp_path, epochs=3, every=4, method_kw={"nan_at_step": 10})
    with pytest.raises(NonFiniteLossError) as err:
        trainer.fit()
    assert err.value.step == 10 and err.value.epoch == 1
    assert "step 10" in str(err.value) and "state.pt" in str(err.value)
    state = load_state(tmp_path / "state.pt")
    assert state["position"]["global_step"] == 8  # the last checkpoint before the bad step
    # the weights were not updated by the bad step: all finite
    assert all(torch.isfinite(p).all() for p in method.parameters())


def test_non_finite_loss_before_any_checkpoint(tmp_path):
    trainer, _ = fit(tmp_path, epochs=1, method_kw={"nan_at_step": 0})
    with pytest.raises(NonFiniteLossError, match="at step 0 .*no checkpoint written yet"):
        trainer.fit()
    assert not (tmp_path / "state.pt").exists()


def test_collapse_is_reported_and_optionally_fatal(tmp_path, capsys):
    trainer, _ = fit(tmp_path / "warn", epochs=2, method_cls=CollapsingMethod)
    result = trainer.fit()
    rec = result.history[-1]
    assert rec["collapsed"] and "RankMe" in rec["collapse_reason"] and "std" in rec["collapse_reason"]
    assert result.summary["collapsed"] is True
    assert "COLLAPSE" in capsys.readouterr().err

    trainer, _ = fit(tmp_path / "fatal", epochs=3, method_cls=CollapsingMethod, monitor=MonitorConfig(fatal=True))
    with pytest.raises(CollapseError, match="after epoch 1"):
        trainer.fit()
    # the healthy tiny method is not flagged
    trainer, _ = fit(tmp_path / "ok", epochs=1)
    assert trainer.fit().history[-1]["collapsed"] is False


def test_loss_stuck_at_uniform_level_is_collapse():
    monitor = MonitorConfig()
    k = 4096
    assert detect(monitor, loss=math.log(k) * 1.001, level=math.log(k))
    assert not detect(monitor, loss=math.log(k) * 0.8, level=math.log(k))


def detect(monitor, loss, level):
    return engine.detect_collapse({"loss": loss, "emb_std": 0.3, "rankme": 10.0}, monitor, dim=8, loss_level=level)


def test_online_knn_every_k_epochs(tmp_path):
    images, labels = toy_images(64)
    knn = KnnMonitor(images[:48], labels[:48], images[48:], labels[48:], transform=lambda x: x, every_epochs=2, k=5)
    method, opt, sched = build()
    cfg = TrainConfig(epochs=3, steps_per_epoch=6, progress=False)
    trainer = Trainer(
        method,
        opt,
        scheduler=sched,
        config=cfg,
        make_loader=loader_factory(images[:48], labels[:48]),
        runtime=CPU,
        knn=knn,
    )
    hist = trainer.fit().history
    assert ["knn_top1" in r for r in hist] == [False, True, True]  # every 2 epochs and after the last
    assert hist[1]["knn_top1"] >= 0.75  # two blob positions: trivially separable
    assert method.training


def test_fp16_on_cpu_is_refused():
    method, opt, _ = build()
    with pytest.raises(engine.TrainingError, match="fp16"):
        Trainer(
            method,
            opt,
            config=TrainConfig(epochs=1, steps_per_epoch=1, precision="fp16"),
            make_loader=lambda e: [],
            runtime=CPU,
        )


def test_grad_clip_bounds_the_update(tmp_path):
    images, labels = toy_images()
    deltas = {}
    for clip in (None, 1e-3):
        method, _, _ = build()
        opt = torch.optim.SGD(method.parameters(), lr=1.0)
        before = method.projector[0].weight.clone()
        cfg = TrainConfig(epochs=1, steps_per_epoch=1, grad_clip=clip, progress=False)
        Trainer(method, opt, config=cfg, make_loader=loader_factory(images, labels), runtime=CPU).fit()
        deltas[clip] = (method.projector[0].weight - before).norm()
    assert deltas[1e-3] <= 1e-3 + 1e-7 < deltas[None]


def test_bf16_autocast_path_runs_on_cpu(tmp_path):
    # the CUDA default (bf16 autocast) exercised on CPU: same loop, finite loss, weights updated in fp32
    trainer, method = fit(tmp_path, epochs=1, precision="bf16")
    before = method.backbone.net[0].weight.clone()
    rec = trainer.fit().history[-1]
    assert math.isfinite(rec["loss"]) and method.backbone.net[0].weight.dtype == torch.float32
    assert not torch.equal(before, method.backbone.net[0].weight)
