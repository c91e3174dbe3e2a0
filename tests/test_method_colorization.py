"""Colorization: Lab conversion at known colours, the quantised ab space and its soft encoding, the multinomial
loss against numpy, the refusal of grey data (one line naming data.image_mode), 20 steps on real CIFAR-10 images
lower the loss, and the backbone (trained on grey inputs, 3 channels) loads in torchvision; the decoder is a head;
the exported backbone reads the luma of RGB inputs as the trained one reads the grey view."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from ssl_models import build_backbone, registry
from ssl_models.augment import RGB_MEAN, RGB_STD
from ssl_models.methods.colorization import (
    Colorization,
    ColorizationLoss,
    ab_bins,
    grey_input_backbone,
    lab_to_rgb,
    rgb_to_lab,
    soft_encode,
)
from stages import pretrain as stage
from stages.workspace.common import ConfigError
from support.origins_utils import twenty_steps_lower_the_loss
from support.tiny_ssl import make_stage_workspace, write_tiny_shards

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registered_as_information_restoration_of_the_origins():
    spec = registry.get("colorization")
    assert spec.family == "origins" and spec.cls.category == "information_restoration"


def test_lab_at_known_colours_and_round_trip():
    rgb = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]).T.reshape(1, 3, 4, 1)
    lab = rgb_to_lab(rgb)[0, :, :, 0].T
    expected = torch.tensor([[100.0, 0.0, 0.0], [53.24, 80.09, 67.20], [32.30, 79.19, -107.86], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(lab, expected, atol=0.05, rtol=0)  # CIE Lab (D65) reference values
    x = torch.rand(2, 3, 5, 5)
    torch.testing.assert_close(lab_to_rgb(rgb_to_lab(x)), x, atol=1e-4, rtol=0)


def test_quantised_ab_space_and_soft_encoding():
    bins = ab_bins(10)
    assert bins.shape == (225, 2) and torch.all(bins.remainder(10) == 0)
    assert [0.0, 0.0] in bins.tolist() and [100.0, 100.0] not in bins.tolist()  # grey in gamut, far corner not
    ab = torch.tensor([[[[3.0]], [[-2.0]]]])  # one pixel, a=3 b=-2
    z = soft_encode(ab, bins.float())
    assert z.shape == (1, 225, 1, 1) and float(z.sum()) == pytest.approx(1.0) and int((z > 0).sum()) == 5
    d = torch.cdist(torch.tensor([[3.0, -2.0]]), bins.float())[0]
    assert int(z[0, :, 0, 0].argmax()) == int(d.argmin())
    near = d.topk(5, largest=False).indices
    w = torch.exp(-(d[near] ** 2) / 50)
    torch.testing.assert_close(z[0, near, 0, 0], w / w.sum())  # Gaussian weights, sigma 5


def test_loss_is_the_multinomial_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 3, 3, generator=g)
    target = torch.softmax(torch.randn(2, 7, 3, 3, generator=g), dim=1)
    lg = logits.numpy().astype(np.float64)
    logp = lg - lg.max(axis=1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(axis=1, keepdims=True))
    ref = -(target.numpy() * logp).sum(axis=1).mean()
    assert float(ColorizationLoss()(logits, target)) == pytest.approx(ref, rel=1e-6)


def test_grey_data_is_refused_with_one_line_naming_data_image_mode(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", train=16, test=16)  # image_mode L
    ws = make_stage_workspace(tmp_path / "ws", shards, methods=["colorization"])
    with pytest.raises(ConfigError) as err:
        stage.pretrain("colorization", root=ws)
    message = str(err.value)
    assert "data.image_mode" in message and "\n" not in message
    assert not (ws / "runs" / "colorization").exists()
    with pytest.raises(ValueError, match="data.image_mode"):
        Colorization(build_backbone("resnet18", in_chans=1, small_image=True, width=4))


def test_the_network_sees_no_colour():
    torch.manual_seed(0)
    method = Colorization(
        build_backbone("resnet18", in_chans=3, small_image=True, width=4, stem_stride=2), decoder_dim=8
    )
    rgb = torch.rand(2, 3, 16, 16)
    views = (rgb - torch.tensor(RGB_MEAN)[:, None, None]) / torch.tensor(RGB_STD)[:, None, None]
    grey, ab = method.split(views)
    unnorm = grey * method.pixel_std + method.pixel_mean
    assert torch.allclose(unnorm[:, 0], unnorm[:, 1], atol=1e-6) and torch.allclose(
        unnorm[:, 1], unnorm[:, 2], atol=1e-6
    )
    torch.testing.assert_close(ab, rgb_to_lab(rgb)[:, 1:], atol=1e-3, rtol=0)


@pytest.mark.timeout(300)
def test_twenty_steps_on_cifar_lower_the_loss_and_the_backbone_loads_in_torchvision(cifar_tensors):
    rgb = cifar_tensors[0]
    images = (rgb - torch.tensor(RGB_MEAN)[:, None, None]) / torch.tensor(RGB_STD)[:, None, None]
    torch.manual_seed(0)
    method = Colorization(
        build_backbone("resnet18", in_chans=3, small_image=True, width=8, stem_stride=2), decoder_dim=32
    )
    before, after = twenty_steps_lower_the_loss(method, images)
    assert after < before - 0.1, (before, after)
    heads = {k.split(".")[0] for k in method.state_dict()} - {"backbone"}
    assert heads == {"decoder"}  # what export leaves out: the pipeline exports method.backbone's state only
    full = Colorization(build_backbone("resnet18", in_chans=3, small_image=True, width=64, stem_stride=2))
    reference = torchvision.models.resnet18(weights=None)
    reference.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1, bias=False)
    reference.maxpool, reference.fc = nn.Identity(), nn.Identity()
    reference.load_state_dict(full.backbone.state_dict(), strict=True)


def _trained_a_little(backbone: nn.Module) -> Colorization:
    """A method whose backbone has moved from init and has non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    method = Colorization(backbone, decoder_dim=8)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    views = (torch.rand(8, 3, 16, 16) - torch.tensor(RGB_MEAN)[:, None, None]) / torch.tensor(RGB_STD)[:, None, None]
    for _ in range(3):
        optimizer.zero_grad()
        method([views])["loss"].backward()
        optimizer.step()
    return method.eval()


