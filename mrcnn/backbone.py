"""A pretrained ResNet backbone as torchvision's detection builders set it up: weights, frozen layers.

The paper, torchvision's reference and Detectron2 start Mask R-CNN from ImageNet weights. Here:
- `load_imagenet_backbone` copies torchvision's ImageNet ResNet weights (`IMAGENET1K_V1`, the
  ones torchvision's COCO models were trained from) into the ResNet of a model, strictly, from
  the torch hub cache (`$TORCH_HOME/hub/checkpoints/resnet50-0676ba61.pth` for ResNet-50,
  `resnet18-f37072fd.pth` for ResNet-18), downloading the file where the node has network;
- `trainable_layers` resolves `--trainable-backbone-layers` with torchvision's meaning and
  default (`_validate_trainable_layers`: 3 of the 5 stages train when pretrained, all 5 otherwise);
- `freeze_backbone` sets `requires_grad` as torchvision's `_resnet_fpn_extractor` does, and keeps
  every BatchNorm of a pretrained ResNet frozen (eval mode, no gradient): the arithmetic of
  torchvision's `FrozenBatchNorm2d`, while the modules, and so the state_dict, stay `BatchNorm2d`.
  A few images per worker would otherwise overwrite the statistics the weights were trained with.

Default weights: "imagenet" for the R50 presets; "none" for `small` and `tiny`, which are meant
to train from scratch in minutes on a CPU without network (ImageNet's ResNet-18 fits them too:
`--backbone-weights imagenet`).
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, ResNet50_Weights, WeightsEnum

from mrcnn.presets import get_preset
from mrcnn.torchvision_models import hub_cache_path
from mrcnn.weights import WeightsError, read_hub_weights

BACKBONE_WEIGHTS: tuple[str, ...] = ("imagenet", "none")
# torchvision's detection builders: 5 trainable stages at most, 3 by default when pretrained.
MAX_TRAINABLE_LAYERS = 5
DEFAULT_TRAINABLE_LAYERS = 3
# Stages from the top of the ResNet down, in the order `trainable_layers` unfreezes them.
_STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")
_IMAGENET = {"resnet50": ResNet50_Weights.IMAGENET1K_V1, "resnet18": ResNet18_Weights.IMAGENET1K_V1}


def default_backbone_weights(preset: str) -> str:
    """"imagenet" for the ResNet-50 presets, "none" for the small CPU presets."""
    return "imagenet" if get_preset(preset).backbone == "resnet50" else "none"


def imagenet_weights(preset: str) -> WeightsEnum:
    """torchvision's ImageNet weights for the ResNet of `preset`."""
    return _IMAGENET[get_preset(preset).backbone]


def imagenet_cache_path(preset: str) -> str:
    """The hub-cache file `load_imagenet_backbone` reads for `preset` (it may not exist yet)."""
    return hub_cache_path(imagenet_weights(preset))


def read_imagenet_weights(preset: str) -> dict[str, torch.Tensor]:
    """The ImageNet ResNet state_dict for `preset`: from the hub cache, else downloaded.

    Raises `WeightsError` (one line naming the file) where it is neither cached nor downloadable.
    """
    return read_hub_weights(
        imagenet_weights(preset), "--backbone-weights imagenet", "or pass --backbone-weights none"
    )


def ensure_imagenet_weights(preset: str) -> str:
    """The hub-cache path of the ImageNet weights for `preset`, downloaded there if missing.

    For a driver to check up front what every worker will load; raises `WeightsError` (one line
    naming the file) where the file is neither cached nor downloadable.
    """
    path = imagenet_cache_path(preset)
    if not os.path.exists(path):
        read_imagenet_weights(preset)
    return path


def load_imagenet_backbone(model: nn.Module, preset: str) -> None:
    """Copy the ImageNet ResNet weights into `model.backbone.body`, strictly.

    The classifier (`fc.*`) is the only part of the file a detection backbone has no use for;
    every other tensor must fit, and every tensor of the body must be in the file.
    """
    state = {k: v for k, v in read_imagenet_weights(preset).items() if not k.startswith("fc.")}
    try:
        model.backbone.body.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise WeightsError(
            f"{imagenet_cache_path(preset)}: does not fit the {preset} backbone "
            f"({str(error).splitlines()[-1].strip()})"
        ) from error


def trainable_layers(pretrained: bool, requested: int | None) -> int:
    """How many ResNet stages train, as torchvision's detection builders decide it.

    Pretrained: `requested`, or 3 when None. Not pretrained: all 5, whatever was requested.
    """
    if not pretrained:
        return MAX_TRAINABLE_LAYERS
    layers = DEFAULT_TRAINABLE_LAYERS if requested is None else requested
    if not 0 <= layers <= MAX_TRAINABLE_LAYERS:
        raise ValueError(f"trainable backbone layers must be in 0..{MAX_TRAINABLE_LAYERS}, got {layers}")
    return layers


def freeze_backbone(model: nn.Module, layers: int) -> None:
    """Freeze all but the top `layers` stages of a pretrained ResNet, and all its BatchNorm.

    Call after every `model.train()` (which puts BatchNorm back in training mode). The stages
    that train are torchvision's: `layer4`, `layer3`, `layer2`, `layer1`, then `conv1` (and `bn1`).
    """
    body = model.backbone.body
    training = _STAGES[:layers] + (("bn1",) if layers == MAX_TRAINABLE_LAYERS else ())
    for name, parameter in body.named_parameters():
        parameter.requires_grad_(name.startswith(training))
    for module in body.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
            module.requires_grad_(False)
