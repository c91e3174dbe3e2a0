"""MoCo v3, NNCLR, SimSiam, DINO, Barlow Twins, SwAV and SimMIM as methods: registration and recipes, which
branches get gradients, the per-step hooks (EMA, queues, schedules, frozen layers), and 20 optimisation steps on
real CIFAR-10 images that lower each loss without collapsing the embedding."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_models import registry
from ssl_models.augment import RECIPES, build_views
from ssl_models.backbones import build_backbone
from ssl_models.monitors import embedding_std, rankme
from ssl_models.optim import build_optimizer

FAMILIES = {"moco": "deep_metric_learning", "nnclr": "deep_metric_learning", "simsiam": "self_distillation",
            "dino": "self_distillation", "barlowtwins": "canonical_correlation_analysis",
            "swav": "canonical_correlation_analysis", "simmim": "masked_image_modeling"}
VIT = {"name": "vit_tiny", "image_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2}
# the standard stem (stride 2 + max-pool) keeps a 32 px ResNet-18 cheap on CPU; the small-image stem is 16x dearer
RESNET = {"name": "resnet18", "small_image": False, "width": 16}
# CPU-sized heads for the tests (the defaults are the papers'); each method's own recipe otherwise
SMALL = {
    "moco": dict(projection_dim=64, projector_hidden_dim=256, predictor_hidden_dim=256),
    "nnclr": dict(projection_dim=64, projector_hidden_dim=256, predictor_hidden_dim=256, support_set_size=256),
    "simsiam": dict(projection_dim=128, projector_hidden_dim=128, predictor_hidden_dim=32),
    "dino": dict(out_dim=256, head_hidden_dim=128, bottleneck_dim=32),
    "barlowtwins": dict(projection_dim=128, projector_hidden_dim=128),
    "swav": dict(projection_dim=32, projector_hidden_dim=128, num_prototypes=50, queue_length=128),
    "simmim": dict(),
}


# every test single-threaded (the conftest fixture: small CPU ops, shared cores)
pytestmark = pytest.mark.usefixtures("one_thread")


def make(name: str, backbone: dict | None = None, **overrides):
    spec = registry.get(name)
    config = dict(backbone or (VIT if name in ("dino", "simmim") else RESNET))
    kwargs = {**SMALL[name], **overrides}
    return spec.cls(build_backbone(**config), **kwargs)


def fake_views(method, batch: int = 4, size: int = 32, channels: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if method.augment == "multicrop":
        sizes = [size, size, size // 2, size // 2]
    elif method.augment == "mim":
        sizes = [size]
    else:
        sizes = [size, size]
    return [torch.randn(batch, channels, s, s, generator=g) for s in sizes]


def grads(module: torch.nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def has_gradient(module: torch.nn.Module) -> bool:
    return any(g is not None and g.abs().sum() > 0 for g in grads(module))


# ------------------------------------------------------------------------------------------------ registry
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_registered_with_family_recipe_and_paper_defaults(name):
    spec = registry.get(name)
    assert spec.family == FAMILIES[name]
    cls = spec.cls
    assert cls.augment in RECIPES
    build_optimizer(torch.nn.Linear(2, 2), cls.optimizer, effective_batch=256)  # a valid recipe
    assert build_backbone(**cls.default_backbone).feature_dim > 0
    defaults = spec.defaults()
    paper = {"moco": {"temperature": 0.2, "base_momentum": 0.99, "final_momentum": 1.0},
             "nnclr": {"temperature": 0.1},
             "simsiam": {"use_predictor": True},
             "dino": {"warmup_teacher_temperature": 0.04, "teacher_temperature": 0.07, "center_momentum": 0.9,
                      "student_temperature": 0.1, "base_momentum": 0.996, "final_momentum": 1.0},
             "barlowtwins": {"lambda_offdiag": 0.0051},
             "swav": {"temperature": 0.1, "sinkhorn_epsilon": 0.05, "sinkhorn_iterations": 3},
             "simmim": {"mask_ratio": 0.6}}[name]
    assert {k: defaults[k] for k in paper} == paper


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_forward_with_paper_defaults_and_grey_28px_inputs(name):
    torch.manual_seed(0)
    spec = registry.get(name)
    backbone_config = dict(spec.cls.default_backbone, in_chans=1)
    if backbone_config["name"].startswith("vit"):
        backbone_config.update(image_size=28, depth=1)
    else:
        backbone_config.update(width=8)
    method = spec.cls(build_backbone(**backbone_config))  # the paper-sized heads
    out = method(fake_views(method, batch=4, size=28, channels=1))
    assert out["loss"].ndim == 0 and math.isfinite(out["loss"].item())
    assert out["embedding"].shape[0] == 4 and out["embedding"].ndim == 2 and not out["embedding"].requires_grad
    out["loss"].backward()
    assert has_gradient(method.backbone)


# ------------------------------------------------------------------------------------------------ gradients
def test_moco_momentum_encoder_gets_no_gradient_and_follows_the_ema():
    torch.manual_seed(0)
    method = make("moco")
    method.on_train_start(10)
    method(fake_views(method, batch=6))["loss"].backward()
    for part in (method.backbone, method.projector, method.predictor):
        assert has_gradient(part)
    for teacher in method.teacher_modules().values():
        assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    before = [p.clone() for p in method.momentum_projector.parameters()]
    with torch.no_grad():
        for p in method.projector.parameters():
            p.add_(1.0)
    method.after_step(0, 10)  # momentum at step 0 is the base, 0.99
    for b, t, s in zip(before, method.momentum_projector.parameters(), method.projector.parameters()):
        torch.testing.assert_close(t, 0.99 * b + 0.01 * s)


def test_simsiam_target_branch_is_a_stop_gradient():
    torch.manual_seed(0)
    method = make("simsiam")
    views = fake_views(method, batch=6)
    captured = {}
    method.projector.register_forward_hook(lambda m, i, o: captured.update(z=o) or o.retain_grad())
    method(views)["loss"].backward()
    assert has_gradient(method.predictor) and has_gradient(method.projector) and has_gradient(method.backbone)
    # the gradient reaching z is exactly the one through the predictor (the target side contributes nothing)
    z = captured["z"].detach().requires_grad_()
    p1, p2 = method.predictor(z).chunk(2)
    z1, z2 = z.chunk(2)
    manual = 0.5 * (-F.cosine_similarity(p1, z2.detach()).mean() - F.cosine_similarity(p2, z1.detach()).mean())
    (expected,) = torch.autograd.grad(manual, z)
    torch.testing.assert_close(captured["z"].grad, expected)


def test_simsiam_without_predictor_still_trains_the_projector():
    torch.manual_seed(0)
    method = make("simsiam", use_predictor=False)
    assert isinstance(method.predictor, torch.nn.Identity)
    method(fake_views(method, batch=6))["loss"].backward()
    assert has_gradient(method.projector)


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


def test_barlowtwins_projector_gets_gradient_and_reports_its_terms():
    torch.manual_seed(0)
    method = make("barlowtwins")
    out = method(fake_views(method, batch=6))
    out["loss"].backward()
    assert has_gradient(method.projector) and has_gradient(method.backbone)
    expected = out["on_diagonal"] + method.criterion.lambda_offdiag * out["off_diagonal"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_nnclr_support_set_fills_after_each_step_with_view_one():
    torch.manual_seed(0)
    method = make("nnclr", support_set_size=10)
    views = fake_views(method, batch=6)
    out = method(views)
    out["loss"].backward()
    assert has_gradient(method.predictor) and has_gradient(method.projector)
    assert int(method.support_set.filled) == 0  # nothing enters before the optimiser step
    method.after_step(0, 10)
    assert int(method.support_set.filled) == 6
    torch.testing.assert_close(method.support_set.queue[:6], F.normalize(out["embedding"], dim=1))
    method.eval()
    method(views)
    method.after_step(1, 10)  # evaluation forwards do not feed the support set
    assert int(method.support_set.filled) == 6


def test_swav_prototypes_normalised_frozen_first_and_queue_used_once_full():
    torch.manual_seed(0)
    method = make("swav", queue_length=8, queue_start_frac=0.0, freeze_prototypes_frac=0.2)
    views = fake_views(method, batch=4)
    total = 10
    method.on_train_start(total)
    weight = method.prototypes.layer.weight
    in_use = []
    for step in range(4):
        method.zero_grad()
        with torch.no_grad():
            weight.mul_(3.0)  # an optimiser step would change the norms; before_step renormalises
        method.before_step(step, total)
        torch.testing.assert_close(weight.norm(dim=1), torch.ones(weight.shape[0]))
        out = method(views)
        out["loss"].backward()
        if step < 2:
            assert weight.grad is None  # frozen for the first 20% of the steps: the optimiser skips them
        else:
            assert weight.grad.abs().sum() > 0
        in_use.append(out["queue_in_use"].item())
        method.after_step(step, total)
    assert in_use == [0.0, 0.0, 1.0, 1.0]  # 4 rows per step, queue of 8: full after two steps
    assert method.collapse_loss_level == pytest.approx(math.log(50))


def test_simmim_masks_with_the_token_and_trains_encoder_and_head():
    torch.manual_seed(0)
    method = make("simmim")
    out = method(fake_views(method, batch=4))
    out["loss"].backward()
    assert out["mask_ratio"].item() == pytest.approx(10 / 16)  # 16 blocks of 2x2 patches, 10 masked
    assert has_gradient(method.backbone) and has_gradient(method.pixel_head)
    assert method.mask_token.grad.abs().sum() > 0
    assert "mask_token" in method.no_weight_decay()


# ------------------------------------------------------------------------------------------------ training
N_BATCHES, BATCH = 5, 48  # 240 real images, each batch seen 4 times in 20 steps
_VIEW_CACHE: dict[str, list[list[torch.Tensor]]] = {}


def view_batches(images: torch.Tensor, recipe: str) -> list[list[torch.Tensor]]:
    """N_BATCHES fixed batches of views of real images, made once per recipe (so a loss can be compared on the same
    batches at the start and at the end of training, and methods sharing a recipe share the views)."""
    if recipe not in _VIEW_CACHE:
        strengths = {"n_local": 2} if recipe == "multicrop" else {}
        make_views = build_views(recipe, image_size=32, channels=3, **strengths)
        torch.manual_seed(0)
        order = torch.randperm(images.shape[0])  # the fixture is sorted by class; mix the classes in each batch
        uint8 = (images[order] * 255).round().to(torch.uint8)
        batches = []
        for s in range(N_BATCHES):
            per_image = [make_views(img) for img in uint8[s * BATCH:(s + 1) * BATCH]]
            batches.append([torch.stack([views[v] for views in per_image]) for v in range(len(per_image[0]))])
        _VIEW_CACHE[recipe] = batches
    return _VIEW_CACHE[recipe]


def train(method, batches: list[list[torch.Tensor]], steps: int = 20) -> tuple[list[float], list[torch.Tensor]]:
    optimizer = build_optimizer(method, {"name": "adamw", "base_lr": 2e-3, "weight_decay": 1e-4,
                                         "lr_scaling": "none"}, effective_batch=batches[0][0].shape[0])
    method.train()
    method.on_train_start(steps)
    losses, embeddings = [], []
    for step in range(steps):
        method.before_step(step, steps)
        out = method(batches[step % len(batches)])
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        method.after_step(step, steps)
        losses.append(out["loss"].item())
        embeddings.append(out["embedding"])
    return losses, embeddings


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["moco", "nnclr", "simsiam", "dino", "barlowtwins", "swav", "simmim"])
def test_twenty_steps_on_cifar_lower_the_loss_without_collapse(name, cifar_tensors):
    images, _ = cifar_tensors
    torch.manual_seed(0)
    method = make(name)
    batches = view_batches(images, method.augment)
    n_batches = len(batches)
    if name == "dino":
        # DINO's loss is H(P_t) + KL(P_t || P_s). From a zero centre, the centre's EMA needs tens of steps to
        # reach the teacher's mean output, and meanwhile centring flattens the teacher: H(P_t) rises faster than
        # the student can learn. Start the centre at its fixed point for the (nearly frozen) teacher instead, so
        # the 20 steps measure what the student learns.
        with torch.no_grad():
            teacher_out = torch.cat([method.teacher_head(method.teacher_backbone(torch.cat(v[:2]))) for v in batches])
            method.criterion.center.copy_(teacher_out.mean(dim=0, keepdim=True))
    if name in ("dino", "swav"):
        assert len(batches[0]) == 4 and batches[0][2].shape[-1] < batches[0][0].shape[-1]  # multi-crop
    losses, embeddings = train(method, batches)
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:n_batches]) / n_batches, sum(losses[-n_batches:]) / n_batches
    assert last < first, f"{name}: loss did not decrease over 20 steps ({first:.4f} -> {last:.4f})"
    final = torch.cat(embeddings[-n_batches:])
    d = final.shape[1]
    std_ratio = embedding_std(final) * math.sqrt(d)  # about 1 when spread over the sphere, 0 when collapsed
    print(f"{name}: loss {first:.4f} -> {last:.4f}, std ratio {std_ratio:.3f}")
    assert std_ratio > 0.2, f"{name}: embedding std {embedding_std(final):.4f} x sqrt({d}) = {std_ratio:.3f}"


@pytest.mark.timeout(300)
def test_simsiam_without_predictor_heads_for_collapse(cifar_tensors):
    """The paper's section 4.2 ablation, which the pretrain tests use to exercise collapse detection."""
    images, _ = cifar_tensors
    final_loss, std_ratio, rank = {}, {}, {}
    for use_predictor in (True, False):
        torch.manual_seed(0)
        method = make("simsiam", use_predictor=use_predictor)
        losses, embeddings = train(method, view_batches(images, method.augment))
        final = torch.cat(embeddings[-N_BATCHES:])
        final_loss[use_predictor] = sum(losses[-N_BATCHES:]) / N_BATCHES
        std_ratio[use_predictor] = embedding_std(final) * math.sqrt(final.shape[1])
        rank[use_predictor] = rankme(final)
    # The float trajectory differs between CPUs, so every bound has a margin measured over seeds 0-3 and three CPU
    # kernel settings (ATEN_CPU_CAPABILITY=default + MKL_ENABLE_INSTRUCTIONS=SSE4_2 + ONEDNN_MAX_CPU_ISA=SSE41;
    # =avx2 + AVX2 + AVX2; this Xeon's native AVX-512), 12 runs, with / without the predictor:
    #   final loss   -0.35..-0.11 / -0.82..-0.63   gap >= 0.42      (one CPU gave -0.798, below the old -0.8 bound)
    #   RankMe       40.7..70.7   / 5.2..26.2      ratio <= 0.395
    #   std ratio    0.89..1.00   / 0.57..0.89     gap >= 0.11
    assert final_loss[False] < -0.55 and final_loss[False] < final_loss[True] - 0.3  # towards the trivial -1
    assert rank[False] < 0.6 * rank[True]  # the embedding is losing dimensions
    assert std_ratio[False] < std_ratio[True] - 0.05


