"""The exported model folder: `weights.pt` (a plain state_dict) and `model.json` (what it is).

`model.json` carries everything needed to rebuild the model without guessing:
`{"preset", "num_classes", "roi_op", "mask_loss", "min_size", "max_size", "categories": [{"id", "name"}]}`
with categories in the dataset's original ids; the model's label `i` is `categories[i - 1]`.

`mrcnn.model_spec` reads `model.json` alone (no torch); this module builds, loads and saves
the model. A folder is complete when `model.json` exists. On local disk the folder is written under a hidden
temporary name and renamed into place, so it appears whole; on S3 (no rename) `weights.pt` is put
first and `model.json` last, and readers look for `model.json`.
"""

from __future__ import annotations

import io
import os
import shutil
import uuid

import torch
from torch import nn

from mrcnn import storage, torchvision_models
from mrcnn.categories import Category
from mrcnn.model import MaskRCNN, build_model
from mrcnn.model_spec import (
    SPEC_FILE,
    WEIGHTS_FILE,
    ModelError,
    ModelSpec,
    load_spec,
)
from mrcnn.weights import WeightsError, load_weights


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


def load_model(
    uri: str, device: str | torch.device = "cpu", spec: ModelSpec | None = None
) -> tuple[MaskRCNN, ModelSpec]:
    """The model in a folder (local or `s3://`) or torchvision's COCO model by name, in eval mode.

    `spec`: the folder's `model.json` when the caller has read it already (None: read here).
    """
    spec = spec or load_spec(uri)
    try:
        model = build_model(spec.preset, spec.num_classes, roi_op=spec.roi_op, mask_loss=spec.mask_loss)
    except ValueError as error:
        raise ModelError(f"{uri}: {error}") from error
    model.transform.min_size = (spec.min_size,)
    model.transform.max_size = spec.max_size
    weights_uri = uri if torchvision_models.is_torchvision(uri) else storage.join(uri, WEIGHTS_FILE)
    try:
        load_weights(model, weights_uri)
    except WeightsError as error:
        raise ModelError(str(error)) from error
    return model.to(device).eval(), spec


def _state_dict_bytes(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    # DDP wraps the model; the exported state_dict never carries its "module." prefix.
    torch.save((getattr(model, "module", model)).state_dict(), buffer)
    return buffer.getvalue()
