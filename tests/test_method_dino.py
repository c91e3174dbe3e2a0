"""DINO (Caron et al. 2021): the loss against a loop-based reference (centred, sharpened teacher vs student over
every crop pair) with its centre update, the teacher-temperature warmup, the teacher (no gradient, global crops
only) and the frozen last layer, the method's registration and paper defaults, and 20 steps on real CIFAR-10
images. Under 2 gloo processes: tests/test_distributed.py."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_models.methods.dino import DINOLoss, teacher_temperature_at
from support.method_checks import (
    check_forward_with_paper_defaults_and_grey_28px_inputs,
    check_registered_with_paper_defaults,
    check_twenty_steps_on_cifar_lower_the_loss_without_collapse,
    fake_views,
    has_gradient,
    make,
)
from support.reference import ATOL, randn, rows, softmax

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def ref_dino(
    student: list[list[list[float]]], teacher: list[list[list[float]]], center: list[float], tau_s: float, tau_t: float
) -> float:
    total, pairs = 0.0, 0
    for i, t_crop in enumerate(teacher):
        for v, s_crop in enumerate(student):
            if v == i:
                continue
            ce = 0.0
            for t_row, s_row in zip(t_crop, s_crop):
                q = softmax([(x - c) / tau_t for x, c in zip(t_row, center)])
                p = softmax([x / tau_s for x in s_row])
                ce += -sum(qk * math.log(pk) for qk, pk in zip(q, p))
            total += ce / len(t_crop)
            pairs += 1
    return total / pairs


# ------------------------------------------------------------------------------------------------ loss
def test_dino_loss_matches_reference_and_updates_the_centre():
    k, b = 7, 4
    student = [randn(b, k, seed=20 + v).requires_grad_() for v in range(4)]  # 2 global + 2 local crops
    teacher = [randn(b, k, seed=30 + v).requires_grad_() for v in range(2)]
    criterion = DINOLoss(k, student_temperature=0.1, center_momentum=0.9).double()
    center = randn(1, k, seed=40)
    criterion.center.copy_(center)
    loss = criterion(student, teacher, teacher_temperature=0.05)
    expected = ref_dino([rows(s) for s in student], [rows(t) for t in teacher], rows(center)[0], 0.1, 0.05)
    assert loss.item() == pytest.approx(expected, abs=ATOL)
    # c <- 0.9 c + 0.1 * mean of the teacher outputs over both global crops
    all_rows = rows(teacher[0]) + rows(teacher[1])
    batch_mean = [sum(r[j] for r in all_rows) / len(all_rows) for j in range(k)]
    new_center = [0.9 * c + 0.1 * m for c, m in zip(rows(center)[0], batch_mean)]
    assert criterion.center[0].tolist() == pytest.approx(new_center, abs=1e-12)
    loss.backward()
    assert all(s.grad.abs().sum() > 0 for s in student)
    assert all(t.grad is None for t in teacher)  # the teacher is a constant
    # evaluation mode leaves the centre alone
    criterion.eval()
    before = criterion.center.clone()
    criterion(student, teacher, teacher_temperature=0.05)
    torch.testing.assert_close(criterion.center, before)


def test_dino_loss_limit_cases():
    k = 6
    criterion = DINOLoss(k, student_temperature=0.1).double().eval()
    # constant logits: uniform teacher and student, every cross-entropy is ln K
    const = [torch.full((3, k), 2.0, dtype=torch.float64) for _ in range(3)]
    assert float(criterion(const, const[:2], teacher_temperature=0.04)) == pytest.approx(math.log(k), abs=ATOL)
    # identical crops, equal temperatures, zero centre: H(P, P) = entropy of P
    x = randn(4, k, seed=41)
    same = [x, x, x]
    entropy = sum(-sum(p * math.log(p) for p in softmax([v / 0.1 for v in row])) for row in rows(x)) / 4
    assert float(criterion(same, same[:2], teacher_temperature=0.1)) == pytest.approx(entropy, abs=ATOL)
    # batch permutation (the same permutation in every crop)
    student = [randn(5, k, seed=50 + v) for v in range(3)]
    teacher = [randn(5, k, seed=60 + v) for v in range(2)]
    perm = torch.tensor([4, 2, 0, 1, 3])
    permuted = criterion([s[perm] for s in student], [t[perm] for t in teacher], teacher_temperature=0.07)
    assert float(permuted) == pytest.approx(float(criterion(student, teacher, teacher_temperature=0.07)), abs=ATOL)


def test_dino_teacher_temperature_warms_up_linearly():
    at = [teacher_temperature_at(s, 100, start=0.04, end=0.07, warmup_frac=0.3) for s in (0, 15, 30, 99)]
    assert at == pytest.approx([0.04, 0.055, 0.07, 0.07])
    assert teacher_temperature_at(0, 100, start=0.04, end=0.07, warmup_frac=0.0) == 0.07


# ------------------------------------------------------------------------------------------------ contract
def test_registered_with_family_recipe_and_paper_defaults():
    check_registered_with_paper_defaults(
        "dino",
        "self_distillation",
        {
            "warmup_teacher_temperature": 0.04,
            "teacher_temperature": 0.07,
            "center_momentum": 0.9,
            "student_temperature": 0.1,
            "base_momentum": 0.996,
            "final_momentum": 1.0,
        },
    )


def test_forward_with_paper_defaults_and_grey_28px_inputs():
    check_forward_with_paper_defaults_and_grey_28px_inputs("dino")


def test_dino_teacher_gets_no_gradient_and_last_layer_is_frozen_first():
    torch.manual_seed(0)
    method = make("dino", freeze_last_layer_frac=0.5)
    views = fake_views(method, batch=4)
    method.on_train_start(10)
    assert method.current_teacher_temperature == pytest.approx(0.04)
    method.before_step(0, 10)
    out = method(views)
    out["loss"].backward()
    assert has_gradient(method.backbone) and has_gradient(method.head.mlp)
    assert all(p.grad is None for t in method.teacher_modules().values() for p in t.parameters())
    last = method.head.last_layer_direction
    assert last.grad is None  # frozen during the first half: no gradient, so the optimiser skips it
    method.zero_grad()
    method.before_step(6, 10)
    assert method.current_teacher_temperature == pytest.approx(0.07)  # warmup over the first 30%
    method(views)["loss"].backward()
    assert last.grad.abs().sum() > 0
    # diagnostics: teacher entropy against ln K
    assert 0 <= out["teacher_entropy"].item() <= math.log(256) + 1e-6
    assert out["teacher_entropy_ratio"].item() == pytest.approx(out["teacher_entropy"].item() / math.log(256))
    assert method.collapse_loss_level == pytest.approx(math.log(256))


def test_dino_teacher_sees_only_global_crops_student_all():
    torch.manual_seed(0)
    method = make("dino")
    seen = {"student": [], "teacher": []}
    method.backbone.register_forward_pre_hook(lambda m, a: seen["student"].append(tuple(a[0].shape)))
    method.teacher_backbone.module.register_forward_pre_hook(lambda m, a: seen["teacher"].append(tuple(a[0].shape)))
    method(fake_views(method, batch=3))  # 2 global 32px + 2 local 16px crops
    assert seen["teacher"] == [(6, 3, 32, 32)]
    assert sorted(seen["student"]) == [(6, 3, 16, 16), (6, 3, 32, 32)]  # one forward per crop size


# ------------------------------------------------------------------------------------------------ training
def start_centre_at_its_fixed_point(method, batches) -> None:
    """DINO's loss is H(P_t) + KL(P_t || P_s). From a zero centre, the centre's EMA needs tens of steps to reach the
    teacher's mean output, and meanwhile centring flattens the teacher: H(P_t) rises faster than the student can
    learn. Start the centre at its fixed point for the (nearly frozen) teacher instead, so the 20 steps measure what
    the student learns."""
    with torch.no_grad():
        teacher_out = torch.cat([method.teacher_head(method.teacher_backbone(torch.cat(v[:2]))) for v in batches])
        method.criterion.center.copy_(teacher_out.mean(dim=0, keepdim=True))
    assert len(batches[0]) == 4 and batches[0][2].shape[-1] < batches[0][0].shape[-1]  # multi-crop


@pytest.mark.timeout(300)
def test_twenty_steps_on_cifar_lower_the_loss_without_collapse(cifar_tensors):
    check_twenty_steps_on_cifar_lower_the_loss_without_collapse(
        "dino", cifar_tensors, before_training=start_centre_at_its_fixed_point
    )
