"""What a model folder's `model.json` says (`ModelSpec`), read without torch.

`load_spec` runs once in the driver of every job, which checks `--model` before Ray starts and
hands the spec on to its stages; nothing here imports torch or torchvision (their import costs a
job's driver about 3 s of start-up, BENCHMARKS.md "Start-up of the whole command and one actor
per core"), except for a `torchvision:` name, whose categories torchvision holds
(`mrcnn.torchvision_models`). Loading and saving the weights is `mrcnn.model_folder`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from mrcnn import storage, torchvision_models
from mrcnn.categories import Category
from mrcnn.errors import UserError
from mrcnn.presets import get_preset

WEIGHTS_FILE = "weights.pt"
SPEC_FILE = "model.json"


class ModelError(UserError):
    """A model folder that is missing, incomplete or inconsistent; the message is one line."""


@dataclass(frozen=True)
class ModelSpec:
    """What a model is: its architecture, input size and the categories behind its labels."""

    preset: str
    num_classes: int
    roi_op: str
    mask_loss: str
    min_size: int
    max_size: int
    categories: tuple[Category, ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, source: str) -> ModelSpec:
        try:
            fields = json.loads(text)
            categories = tuple(Category(id=int(c["id"]), name=str(c["name"])) for c in fields["categories"])
            spec = cls(
                preset=str(fields["preset"]),
                num_classes=int(fields["num_classes"]),
                roi_op=str(fields["roi_op"]),
                mask_loss=str(fields["mask_loss"]),
                min_size=int(fields["min_size"]),
                max_size=int(fields["max_size"]),
                categories=categories,
            )
        except (ValueError, KeyError, TypeError) as error:
            raise ModelError(f"{source}: not a valid {SPEC_FILE} ({type(error).__name__}: {error})") from None
        if len(categories) != spec.num_classes - 1:
            raise ModelError(
                f"{source}: {len(categories)} categories for num_classes={spec.num_classes} "
                f"(expected num_classes - 1, the background has no category)"
            )
        return spec


def load_spec(uri: str) -> ModelSpec:
    """The `ModelSpec` of a model folder or a `torchvision:<builder>` name."""
    if torchvision_models.is_torchvision(uri):
        return _torchvision_spec(torchvision_models.builder_of(uri))
    spec_uri = storage.join(uri, SPEC_FILE)
    try:
        text = storage.read_bytes(spec_uri).decode()
    except storage.StorageError as error:
        raise ModelError(
            f"{uri}: not a model folder ({SPEC_FILE} missing or unreadable: {error})"
        ) from error
    return ModelSpec.from_json(text, spec_uri)


def _torchvision_spec(builder: str) -> ModelSpec:
    """torchvision's COCO models predict the COCO category id itself as the label (91 classes,
    "N/A" for the ids COCO left unused), so category i is simply label i."""
    try:
        names = torchvision_models.categories(builder)
    except torchvision_models.UnknownTorchvisionModel as error:
        raise ModelError(str(error)) from error
    preset = torchvision_models.PRESETS[builder]
    sizes = get_preset(preset)
    return ModelSpec(
        preset=preset,
        num_classes=len(names),
        roi_op="align",
        mask_loss="sigmoid",
        min_size=sizes.min_size,
        max_size=sizes.max_size,
        categories=tuple(Category(id=label, name=name) for label, name in enumerate(names) if label > 0),
    )