# ------------------------------------------------------------------------------------------------ DDP
def ddp_worker(rank: int, world_size: int) -> dict:
    torch.set_num_threads(1)
    out = {}
    cases = {"dino": {"freeze_last_layer_frac": 0.5},
             "swav": {"freeze_prototypes_frac": 0.5, "queue_length": 16, "queue_start_frac": 0.0},
             "nnclr": {}}
    for name, kwargs in cases.items():
        torch.manual_seed(0)
        method = make(name, **kwargs)
        # buffers not broadcast: the support set, queue and centre must agree across ranks by construction
        model = torch.nn.parallel.DistributedDataParallel(method, find_unused_parameters=True,
                                                          broadcast_buffers=False)
        optimizer = build_optimizer(method, {"name": "adamw", "base_lr": 1e-3, "lr_scaling": "none"}, 8)
        method.on_train_start(4)
        for step in range(4):
            method.before_step(step, 4)
            loss = model(fake_views(method, batch=4, seed=10 * rank + step))["loss"]  # each rank its own data
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            method.after_step(step, 4)
        out[name] = {"params": [p.detach().clone() for p in method.parameters()],
                     "state": {k: b.clone() for k, b in method.named_buffers()
                               if k.startswith(("support_set.", "queue.", "criterion.center"))}}
    return out


@pytest.mark.timeout(240)
def test_stateful_methods_train_under_ddp_with_ranks_in_sync():
    """DINO and SwAV through their frozen phases (parameters unused in a step) and NNCLR/SwAV/DINO's shared state
    (support set, queue, centre) on 2 gloo ranks with different data: everything stays identical across ranks."""
    from support.dist_utils import run_distributed

    per_rank = run_distributed(ddp_worker, 2)
    for name in per_rank[0]:
        a, b = per_rank[0][name], per_rank[1][name]
        assert a["state"], name
        for pa, pb in zip(a["params"], b["params"]):
            torch.testing.assert_close(pa, pb, msg=f"{name}: parameters differ across ranks")
        for key in a["state"]:
            torch.testing.assert_close(a["state"][key], b["state"][key], msg=f"{name}: {key} differs across ranks")
    assert int(per_rank[0]["nnclr"]["state"]["support_set.filled"]) == 4 * 2 * 4  # global batches pushed
    assert int(per_rank[0]["swav"]["state"]["queue.filled"]) == 16
