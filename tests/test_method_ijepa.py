"""I-JEPA: multi-block masks (counts, scales, aspect ratios, context/target disjointness), a predictor that sees
only the context tokens and the target positions, the loss against a reference, layer-normalised targets, the EMA
target encoder (no gradient, linear momentum schedule), 20 steps that lower the loss, and export + strict reload."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_models import registry
from ssl_models.backbones import build_backbone
from ssl_models.io import load_backbone, save_backbone
from ssl_models.methods import ijepa
from ssl_models.methods.ijepa import JEPALoss, block_size, linear_momentum, multiblock_masks

VIT = {
    "name": "vit_tiny",
    "image_size": 32,
    "patch_size": 4,
    "embed_dim": 64,
    "depth": 2,
    "num_heads": 2,
    "global_pool": "mean",
}


# every test single-threaded (the conftest fixture: small CPU ops, shared cores)
pytestmark = pytest.mark.usefixtures("one_thread")


def make(**overrides) -> ijepa.IJEPA:
    kwargs = {"predictor_dim": 32, "predictor_depth": 2, "predictor_heads": 2, **overrides}
    return registry.get("ijepa").cls(build_backbone(**VIT), **kwargs)


def block_shape(index: torch.Tensor, grid_w: int) -> tuple[int, int]:
    rows, cols = index // grid_w, index % grid_w
    h, w = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
    assert h * w == len(index) == len(set(index.tolist())), "a target block is not a filled rectangle"
    return h, w


def test_registered_as_masked_image_modeling_with_the_paper_defaults():
    spec = registry.get("ijepa")
    assert spec.family == "masked_image_modeling" and spec.cls.augment == "mim"
    d = spec.defaults()
    assert (d["num_targets"], d["target_scale_min"], d["target_scale_max"]) == (4, 0.15, 0.2)
    assert (d["target_aspect_min"], d["target_aspect_max"]) == (0.75, 1.5)
    assert (d["context_scale_min"], d["context_scale_max"]) == (0.85, 1.0)
    assert (d["base_momentum"], d["final_momentum"], d["loss"]) == (0.996, 1.0, "l2")


def test_block_sizes_follow_the_documented_scale_and_aspect_ranges():
    torch.manual_seed(0)
    grid = (14, 14)  # the paper's grid (224 px, patch 16)
    shapes = [block_size(grid, (0.15, 0.2), (0.75, 1.5)) for _ in range(300)]
    scales = [h * w / 196 for h, w in shapes]
    aspects = [h / w for h, w in shapes]
    # rounding h and w to whole patches moves the area and ratio a little around the drawn values
    assert 0.12 <= min(scales) and max(scales) <= 0.24
    assert 0.6 <= min(aspects) and max(aspects) <= 1.8
    assert min(aspects) < 0.9 and max(aspects) > 1.2  # both orientations occur
    contexts = [block_size(grid, (0.85, 1.0), (1.0, 1.0)) for _ in range(100)]
    assert all(h == w and 0.78 <= h * w / 196 <= 1.0 for h, w in contexts)


@pytest.mark.parametrize("grid", [(14, 14), (7, 7), (8, 6)])
def test_multiblock_masks_give_four_targets_and_a_disjoint_context(grid):
    torch.manual_seed(1)
    n = grid[0] * grid[1]
    for _ in range(5):
        context, targets = multiblock_masks(8, grid, min_context=4)
        assert targets.shape[:2] == (4, 8) and context.shape[0] == 8
        assert context.shape[1] >= 4
        shapes = {block_shape(targets[i, b], grid[1]) for i in range(4) for b in range(8)}
        assert len(shapes) == 1  # one target shape per batch, so the blocks stack
        for b in range(8):
            ctx = context[b].tolist()
            assert ctx == sorted(set(ctx)) and 0 <= min(ctx) and max(ctx) < n
            assert not set(ctx) & set(targets[:, b].flatten().tolist()), "context holds a target patch"


def test_a_small_grid_never_gives_a_context_below_the_minimum():
    # a 4 x 4 grid (28 px at patch 7): four blocks of up to 2 x 2 sometimes cover 13+ of the 16 patches; those
    # targets are redrawn instead of handing the encoder a context of 0-3 patches
    torch.manual_seed(3)
    for _ in range(40):
        context, targets = multiblock_masks(32, (4, 4), min_context=4)
        assert context.shape[1] >= 4
        for b in range(32):
            assert not set(context[b].tolist()) & set(targets[:, b].flatten().tolist())


def test_a_grid_too_small_for_the_blocks_is_rejected():
    with pytest.raises(ValueError, match=r"2 x 2 patch grid leaves fewer than 4 context patches"):
        multiblock_masks(2, (2, 2), target_scale=(1.0, 1.0), min_context=4)
    # at construction: one largest target block (a 4 x 4 grid at target_scale_max 0.8) leaves under 4 patches
    with pytest.raises(ValueError, match=r"4 x 4 patch grid \(image_size 32, patch_size 8\).*min_context_patches=4"):
        registry.get("ijepa").cls(
            build_backbone(**{**VIT, "patch_size": 8}), target_scale_min=0.7, target_scale_max=0.8
        )


def test_context_is_one_block_minus_the_targets():
    torch.manual_seed(2)
    grid = (14, 14)
    context, targets = multiblock_masks(16, grid, min_context=1)
    for b in range(16):
        rows, cols = context[b] // 14, context[b] % 14
        box = (int(rows.max() - rows.min()) + 1) * (int(cols.max() - cols.min()) + 1)
        assert box >= context.shape[1] and box / 196 <= 1.0
    # the context is large: about (0.85-1.0) x N minus the targets' union
    assert context.shape[1] >= 0.15 * 196


def test_predictor_sees_only_context_tokens_and_target_positions(monkeypatch):
    torch.manual_seed(0)
    method = make().eval()
    grid = (8, 8)
    context_index = torch.tensor([[0, 1, 2, 8, 9, 10, 16, 17, 18]] * 2)
    target_index = torch.tensor([[[36, 37, 44, 45]] * 2, [[54, 55, 62, 63]] * 2])
    monkeypatch.setattr(ijepa, "multiblock_masks", lambda *a, **k: (context_index, target_index))
    lengths, predictions = [], []
    method.predictor.blocks[0].register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape))
    method.predictor.register_forward_hook(lambda m, a, out: predictions.append(out))

    images = torch.randn(2, 3, 32, 32)
    outside = images.clone()
    keep = torch.zeros(8, 8, dtype=torch.bool)
    keep.view(-1)[context_index[0]] = True
    pixel_keep = keep.repeat_interleave(4, 0).repeat_interleave(4, 1)
    outside[:, :, ~pixel_keep] = torch.randn_like(outside[:, :, ~pixel_keep])  # everything but the context
    loss_a = method([images])["loss"]
    loss_b = method([outside])["loss"]
    # one sequence per target block: 9 context tokens + 4 mask tokens
    assert lengths == [torch.Size([4, 13, 32])] * 2
    torch.testing.assert_close(predictions[0], predictions[1])  # nothing outside the context reaches the predictor
    assert not torch.allclose(loss_a, loss_b)  # ... while the targets did change

    # the mask tokens carry the target positions: other positions, other predictions
    context = torch.randn(2, 9, 64)
    at = method.predictor(context, context_index, target_index[0], grid)
    elsewhere = method.predictor(context, context_index, target_index[1], grid)
    assert not torch.allclose(at, elsewhere)
    # ... and one block's prediction ignores where the other blocks are (separate sequences)
    both = method.predictor(context.repeat(2, 1, 1), context_index.repeat(2, 1), target_index.flatten(0, 1), grid)
    torch.testing.assert_close(both[:2], at)


def test_loss_matches_the_reference_formulas():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    target = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    diffs = [float(d) for d in (pred - target).flatten()]
    l2 = sum(d**2 for d in diffs) / len(diffs)
    smooth = sum(0.5 * d**2 if abs(d) < 1 else abs(d) - 0.5 for d in diffs) / len(diffs)
    assert JEPALoss("l2")(pred, target).item() == pytest.approx(l2)
    assert JEPALoss("smooth_l1")(pred, target).item() == pytest.approx(smooth)
    with pytest.raises(ValueError, match="loss must be"):
        JEPALoss("l1")


def test_targets_are_the_target_encoders_layer_normalised_patches():
    torch.manual_seed(0)
    method = make()
    images = torch.randn(2, 3, 32, 32)
    target_index = torch.tensor([[[0, 1, 8, 9], [5, 6, 7, 15]], [[40, 41, 48, 49], [60, 61, 62, 63]]])
    out = method.targets(images, target_index)
    assert out.shape == (4, 4, 64) and not out.requires_grad
    tokens = method.target_encoder.forward_features(images)["patch_tokens"]
    mean, var = tokens.mean(-1, keepdim=True), tokens.var(-1, unbiased=False, keepdim=True)
    normed = (tokens - mean) / torch.sqrt(var + 1e-5)
    torch.testing.assert_close(out[1], normed[1, [5, 6, 7, 15]])  # block 0, image 1
    torch.testing.assert_close(out[2], normed[0, [40, 41, 48, 49]])  # block 1, image 0
    torch.testing.assert_close(out.mean(-1), torch.zeros(4, 4), atol=1e-5, rtol=0)


def test_target_encoder_gets_no_gradient_and_follows_the_linear_ema():
    torch.manual_seed(0)
    method = make(base_momentum=0.9)
    out = method([torch.randn(4, 3, 32, 32)])
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in method.target_encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.backbone.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.predictor.parameters())
    assert method.teacher_modules() == {"target_encoder": method.target_encoder}

    assert [linear_momentum(s, 100, 0.996) for s in (0, 50, 100)] == pytest.approx([0.996, 0.998, 1.0])
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    before = [p.clone() for p in method.target_encoder.parameters()]
    method.after_step(25, 100)
    m = 0.9 + 0.1 * 0.25
    assert method.momentum == pytest.approx(m)
    for t0, t1, s in zip(before, method.target_encoder.parameters(), method.backbone.parameters()):
        torch.testing.assert_close(t1, m * t0 + (1 - m) * s)


@pytest.mark.timeout(300)
def test_twenty_steps_on_cifar_lower_the_loss(cifar_tensors):
    from support.method_checks import N_BATCHES, train, view_batches

    images, _ = cifar_tensors
    torch.manual_seed(0)
    method = make()
    losses, embeddings = train(method, view_batches(images, method.augment))
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:N_BATCHES]) / N_BATCHES, sum(losses[-N_BATCHES:]) / N_BATCHES
    print(f"ijepa: loss {first:.4f} -> {last:.4f}")
    assert last < first


def test_the_target_encoder_is_what_export_takes():
    """Paper appendix A.1: the target encoder is evaluated; every other method exports its trained backbone."""
    method = make()
    assert method.exported_backbone() is method.target_encoder
    simclr = registry.get("simclr").cls(build_backbone("resnet18", width=8))
    assert simclr.exported_backbone() is simclr.backbone


def test_export_is_a_plain_vit_that_reloads_strictly(tmp_path):
    torch.manual_seed(0)
    method = make(base_momentum=0.5, final_momentum=0.5)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    method([torch.randn(2, 3, 32, 32)])["loss"].backward()
    optimizer.step()
    method.after_step(0, 10)  # the target encoder moves halfway to the trained context encoder
    exported = method.exported_backbone()
    path = tmp_path / "backbone.safetensors"
    save_backbone(path, exported, {"method": "ijepa"})
    loaded = load_backbone(path, card=False)
    assert type(loaded).__name__ == "VisionTransformer"
    assert set(loaded.state_dict()) == set(method.backbone.state_dict())  # no predictor, one encoder
    x = torch.randn(3, 3, 32, 32)
    exported.eval()
    method.backbone.eval()
    torch.testing.assert_close(loaded(x), exported(x))
    assert not torch.allclose(loaded(x), method.backbone(x))  # the target encoder, not the context encoder


def test_bad_hyperparameters_are_rejected():
    with pytest.raises(ValueError, match="target_scale"):
        make(target_scale_min=0.3, target_scale_max=0.2)
    with pytest.raises(ValueError, match="ViT backbone"):
        registry.get("ijepa").cls(build_backbone("resnet18", width=8))
    with pytest.raises(ValueError, match="momentum"):
        make(base_momentum=1.1)
