"""Where a model's weights start before training, and which of them train: other weights copied
in by name and shape, a pretrained backbone frozen as torchvision's builders freeze it."""

from __future__ import annotations

import torch

from mrcnn import torchvision_models
from mrcnn.backbone import freeze_backbone
from mrcnn.categories import Category
from mrcnn.transfer import shared_labels, transferred_state
from mrcnn.weights import WeightsError, read_state_dict
from pipeline.cluster.job_log import say


def initialise_from(
    model: torch.nn.Module, uri: str, *, log: bool, categories: tuple[Category, ...] | None = None
) -> tuple[int, int]:
    """Copy into `model` every tensor of the weights at `uri` whose name and shape match.

    Class-specific layers (the box and mask predictors) differ between a COCO checkpoint and a
    model of other categories. For `torchvision:<builder>` weights and the dataset's
    `categories`, the rows of categories named as a COCO class (`person`, `dog`) are copied from
    that class's rows (`mrcnn.transfer`); the others keep their random initialisation. Returns
    (copied, total tensors of the model); raises `mrcnn.weights.WeightsError` when nothing matches.
    """
    source = read_state_dict(uri)
    own = model.state_dict()
    labels = None
    if categories and torchvision_models.is_torchvision(uri):
        names = ["__background__", *(category.name for category in categories)]
        labels = shared_labels(torchvision_models.categories(torchvision_models.builder_of(uri)), names)
    state, rows = transferred_state(own, source, labels)
    if not state:
        raise WeightsError(f"{uri}: no tensor fits the model (names or shapes all differ)")
    model.load_state_dict(state, strict=False)
    if log:
        say(
            f"train: initialised {len(state)} of {len(own)} tensors from {uri} "
            f"(the rest, e.g. {sorted(set(own) - set(state))[:3]}, stay random)"
            + (f"; predictor rows of {rows} categories from the classes of the same name" if rows else "")
        )
    return len(state), len(own)


def set_training_mode(model: torch.nn.Module, pretrained: bool, trainable_layers: int) -> None:
    """`model.train()`, except that a pretrained backbone is frozen as torchvision's builders do.

    With ImageNet or `--init-weights` weights (`pretrained`), only the top `trainable_layers`
    ResNet stages train and every BatchNorm of the ResNet normalises with its stored statistics and
    is not trained (`mrcnn.backbone.freeze_backbone`): batch statistics of a few images per worker
    would overwrite those the weights were trained with.
    """
    model.train()
    if pretrained:
        freeze_backbone(model, trainable_layers)
