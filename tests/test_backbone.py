"""Pretrained starts: ImageNet backbones from the hub cache, frozen layers as torchvision sets them,
and COCO predictor rows for a dataset's COCO-named categories.

No network: the hub cache (`TORCH_HOME`) holds files of the names torchvision uses, with random
tensors of the right shapes; "no network" is a proxy on a closed port of 127.0.0.1.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from test_train import make_dataset, run_job
from torchvision.models import ResNet50_Weights, resnet18, resnet50
from torchvision.models.detection import maskrcnn_resnet50_fpn

from jobs import train as train_job
from mrcnn import WeightsError, build_model
from mrcnn.backbone import (
    default_backbone_weights,
    ensure_imagenet_weights,
    freeze_backbone,
    load_imagenet_backbone,
    trainable_layers,
)
from mrcnn.categories import Category
from mrcnn.torchvision_models import cache_path as torchvision_cache_path
from pipeline.train.config import TrainConfig
from pipeline.train.weight_init import initialise_from, set_training_mode

IMAGENET_FILES = {"resnet50": "resnet50-0676ba61.pth", "resnet18": "resnet18-f37072fd.pth"}


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> str:
    """A TORCH_HOME whose hub cache holds random ImageNet ResNets and a random COCO Mask R-CNN."""
    home = tmp_path_factory.mktemp("torch-home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(resnet50().state_dict(), checkpoints / IMAGENET_FILES["resnet50"])
    torch.save(resnet18().state_dict(), checkpoints / IMAGENET_FILES["resnet18"])
    coco = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    os.environ["TORCH_HOME"], previous = str(home), os.environ.get("TORCH_HOME")
    try:
        torch.save(coco.state_dict(), torchvision_cache_path("maskrcnn_resnet50_fpn"))
    finally:
        _restore("TORCH_HOME", previous)
    return str(home)


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@pytest.fixture
def offline(monkeypatch):
    """No network: HTTPS through a proxy on a closed port of loopback."""
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")


@pytest.mark.parametrize(("preset", "backbone"), [("r50-fpn", "resnet50"), ("tiny", "resnet18")])
def test_imagenet_weights_load_strictly_from_the_hub_cache(hub_cache, monkeypatch, offline, preset, backbone):
    monkeypatch.setenv("TORCH_HOME", hub_cache)
    path = os.path.join(hub_cache, "hub", "checkpoints", IMAGENET_FILES[backbone])
    assert ensure_imagenet_weights(preset) == path
    model = build_model(preset, 3)
    load_imagenet_backbone(model, preset)
    stored = torch.load(path, weights_only=True)
    # torchvision's real files have no num_batches_tracked; BatchNorm loads strictly without it.
    body = {k: v for k, v in model.backbone.body.state_dict().items() if "num_batches" not in k}
    assert set(body) == {k for k in stored if not k.startswith("fc.") and "num_batches" not in k}
    for key, value in body.items():
        assert torch.equal(value, stored[key]), key


def test_missing_imagenet_weights_offline_give_one_line_naming_the_file(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError) as error:
        ensure_imagenet_weights("r50-fpn")
    message = str(error.value)
    assert "\n" not in message
    assert os.path.join(str(tmp_path), "hub", "checkpoints", IMAGENET_FILES["resnet50"]) in message
    assert "--backbone-weights none" in message

    data = make_dataset(str(tmp_path / "shapes"))
    result = run_job(
        "--train-annotations", data[0], "--train-images", data[1], "--output", str(tmp_path / "o"),
        "--preset", "r50-fpn", env={"TORCH_HOME": str(tmp_path)},
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train: error:") and IMAGENET_FILES["resnet50"] in last, result.stderr


def test_defaults_are_imagenet_for_r50_and_none_for_the_cpu_presets():
    assert [default_backbone_weights(p) for p in ("r50-fpn", "r50-fpn-v2", "small", "tiny")] == [
        "imagenet", "imagenet", "none", "none",
    ]
    help_text = train_job.build_parser().format_help()
    assert "--backbone-weights" in help_text and "--trainable-backbone-layers" in help_text
    assert trainable_layers(True, None) == 3 and trainable_layers(False, 1) == 5
    with pytest.raises(ValueError):
        trainable_layers(True, 6)


@pytest.mark.parametrize("layers", [None, 0, 1, 2, 3, 4, 5])
def test_trainable_layers_and_frozen_batchnorm_are_torchvisions(hub_cache, monkeypatch, layers):
    """requires_grad of every parameter as torchvision's own builder sets it, both on `meta`."""
    monkeypatch.setenv("TORCH_HOME", hub_cache)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # loading real tensors into meta ones is a no-op
        reference = maskrcnn_resnet50_fpn(
            weights=None, weights_backbone=ResNet50_Weights.IMAGENET1K_V1, trainable_backbone_layers=layers
        )
        model = build_model("r50-fpn", 91)
    config = TrainConfig(
        train_annotations="a", train_images="i", output="o", preset="r50-fpn", backbone_weights="imagenet",
        trainable_backbone_layers=layers,
    )
    assert config.pretrained and config.trainable_layers == trainable_layers(True, layers)
    set_training_mode(model, config.pretrained, config.trainable_layers)
    ours = dict(model.named_parameters())
    theirs = dict(reference.named_parameters())
    for name, parameter in theirs.items():
        assert ours[name].requires_grad == parameter.requires_grad, name
    # torchvision's FrozenBatchNorm2d holds buffers; ours are BatchNorm2d, frozen and in eval mode.
    norms = [m for m in model.backbone.body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(not m.training and not m.weight.requires_grad for m in norms)
    norm_parameters = {
        f"backbone.body.{name}.{kind}"
        for name, module in model.backbone.body.named_modules()
        if isinstance(module, torch.nn.BatchNorm2d)
        for kind in ("weight", "bias")
    }
    assert set(ours) - set(theirs) == norm_parameters
    assert model.roi_heads.training and model.backbone.fpn.training


def test_freezing_is_idempotent_after_train(hub_cache):
    model = build_model("tiny", 3)
    freeze_backbone(model, 2)
    model.train()
    freeze_backbone(model, 2)
    trainable = {n.split(".")[0] for n, p in model.backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}


def test_coco_fine_tune_copies_the_rows_of_coco_named_categories(hub_cache, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", hub_cache)
    coco = torch.load(torchvision_cache_path("maskrcnn_resnet50_fpn"), weights_only=True)
    categories = (Category(4, "person"), Category(9, "Dog"), Category(11, "widget"))
    torch.manual_seed(5)
    model = build_model("r50-fpn", len(categories) + 1)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    initialise_from(model, "torchvision:maskrcnn_resnet50_fpn", log=False, categories=categories)
    state = model.state_dict()
    coco_label = {"background": 0, "person": 1, "dog": 18}
    ours = {"background": 0, "person": 1, "dog": 2}
    # Written out again rather than imported from mrcnn.transfer: the test's own statement of
    # which rows belong to a class, so that a wrong table there cannot pass unnoticed.
    rows = {
        "roi_heads.box_predictor.cls_score.weight": 1,
        "roi_heads.box_predictor.cls_score.bias": 1,
        "roi_heads.box_predictor.bbox_pred.weight": 4,
        "roi_heads.box_predictor.bbox_pred.bias": 4,
        "roi_heads.mask_predictor.mask_fcn_logits.weight": 1,
        "roi_heads.mask_predictor.mask_fcn_logits.bias": 1,
    }
    for key, per in rows.items():
        assert state[key].shape[0] == 4 * per
        for name, label in ours.items():
            source = coco_label[name]
            assert torch.equal(
                state[key][label * per : (label + 1) * per], coco[key][source * per : (source + 1) * per]
            ), (key, name)
        widget = slice(3 * per, 4 * per)
        assert torch.equal(state[key][widget], fresh[key][widget]), key  # not a COCO class: fresh
    conv = "backbone.body.layer2.0.conv1.weight"
    assert torch.equal(state[conv], coco[conv])
