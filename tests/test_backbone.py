"""SurgeNetXL backbone: parity with the authors' model, strict key checking, accepted checkpoint shapes."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from surgenet_assist.core.backbone import inspect_checkpoint, load_backbone
from surgenet_assist.core.errors import WeightsError
from tests.conftest import FIXTURES


@pytest.fixture(scope="module")
def reference():
    return np.load(FIXTURES / "surgenetxl_parity_seed0.npz")


def _outputs(backbone, reference):
    x = torch.rand(tuple(reference["input_shape"]), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        stages = backbone(x)
        pooled = backbone.pool(stages[-1])
    return stages, pooled


def test_parity_with_authors_model(surgenetxl_test_checkpoint, reference):
    backbone = load_backbone("surgenetxl", weights=surgenetxl_test_checkpoint)
    assert backbone.channels == (64, 128, 320, 512)
    assert backbone.reductions == (4, 8, 16, 32)
    stages, pooled = _outputs(backbone, reference)
    n, _, h, w = reference["input_shape"]
    for i, (stage, ch, red) in enumerate(zip(stages, backbone.channels, backbone.reductions, strict=True)):
        expected = reference[f"stage{i + 1}"]
        assert stage.shape == (n, ch, h // red, w // red)
        np.testing.assert_allclose(stage.numpy(), expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(pooled.numpy(), reference["pooled"], atol=1e-4, rtol=0)
    assert sum(p.numel() for p in backbone.trunk.parameters()) == 23_237_888


def test_stock_timm_starrelu_would_not_match(surgenetxl_test_checkpoint, reference):
    """Guards the ReLU choice: timm's StarReLU caformer computes something else on the same weights."""
    import timm
    from timm.models.metaformer import checkpoint_filter_fn

    stock = timm.create_model("caformer_s18", num_classes=0)
    state = torch.load(surgenetxl_test_checkpoint, weights_only=True)
    result = stock.load_state_dict(checkpoint_filter_fn(state, stock), strict=False)
    assert len(result.missing_keys) == 48
    with torch.no_grad():
        x = torch.rand(tuple(reference["input_shape"]), generator=torch.Generator().manual_seed(7))
        last = stock.forward_intermediates(x, intermediates_only=True)[-1]
    assert np.abs(last.numpy() - reference["stage4"]).max() > 1e-2


def test_dino_checkpoint_and_prefixed_state_dicts(tmp_path, surgenetxl_test_checkpoint, reference):
    teacher = torch.load(surgenetxl_test_checkpoint, weights_only=True)
    dino = {
        "teacher": {f"backbone.{k}": v for k, v in teacher.items()}
        | {"head.mlp.0.weight": torch.zeros(8, 512), "head.last_layer.weight_g": torch.ones(8, 1)},
        "student": {f"module.backbone.{k}": v for k, v in teacher.items()},
        "epoch": 50,
        "args": argparse.Namespace(arch="caformer_s18", data_mean=[0.5, 0.4, 0.3], data_std=[0.2, 0.2, 0.2]),
    }
    path = tmp_path / "SurgeNetXL_checkpoint0050.pth"
    torch.save(dino, path)
    backbone = load_backbone("surgenetxl", weights=path)
    assert backbone.mean == (0.5, 0.4, 0.3)
    stages, _ = _outputs(backbone, reference)
    np.testing.assert_allclose(stages[3].numpy(), reference["stage4"], atol=1e-4)

    prefixed = {f"module.backbone.{k}": v for k, v in teacher.items()}
    backbone2 = load_backbone("surgenetxl", weights=prefixed)
    assert backbone2.weights_sha256 == backbone.weights_sha256


def test_missing_and_unexpected_keys_are_listed(surgenetxl_test_checkpoint):
    state = torch.load(surgenetxl_test_checkpoint, weights_only=True)
    del state["stages.2.3.mlp.fc1.weight"]
    state["stages.9.extra.weight"] = torch.zeros(3)
    with pytest.raises(WeightsError) as err:
        load_backbone("surgenetxl", weights=state)
    text = str(err.value)
    assert "1 missing keys" in text and "stages.2.blocks.3.mlp.fc1.weight" in text
    assert "1 unexpected keys" in text and "stages.9.extra.weight" in text


def test_wrong_shapes_are_an_error(surgenetxl_test_checkpoint):
    state = torch.load(surgenetxl_test_checkpoint, weights_only=True)
    state["downsample_layers.0.conv.weight"] = torch.zeros(64, 3, 5, 5)
    with pytest.raises(WeightsError, match="shape mismatches"):
        load_backbone("surgenetxl", weights=state)


def test_wrong_architecture_name(surgenetxl_test_checkpoint):
    with pytest.raises(WeightsError, match="do not fit convnextv2_tiny"):
        load_backbone("surgenet-convnextv2", weights=surgenetxl_test_checkpoint)


def test_inspect_reports_fit(surgenetxl_test_checkpoint):
    info = inspect_checkpoint(surgenetxl_test_checkpoint)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert info["num_params"] == 23_237_888
    assert info["architecture"] == "caformer_s18" and len(info["sha256"]) == 64


@pytest.mark.parametrize("name", ["surgenet-convnextv2", "surgenet-pvtv2"])
def test_other_architectures_give_four_stages(name):
    backbone = load_backbone(name, random_init=True)
    with torch.no_grad():
        stages = backbone(torch.rand(1, 3, 64, 96))
    assert [s.shape[1] for s in stages] == list(backbone.channels)
    assert [64 // s.shape[2] for s in stages] == list(backbone.reductions)
    # a state dict of the model itself loads strictly
    backbone.load_weights(backbone.trunk.state_dict())
