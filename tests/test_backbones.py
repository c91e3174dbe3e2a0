"""Backbones: output shapes on grey 28x28 and colour 32x32 / 96x96 inputs, torchvision key compatibility,
rebuild from config, and the ViT hooks masked image modeling relies on."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from ssl_models import build_backbone
from ssl_models.backbones import sincos_position_embedding

# (channels, size): MNIST-like grey, CIFAR-like and STL-like colour
INPUTS = [(1, 28), (3, 32), (3, 96)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("channels,size", INPUTS)
@pytest.mark.parametrize("name,width,expansion", [("resnet18", 8, 1), ("resnet50", 4, 4)])
@pytest.mark.parametrize("small_image", [True, False])
def test_resnet_shapes(name, width, expansion, small_image, channels, size):
    net = build_backbone(name, in_chans=channels, small_image=small_image, width=width).eval()
    assert net.feature_dim == width * 8 * expansion
    with torch.no_grad():
        x = torch.randn(2, channels, size, size)
        out, fmap = net(x), net.forward_map(x)
    assert out.shape == (2, net.feature_dim)
    # the small-image stem keeps 8x more resolution: 32x32 -> 4x4 instead of 1x1 at the last stage
    expected = -(-size // 8) if small_image else -(-size // 32)
    assert fmap.shape[-1] == expected


@pytest.mark.parametrize("channels,size", INPUTS)
@pytest.mark.parametrize("name,dim", [("vit_tiny", 192), ("vit_small", 384)])
def test_vit_shapes(name, dim, channels, size):
    patch = 4 if size <= 32 else 8
    vit = build_backbone(name, in_chans=channels, image_size=size, patch_size=patch, depth=1).eval()
    assert vit.feature_dim == dim and vit.config["embed_dim"] == dim
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        feats = vit.forward_features(x)
        out = vit(x)
    n = (size // patch) ** 2
    assert feats["cls"].shape == (2, dim) and feats["patch_tokens"].shape == (2, n, dim)
    assert out.shape == (2, dim)
    assert vit.patchify(x).shape == (2, n, patch * patch * channels)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_state_dict_loads_into_torchvision_strict(name):
    ours = build_backbone(name)
    reference = getattr(torchvision.models, name)(weights=None)
    reference.fc = nn.Identity()
    reference.load_state_dict(ours.state_dict(), strict=True)
    reference.eval(), ours.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reference(x), ours(x))


def test_small_image_resnet_keeps_torchvision_names():
    ours = build_backbone("resnet18", small_image=True, in_chans=1)
    reference = torchvision.models.resnet18(weights=None)
    reference.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    reference.maxpool = nn.Identity()
    reference.fc = nn.Identity()
    reference.load_state_dict(ours.state_dict(), strict=True)
    reference.eval(), ours.eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(reference(x), ours(x))


def test_small_stem_at_stride_two_halves_the_map_and_keeps_torchvision_names():
    ours = build_backbone("resnet18", small_image=True, stem_stride=2, width=16, in_chans=1)
    x = torch.randn(2, 1, 28, 28)
    assert ours.forward_map(x).shape == (2, 128, 2, 2)  # 28 -> 14 -> 7 -> 4 -> 2
    assert build_backbone("resnet18", small_image=True, width=16, in_chans=1).forward_map(x).shape[-1] == 4
    reference = torchvision.models.resnet18(weights=None)
    reference.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=2, padding=1, bias=False)
    reference.maxpool, reference.fc = nn.Identity(), nn.Identity()
    full = build_backbone("resnet18", small_image=True, stem_stride=2, in_chans=1)
    reference.load_state_dict(full.state_dict(), strict=True)
    reference.eval(), full.eval()
    with torch.no_grad():
        torch.testing.assert_close(reference(x), full(x))
    with pytest.raises(ValueError, match="stem_stride"):
        build_backbone("resnet18", small_image=True, stem_stride=3)
    with pytest.raises(ValueError, match="small_image stem only"):
        build_backbone("resnet18", stem_stride=2)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(name="resnet18", small_image=True, width=16, in_chans=1),
        dict(name="resnet18", small_image=True, stem_stride=2, width=16, in_chans=1),
        dict(name="vit_tiny", image_size=32, patch_size=4, depth=2),
    ],
)
def test_config_rebuilds_the_same_architecture(kwargs):
    torch.manual_seed(0)
    net = build_backbone(**kwargs)
    again = build_backbone(**net.config)
    again.load_state_dict(net.state_dict(), strict=True)
    assert again.config == net.config and again.feature_dim == net.feature_dim
    x = torch.randn(2, kwargs.get("in_chans", 3), 32, 32)
    net.eval(), again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), net(x))


def test_vit_jepa_init_is_the_official_codes_and_travels_in_the_config():
    torch.manual_seed(0)
    net = build_backbone("vit_tiny", image_size=32, patch_size=4, depth=3, init="jepa")
    assert net.config["init"] == "jepa" and build_backbone("vit_tiny", depth=1).config["init"] == "mae"
    qkv = net.blocks[0].attn.qkv.weight
    assert abs(qkv.std().item() - 0.02) < 0.002 and abs(net.patch_embed.weight.std().item() - 0.02) < 0.004
    assert not net.blocks[1].mlp[0].bias.any()
    for number, block in enumerate(net.blocks, start=1):  # output projections shrink with depth
        for w in (block.attn.proj.weight, block.mlp[2].weight):
            assert abs(w.std().item() * (2 * number) ** 0.5 - 0.02) < 0.002
    # a baseline rebuilt from the config starts from the same distribution, not from MAE's xavier init
    again = build_backbone(**net.config)
    assert abs(again.blocks[2].mlp[2].weight.std().item() - 0.02 / 6**0.5) < 0.001
    mae = build_backbone("vit_tiny", image_size=32, patch_size=4, depth=3)
    assert mae.blocks[0].attn.qkv.weight.std().item() > 0.04
    with pytest.raises(ValueError, match="init must be 'mae' or 'jepa', got 'xavier'"):
        build_backbone("vit_tiny", init="xavier")


def test_unknown_backbone_or_option_is_an_error():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("resnet34")
    with pytest.raises(ValueError, match="unknown option.*depthh"):
        build_backbone("vit_tiny", depthh=3)
    # options of the other family are ignored so one params block can describe either
    assert build_backbone("resnet18", patch_size=4, width=8).feature_dim == 64


def test_vit_masking_hooks():
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        full = vit.forward_features(x)
        # MAE: keeping every patch in order is the plain forward; a subset runs the encoder on fewer tokens
        same = vit.forward_features(x, keep_index=torch.arange(16).expand(3, 16))
        torch.testing.assert_close(same["patch_tokens"], full["patch_tokens"])
        keep = torch.stack([torch.randperm(16)[:4] for _ in range(3)])
        part = vit.forward_features(x, keep_index=keep)
        assert part["patch_tokens"].shape == (3, 4, 32)
        # SimMIM: an empty mask changes nothing; a masked patch takes the mask token's place
        mask_token = torch.randn(32)
        none = vit.forward_features(x, token_mask=torch.zeros(3, 16, dtype=torch.bool), mask_token=mask_token)
        torch.testing.assert_close(none["cls"], full["cls"])
        token_mask = torch.zeros(3, 16, dtype=torch.bool)
        token_mask[:, 5] = True
        y = x.clone()
        y[:, :, 4:8, 4:8] = 7.0  # patch 5 (row 1, column 1): its pixels no longer matter once masked
        a = vit.forward_features(x, token_mask=token_mask, mask_token=mask_token)
        b = vit.forward_features(y, token_mask=token_mask, mask_token=mask_token)
        torch.testing.assert_close(a["patch_tokens"], b["patch_tokens"])
        assert not torch.allclose(vit.forward_features(y)["cls"], full["cls"])
    # sine-cosine positions: distinct per patch, computed for any grid (DINO's local crops)
    pos = sincos_position_embedding(4, 4, 32)
    assert pos.shape == (16, 32) and torch.cdist(pos, pos).add(torch.eye(16)).min() > 0.1
    assert vit(torch.randn(2, 3, 8, 8)).shape == (2, 32)
