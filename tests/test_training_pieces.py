"""Optimizers, schedules, heads and collapse monitors shared by every method."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ssl_models import build_backbone, build_optimizer, build_scheduler, monitors, scaled_lr
from ssl_models.heads import DINOHead, EMATeacher, Prototypes, build_mlp
from ssl_models.optim import LARS, param_groups, warmup_cosine


def test_lr_scaling_rules():
    assert scaled_lr(0.3, 512) == pytest.approx(0.6)
    assert scaled_lr(0.3, 1024, "sqrt") == pytest.approx(0.6)
    assert scaled_lr(0.3, 64, "none") == 0.3
    with pytest.raises(ValueError, match="lr_scaling"):
        scaled_lr(0.3, 64, "cubic")


def test_biases_norms_and_tokens_are_not_decayed():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [(8, 4), (2, 8)]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0 and no_decay["lars_exclude"]
    vit = build_backbone("vit_tiny", image_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2)
    groups = param_groups(vit, 0.05)
    assert any(p is vit.cls_token for p in groups[1]["params"])
    assert all(p.ndim >= 2 for p in groups[0]["params"])


def test_lars_step_matches_its_equation():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, 3))
    b = nn.Parameter(torch.randn(5))
    w.grad, b.grad = torch.randn(5, 3), torch.randn(5)
    w0, b0, gw, gb = w.detach().clone(), b.detach().clone(), w.grad.clone(), b.grad.clone()
    opt = LARS(
        [{"params": [w], "lars_exclude": False}, {"params": [b], "lars_exclude": True, "weight_decay": 0.0}],
        lr=0.5,
        momentum=0.9,
        weight_decay=0.01,
        eta=0.02,
    )
    opt.step()
    g = gw + 0.01 * w0
    trust = 0.02 * w0.norm() / g.norm()
    torch.testing.assert_close(w.detach(), w0 - 0.5 * trust * g)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb)  # excluded: neither decay nor adaptation
    # second step uses momentum: v = 0.9 v + g'
    w.grad = gw.clone()
    w1 = w.detach().clone()
    opt.step()
    g1 = gw + 0.01 * w1
    v = 0.9 * trust * g + 0.02 * w1.norm() / g1.norm() * g1
    torch.testing.assert_close(w.detach(), w1 - 0.5 * v)


@pytest.mark.parametrize("name,cls", [("lars", LARS), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_build_optimizer_from_recipe(name, cls):
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    opt = build_optimizer(model, {"name": name, "base_lr": 0.1, "weight_decay": 1e-4, "warmup_epochs": 10}, 512)
    assert isinstance(opt, cls)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.2)] * 2
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    with pytest.raises(ValueError, match="unknown key.*lr_decay"):
        build_optimizer(model, {"name": name, "base_lr": 0.1, "lr_decay": 1}, 256)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    model.append(frozen)
    opt = build_optimizer(model, {"name": name, "base_lr": 0.1}, 256)
    assert not any(p is frozen.weight for g in opt.param_groups for p in g["params"])


def test_warmup_then_cosine_schedule():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, final_ratio=0.01) == pytest.approx(0.01)
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, {"name": "sgd", "base_lr": 0.4}, 256)
    sched = build_scheduler(opt, total_steps=20, warmup_steps=4)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[3] == pytest.approx(0.4) and lrs[-1] < 0.01
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    resumed = build_scheduler(
        build_optimizer(model, {"name": "sgd", "base_lr": 0.4}, 256), total_steps=20, warmup_steps=4, last_step=9
    )
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(lrs[10])


def test_mlp_builder():
    mlp = build_mlp([16, 32, 32, 8], batch_norm=True, last_batch_norm=True, last_batch_norm_affine=False)
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    norms = [m for m in mlp if isinstance(m, nn.BatchNorm1d)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 32), (32, 8)]
    assert len(norms) == 3 and not norms[-1].affine and all(m.bias is None for m in linears)
    plain = build_mlp([16, 8], batch_norm=False)
    assert len(plain) == 1 and plain[0].bias is not None
    assert mlp(torch.randn(4, 16)).shape == (4, 8)


def test_dino_head_last_layer_is_weight_normalised():
    torch.manual_seed(0)
    head = DINOHead(12, 20, hidden_dim=16, bottleneck_dim=8)
    x = torch.randn(3, 12)
    out = head(x)
    with torch.no_grad():
        head.last_layer_direction.mul_(torch.rand(20, 1) * 10 + 0.1)  # row norms do not matter
    torch.testing.assert_close(head(x), out)
    assert out.abs().max() <= 1 + 1e-5  # unit bottleneck . unit rows, gain fixed to 1
    assert head.last_layer_gain.requires_grad is False
    assert DINOHead(12, 20, norm_last_layer=False).last_layer_gain.requires_grad


def test_prototypes_stay_on_the_sphere():
    protos = Prototypes(8, 5)
    with torch.no_grad():
        protos.layer.weight.mul_(3)
    protos.normalize_()
    torch.testing.assert_close(protos.layer.weight.norm(dim=1), torch.ones(5))


def test_ema_teacher_schedule_and_update():
    student = nn.Linear(3, 3)
    teacher = EMATeacher(student, base_momentum=0.9)
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        student.weight.add_(1.0)
    before = teacher.module.weight.clone()
    assert teacher.update(student, 0, 10) == pytest.approx(0.9)
    torch.testing.assert_close(teacher.module.weight, 0.9 * before + 0.1 * student.weight.detach())
    assert teacher.update(student, 10, 10) == pytest.approx(1.0)


def test_collapse_monitors():
    torch.manual_seed(0)
    d = 64
    healthy = torch.randn(2048, d)
    assert monitors.embedding_std(healthy) == pytest.approx(1 / math.sqrt(d), rel=0.05)
    collapsed = torch.randn(1, d).expand(256, d) + 1e-6 * torch.randn(256, d)
    assert monitors.embedding_std(collapsed) < 1e-4
    assert monitors.rankme(torch.eye(16)) == pytest.approx(16, rel=1e-3)
    assert monitors.rankme(torch.randn(32, 1) @ torch.randn(1, 16)) == pytest.approx(1.0, abs=0.01)
    k = 10
    assert monitors.teacher_entropy(torch.full((4, k), 1 / k)) == pytest.approx(math.log(k))
    assert monitors.teacher_entropy(torch.eye(k)) == pytest.approx(0.0, abs=1e-6)
    assert monitors.collapse_report(collapsed)["collapsed"] and not monitors.collapse_report(healthy)["collapsed"]