@pytest.mark.parametrize(
    "config",
    [
        {"name": "resnet18", "in_chans": 3, "small_image": True, "width": 8},
        {"name": "vit_tiny", "image_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2},
    ],
)
def test_export_reads_the_luma_of_rgb_as_training_read_the_grey_view(config):
    method = _trained_a_little(build_backbone(**config))
    exported = method.exported_backbone().eval()
    assert exported is not method.backbone and exported.config == method.backbone.config
    rgb = torch.rand(4, 3, 16, 16)
    views = (rgb - torch.tensor(RGB_MEAN)[:, None, None]) / torch.tensor(RGB_STD)[:, None, None]
    grey, _ = method.split(views)
    with torch.no_grad():
        trained_on_grey, exported_on_rgb = method.backbone(grey), exported(views)
        # colour-blind: another RGB image with the same luma gives the same features
        shuffled = rgb[:, [0, 1, 2]] + torch.tensor([0.05, -0.05 * 0.299 / 0.587, 0.0])[:, None, None]
        views2 = (shuffled - torch.tensor(RGB_MEAN)[:, None, None]) / torch.tensor(RGB_STD)[:, None, None]
        same_luma = exported(views2)
    torch.testing.assert_close(same_luma, exported_on_rgb, atol=1e-4, rtol=1e-4)
    if config["name"].startswith("vit"):  # the patch embedding folds exactly
        torch.testing.assert_close(exported_on_rgb, trained_on_grey, atol=1e-4, rtol=1e-4)
    else:  # the stem's zero padding is the one place the fold is not exact
        error = (exported_on_rgb - trained_on_grey).norm() / trained_on_grey.norm()
        assert error < 0.1, float(error)
        assert not torch.allclose(method.backbone(views), trained_on_grey, atol=1e-3)  # colour did matter before


def test_grey_input_backbone_leaves_the_trained_backbone_untouched():
    backbone = build_backbone("resnet18", in_chans=3, small_image=True, width=4)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    grey_input_backbone(backbone, torch.tensor(RGB_MEAN), torch.tensor(RGB_STD))
    for k, v in backbone.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)
