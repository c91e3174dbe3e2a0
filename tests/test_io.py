"""Backbone files: exact round trip, strict torchvision load, no pickle, one-line errors for bad files."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

from ssl_models.backbones import build_backbone
from ssl_models.io import BackboneFileError, load_backbone, read_header, save_backbone

INPUT = {"channels": 1, "image_size": 28, "mean": [0.13], "std": [0.31]}


def _trained_like(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Perturb weights and BatchNorm running statistics so a round trip has something to lose."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(x)
    return model.eval()


def test_round_trip_resnet_and_vit_give_equal_features(tmp_path):
    x = torch.rand(6, 1, 28, 28)
    lineage = {"stage": "export", "data_version": "abc123", "parents": {"checkpoint": {"path": "runs/m/checkpoint.pt"}}}
    for name, kwargs in [
        ("resnet18", {"in_chans": 1, "small_image": True, "width": 8}),
        ("vit_tiny", {"in_chans": 1, "image_size": 28, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}),
    ]:
        model = _trained_like(build_backbone(name, **kwargs), x)
        path = tmp_path / f"{name}.safetensors"
        digest = save_backbone(path, model, {"input": INPUT, "lineage": lineage, "method": "simclr"})
        assert len(digest) == 64
        loaded = load_backbone(path)
        assert type(loaded) is type(model) and loaded.config == model.config and not loaded.training
        with torch.no_grad():
            assert torch.allclose(model(x), loaded(x), atol=1e-6, rtol=0)
        header = read_header(path)
        assert header["lineage"] == lineage and header["input"] == INPUT and header["method"] == "simclr"
        assert header["feature_dim"] == model.feature_dim
    # the file is safetensors (8-byte header length, then JSON): no pickle to execute
    raw = (tmp_path / "resnet18.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8 : 8 + header_len])["__metadata__"]["format"] == "sslcook.backbone/1"


def test_exported_resnet_loads_into_torchvision_strict(tmp_path):
    x = torch.rand(2, 3, 32, 32)
    model = _trained_like(build_backbone("resnet18", in_chans=3, small_image=False, width=64), x)
    path = tmp_path / "r18.safetensors"
    save_backbone(path, model)
    reference = torchvision.models.resnet18(weights=None)
    reference.fc = nn.Identity()
    reference.load_state_dict(load_file(path), strict=True)
    with torch.no_grad():
        assert torch.allclose(reference.eval()(x), model(x), atol=1e-5)

    # the small-image stem is torchvision's resnet with its first conv and max-pool swapped
    small = _trained_like(build_backbone("resnet18", in_chans=1, small_image=True, width=64), torch.rand(2, 1, 28, 28))
    save_backbone(tmp_path / "small.safetensors", small)
    reference = torchvision.models.resnet18(weights=None)
    reference.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    reference.maxpool, reference.fc = nn.Identity(), nn.Identity()
    reference.load_state_dict(load_file(tmp_path / "small.safetensors"), strict=True)


def _one_line_error(path, **kwargs) -> str:
    with pytest.raises(BackboneFileError) as err:
        load_backbone(path, **kwargs)
    message = str(err.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def test_bad_backbone_files_give_one_line_errors(tmp_path):
    model = build_backbone("resnet18", in_chans=1, small_image=True, width=4)
    good = tmp_path / "models" / "m" / "backbone.safetensors"
    save_backbone(good, model, {"input": INPUT})

    assert "not found" in _one_line_error(tmp_path / "nope.safetensors")

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    assert "truncated.safetensors" in _one_line_error(truncated)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x80\x04\x95 this is a pickle, not safetensors" * 10)
    assert "not a readable safetensors file" in _one_line_error(garbage)

    no_header = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, no_header)
    assert "no backbone_config" in _one_line_error(no_header)

    # weights of width 4 under a header claiming width 8
    wrong_config = tmp_path / "wrong_config.safetensors"
    header = {k: json.dumps(v) for k, v in read_header(good).items()}
    header["backbone_config"] = json.dumps({**model.config, "width": 8})
    save_file(load_file(good), wrong_config, metadata=header)
    message = _one_line_error(wrong_config)
    assert "weights do not match backbone_config resnet18" in message and "another shape" in message

    # a header feature_dim that is not what the architecture gives
    wrong_dim = tmp_path / "wrong_dim.safetensors"
    header = {k: json.dumps(v) for k, v in read_header(good).items()}
    header["feature_dim"] = "128"
    save_file(load_file(good), wrong_dim, metadata=header)
    assert "feature_dim 128" in _one_line_error(wrong_dim)
    assert "expected 64" in _one_line_error(good, expected_feature_dim=64)

    # model card beside the weights that describes something else
    card = {"backbone_config": model.config, "feature_dim": model.feature_dim, "weights": {"sha256": "0" * 64}}
    (good.parent / "model_card.json").write_text(json.dumps(card))
    assert "different exports" in _one_line_error(good)
    card["backbone_config"] = {**model.config, "width": 16}
    (good.parent / "model_card.json").write_text(json.dumps(card))
    assert "model_card.json: backbone_config" in _one_line_error(good)
    card["backbone_config"], card["feature_dim"] = model.config, 7
    (good.parent / "model_card.json").write_text(json.dumps(card))
    assert "feature_dim 7" in _one_line_error(good)
    (good.parent / "model_card.json").write_text("{not json")
    assert "not valid JSON" in _one_line_error(good)
    # the file alone still loads when the card is not consulted
    assert load_backbone(good, card=False).feature_dim == 32
