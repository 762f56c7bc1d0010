"""torchvision's COCO Mask R-CNN models by name: which names there are, the preset each matches, the
classes of their weights, and where the torch hub cache keeps their files.

What both the model spec (`mrcnn.model_spec`, categories of a `torchvision:<name>` model) and the
weights loader (`mrcnn.weights`, the file to read or download) need, so that neither imports the
other. torchvision itself (about 3 s of imports on a small machine) is imported only by the
functions that need it, never by a driver that only reads a model folder's spec.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from mrcnn.errors import UserError

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

PREFIX = "torchvision:"

# The torchvision builders whose COCO weights fit our presets, and the preset each one matches.
PRESETS: dict[str, str] = {
    "maskrcnn_resnet50_fpn": "r50-fpn",
    "maskrcnn_resnet50_fpn_v2": "r50-fpn-v2",
}


class UnknownTorchvisionModel(UserError):
    """A `torchvision:<name>` that is not one of `PRESETS`."""


def is_torchvision(uri: str) -> bool:
    return uri.startswith(PREFIX)


def builder_of(uri: str) -> str:
    """`torchvision:<name>` -> `<name>`."""
    return uri[len(PREFIX) :]


def default_weights(builder: str) -> WeightsEnum:
    """torchvision's COCO weights of `builder`; `UnknownTorchvisionModel` for another name."""
    if builder not in PRESETS:
        raise UnknownTorchvisionModel(
            f"{PREFIX}{builder}: unknown torchvision model "
            f"(choose from {', '.join(PREFIX + name for name in PRESETS)})"
        )
    from torchvision.models import get_model_weights

    return get_model_weights(builder).DEFAULT


def categories(builder: str) -> list[str]:
    """Names of the classes of torchvision's COCO weights for `builder`, index = label."""
    return list(default_weights(builder).meta["categories"])


def hub_cache_path(weights: WeightsEnum) -> str:
    """Where the torch hub cache keeps the file of torchvision `weights` (it may not exist).

    `$TORCH_HOME/hub/checkpoints/<file name of the weights' URL>`, as `torch.hub` names it.
    """
    import torch

    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def cache_path(builder: str) -> str:
    """Where the torch hub cache keeps torchvision's COCO weights for `builder` (it may not exist)."""
    return hub_cache_path(default_weights(builder))
