"""The exported model folder: `weights.pt` (a plain state_dict) and `model.json` (what it is).

`model.json` carries everything needed to rebuild the model without guessing:
`{"preset", "num_classes", "roi_op", "mask_loss", "min_size", "max_size", "categories": [{"id", "name"}]}`
with categories in the dataset's original ids; the model's label `i` is `categories[i - 1]`.

A folder is complete when `model.json` exists. On local disk the folder is written under a hidden
temporary name and renamed into place, so it appears whole; on S3 (no rename) `weights.pt` is put
first and `model.json` last, and readers look for `model.json`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass

import torch
from torch import nn

from mrcnn import storage
from mrcnn.categories import Category
from mrcnn.model import MaskRCNN, build_model
from mrcnn.presets import get_preset
from mrcnn.weights import (
    TORCHVISION_PREFIX,
    TORCHVISION_PRESETS,
    WeightsError,
    load_weights,
    torchvision_categories,
)

WEIGHTS_FILE = "weights.pt"
SPEC_FILE = "model.json"


class ModelError(Exception):
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

    def category_of(self, label: int) -> Category:
        """The category behind the model's label (1..num_classes-1)."""
        return self.categories[label - 1]


def spec_for(model: MaskRCNN, categories: list[Category] | tuple[Category, ...]) -> ModelSpec:
    """The spec describing `model`, whose labels 1..K stand for `categories` in order."""
    return ModelSpec(
        preset=model.preset.name,
        num_classes=model.num_classes,
        roi_op=model.roi_op,
        mask_loss=model.mask_loss,
        min_size=int(model.transform.min_size[0]),
        max_size=int(model.transform.max_size),
        categories=tuple(categories),
    )


def save_model_folder(model: nn.Module, spec: ModelSpec, uri: str) -> None:
    """Write `uri/weights.pt` and `uri/model.json` so that the folder appears only when complete."""
    weights = _state_dict_bytes(model)
    _, path = storage.resolve(uri)
    if storage.is_s3(uri):
        storage.write_bytes(storage.join(uri, WEIGHTS_FILE), weights)
        storage.write_bytes(storage.join(uri, SPEC_FILE), spec.to_json().encode())
        return
    parent, name = os.path.split(path)
    staging = os.path.join(parent, f".{name}.{uuid.uuid4().hex}.tmp")
    os.makedirs(staging)
    try:
        with open(os.path.join(staging, WEIGHTS_FILE), "wb") as file:
            file.write(weights)
        with open(os.path.join(staging, SPEC_FILE), "w") as file:
            file.write(spec.to_json())
        if os.path.exists(path):
            shutil.rmtree(path)
        os.rename(staging, path)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging)


def load_spec(uri: str) -> ModelSpec:
    """The `ModelSpec` of a model folder or a `torchvision:<builder>` name."""
    if uri.startswith(TORCHVISION_PREFIX):
        return _torchvision_spec(uri[len(TORCHVISION_PREFIX) :])
    spec_uri = storage.join(uri, SPEC_FILE)
    try:
        text = storage.read_bytes(spec_uri).decode()
    except storage.StorageError as error:
        raise ModelError(
            f"{uri}: not a model folder ({SPEC_FILE} missing or unreadable: {error})"
        ) from error
    return ModelSpec.from_json(text, spec_uri)


def load_model(uri: str, device: str | torch.device = "cpu") -> tuple[MaskRCNN, ModelSpec]:
    """The model in a folder (local or `s3://`) or torchvision's COCO model by name, in eval mode."""
    spec = load_spec(uri)
    try:
        model = build_model(spec.preset, spec.num_classes, roi_op=spec.roi_op, mask_loss=spec.mask_loss)
    except ValueError as error:
        raise ModelError(f"{uri}: {error}") from error
    model.transform.min_size = (spec.min_size,)
    model.transform.max_size = spec.max_size
    weights_uri = uri if uri.startswith(TORCHVISION_PREFIX) else storage.join(uri, WEIGHTS_FILE)
    try:
        load_weights(model, weights_uri)
    except WeightsError as error:
        raise ModelError(str(error)) from error
    return model.to(device).eval(), spec


def _torchvision_spec(builder: str) -> ModelSpec:
    """torchvision's COCO models predict the COCO category id itself as the label (91 classes,
    "N/A" for the ids COCO left unused), so category i is simply label i."""
    try:
        preset = TORCHVISION_PRESETS[builder]
        names = torchvision_categories(builder)
    except (KeyError, WeightsError) as error:
        raise ModelError(
            f"{TORCHVISION_PREFIX}{builder}: unknown torchvision model "
            f"(choose from {', '.join(TORCHVISION_PREFIX + name for name in TORCHVISION_PRESETS)})"
        ) from error
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


def _state_dict_bytes(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    # DDP wraps the model; the exported state_dict never carries its "module." prefix.
    torch.save((getattr(model, "module", model)).state_dict(), buffer)
    return buffer.getvalue()
