"""iBOT: blockwise masks (ratio range, probability, budget), the masked patch-token loss against a reference and
its own centre, the student on masked global crops and the teacher on unmasked ones, the teacher without gradient
on DINO's EMA, both centres over the global batch on 2 gloo processes equal to 1 process, 20 steps that lower the
loss, and export + strict reload."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_models import registry
from ssl_models.backbones import build_backbone
from ssl_models.heads import cosine_momentum
from ssl_models.io import load_backbone, save_backbone
from ssl_models.methods.dino import DINOLoss
from ssl_models.methods.ibot import MaskedPatchDistillationLoss, blockwise_mask, ibot_masks

VIT = {"name": "vit_tiny", "image_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2}
SMALL = dict(out_dim=128, head_hidden_dim=64, bottleneck_dim=32, mask_min_block=4)


# every test single-threaded (the conftest fixture: small CPU ops, shared cores)
pytestmark = pytest.mark.usefixtures("one_thread")


def make(**overrides):
    return registry.get("ibot").cls(build_backbone(**VIT), **{**SMALL, **overrides})


def views(batch: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, s, s, generator=g) for s in (32, 32, 16, 16)]


def test_registered_as_self_distillation_with_the_paper_defaults():
    spec = registry.get("ibot")
    assert spec.family == "self_distillation" and spec.cls.augment == "multicrop"
    d = spec.defaults()
    assert (d["out_dim"], d["mask_ratio_min"], d["mask_ratio_max"], d["mask_probability"]) == (8192, 0.1, 0.5, 0.5)
    assert (d["teacher_patch_temperature"], d["warmup_teacher_patch_temperature"]) == (0.07, 0.04)
    assert (d["center_momentum"], d["patch_center_momentum"], d["mask_min_block"]) == (0.9, 0.9, 16)


def test_blockwise_mask_fills_its_budget_with_blocks_and_never_overshoots():
    torch.manual_seed(0)
    fills = []
    for budget in (20, 59, 98):  # 0.1, 0.3, 0.5 of the paper's 14 x 14 grid
        for _ in range(20):
            mask = blockwise_mask((14, 14), budget, min_block=16)
            assert mask.shape == (14, 14) and int(mask.sum()) <= budget
            fills.append(int(mask.sum()) / budget)
    assert sum(fills) / len(fills) > 0.9


def test_ibot_masks_mask_half_the_images_at_a_ratio_in_range():
    torch.manual_seed(0)
    masks = ibot_masks(400, (7, 7), ratio=(0.1, 0.5), probability=0.5, min_block=4)
    assert masks.shape == (400, 49) and masks.dtype == torch.bool
    ratios = masks.float().mean(1)
    masked = ratios > 0
    assert 0.4 < masked.float().mean() < 0.6
    assert ratios.max() <= 25 / 49  # round(0.5 x 49) at most
    assert ratios[masked].mean() > 0.2  # mostly filled to the drawn ratio (mean 0.3)
    assert not ibot_masks(10, (7, 7), probability=0.0).any()


def reference_mim(student, teacher, masks, center, tau_s, tau_t):
    total = 0.0
    for s, t, m in zip(student, teacher, masks):
        per_image = []
        for b in range(s.shape[0]):
            terms = []
            for i in range(s.shape[1]):
                if m[b, i]:
                    q = torch.softmax((t[b, i] - center[0]) / tau_t, dim=0)
                    terms.append(-(q * torch.log_softmax(s[b, i] / tau_s, dim=0)).sum())
            per_image.append(sum(terms) / len(terms) if terms else torch.tensor(0.0, dtype=s.dtype))
        total = total + sum(per_image) / len(per_image)
    return total / len(student)


def test_masked_patch_loss_and_its_centre_match_the_reference():
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(3, 5, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    teacher = [torch.randn(3, 5, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    masks = [torch.rand(3, 5, generator=g) < 0.5 for _ in range(2)]
    masks[0][1] = False  # an unmasked image counts 0 (the mean still runs over every image)
    criterion = MaskedPatchDistillationLoss(6, student_temperature=0.1, center_momentum=0.8).double()
    criterion.center.copy_(torch.randn(1, 6, generator=g, dtype=torch.float64))
    center0 = criterion.center.clone()
    loss = criterion(student, teacher, masks, 0.05)
    assert loss.item() == pytest.approx(reference_mim(student, teacher, masks, center0, 0.1, 0.05).item())
    patch_means = torch.cat([t.mean(1) for t in teacher])
    torch.testing.assert_close(criterion.center, 0.8 * center0 + 0.2 * patch_means.mean(0, keepdim=True))
    # only masked positions count: the student's unmasked outputs do not matter
    changed = [torch.where(m.unsqueeze(-1), s, torch.randn_like(s)) for s, m in zip(student, masks)]
    criterion.eval()
    assert criterion(changed, teacher, masks, 0.05).item() == pytest.approx(
        reference_mim(student, teacher, masks, criterion.center, 0.1, 0.05).item()
    )


def test_student_sees_masked_global_crops_teacher_the_unmasked_ones(monkeypatch):
    torch.manual_seed(0)
    method = make(mask_probability=1.0)
    calls = {"student": [], "teacher": []}
    for who, module in (("student", method.backbone), ("teacher", method.teacher_backbone.module)):
        original = module.forward_features

        def spy(x, _original=original, _who=who, **kw):
            calls[_who].append((tuple(x.shape), kw.get("token_mask")))
            return _original(x, **kw)

        monkeypatch.setattr(module, "forward_features", spy)
    method.on_train_start(10)
    out = method(views(batch=3))
    ((t_shape, t_mask),) = calls["teacher"]
    assert t_shape == (6, 3, 32, 32) and t_mask is None  # both global crops, unmasked
    shapes = [c[0] for c in calls["student"]]
    assert shapes == [(6, 3, 32, 32), (6, 3, 16, 16)]  # masked globals, then the local crops
    student_mask = calls["student"][0][1]
    assert student_mask.shape == (6, 64) and student_mask.any(1).all() and calls["student"][1][1] is None
    assert out["mask_ratio"].item() == pytest.approx(student_mask.float().mean().item())
    torch.testing.assert_close(out["loss"], out["cls_loss"] + out["mim_loss"])
    out["loss"].backward()
    assert method.mask_token.grad is not None and method.mask_token.grad.abs().sum() > 0


def test_teacher_gets_no_gradient_follows_the_ema_and_the_patch_temperature_warms_up():
    torch.manual_seed(0)
    method = make(freeze_last_layer_frac=0.0)
    method.on_train_start(10)
    assert method.current_teacher_patch_temperature == pytest.approx(0.04)
    method.before_step(0, 10)
    method(views())["loss"].backward()
    assert all(p.grad is None for t in method.teacher_modules().values() for p in t.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.backbone.parameters())
    method.before_step(2, 20)
    assert method.current_teacher_patch_temperature == pytest.approx(0.04 + 0.03 * 2 / 6)
    method.before_step(9, 10)
    assert method.current_teacher_patch_temperature == pytest.approx(0.07)
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    before = [p.clone() for p in method.teacher_backbone.module.parameters()]
    method.after_step(3, 10)
    m = cosine_momentum(3, 10, 0.996)
    for t0, t1, s in zip(before, method.teacher_backbone.module.parameters(), method.backbone.parameters()):
        torch.testing.assert_close(t1, m * t0 + (1 - m) * s)
    assert method.collapse_loss_level == pytest.approx(2 * math.log(128))


def _centre_data():
    g = torch.Generator().manual_seed(3)
    teacher = [torch.randn(8, 5, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    student = [torch.randn(8, 5, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    masks = [torch.rand(8, 5, generator=g) < 0.4 for _ in range(2)]
    cls_t = [torch.randn(8, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    cls_s = [torch.randn(8, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    return teacher, student, masks, cls_t, cls_s


def _centres(rows: slice) -> dict:
    teacher, student, masks, cls_t, cls_s = _centre_data()
    patch = MaskedPatchDistillationLoss(6, center_momentum=0.5).double()
    cls = DINOLoss(6, center_momentum=0.5).double()
    mim = patch([s[rows] for s in student], [t[rows] for t in teacher], [m[rows] for m in masks], 0.05)
    dino = cls([s[rows] for s in cls_s], [t[rows] for t in cls_t], 0.05)
    return {
        "patch_center": patch.center.clone(),
        "center": cls.center.clone(),
        "mim": mim.detach(),
        "dino": dino.detach(),
    }


def centre_worker(rank: int, world_size: int) -> dict:
    return _centres(slice(rank * 4, (rank + 1) * 4))


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_both_centres_over_two_processes_equal_one_process_on_the_global_batch():
    from support.dist_utils import run_distributed

    single = _centres(slice(0, 8))
    per_rank = run_distributed(centre_worker, 2)
    for out in per_rank:
        torch.testing.assert_close(out["patch_center"], single["patch_center"])
        torch.testing.assert_close(out["center"], single["center"])
    # per-image losses: the ranks' mean is the single-process loss on the global batch
    torch.testing.assert_close((per_rank[0]["mim"] + per_rank[1]["mim"]) / 2, single["mim"])
    torch.testing.assert_close((per_rank[0]["dino"] + per_rank[1]["dino"]) / 2, single["dino"])


@pytest.mark.timeout(300)
def test_twenty_steps_on_cifar_lower_the_loss(cifar_tensors):
    from support.method_checks import N_BATCHES, train, view_batches

    images, _ = cifar_tensors
    torch.manual_seed(0)
    method = make()
    batches = view_batches(images, method.augment)
    # as in DINO's test: both centres start at their fixed point for the (nearly frozen) teacher, so the 20 steps
    # measure what the student learns rather than the centres' EMA catching up
    with torch.no_grad():
        feats = [method.teacher_backbone.module.forward_features(torch.cat(v[:2])) for v in batches]
        cls = torch.cat([method.teacher_head(f["cls"]) for f in feats])
        patch = torch.cat([method.teacher_head(f["patch_tokens"]).mean(1) for f in feats])
        method.criterion.center.copy_(cls.mean(0, keepdim=True))
        method.patch_criterion.center.copy_(patch.mean(0, keepdim=True))
    losses, _ = train(method, batches)
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:N_BATCHES]) / N_BATCHES, sum(losses[-N_BATCHES:]) / N_BATCHES
    print(f"ibot: loss {first:.4f} -> {last:.4f}")
    assert last < first


def test_export_is_a_plain_vit_that_reloads_strictly(tmp_path):
    torch.manual_seed(0)
    method = make()
    method(views())["loss"].backward()
    path = tmp_path / "backbone.safetensors"
    save_backbone(path, method.backbone, {"method": "ibot"})
    loaded = load_backbone(path, card=False)
    assert set(loaded.state_dict()) == set(method.backbone.state_dict())  # no heads, teacher or mask token
    x = torch.randn(3, 3, 32, 32)
    method.backbone.eval()
    torch.testing.assert_close(loaded(x), method.backbone(x))


def test_mean_pooled_backbone_still_distils_the_class_token():
    torch.manual_seed(0)
    method = registry.get("ibot").cls(build_backbone(**{**VIT, "global_pool": "mean"}), **SMALL)
    v = views(batch=3)
    out = method(v)
    with torch.no_grad():
        tokens = method.backbone.forward_features(v[0])
    assert not torch.allclose(out["embedding"], tokens["cls"], atol=1e-3)  # exported features: the patch mean
    assert out["cls_loss"].item() > 0 and out["mim_loss"].item() >= 0


def test_bad_hyperparameters_are_rejected():
    with pytest.raises(ValueError, match="mask_ratio"):
        make(mask_ratio_min=0.6, mask_ratio_max=0.5)
    with pytest.raises(ValueError, match="ViT backbone"):
        registry.get("ibot").cls(build_backbone("resnet18", width=8))
