"""Load model weights from a local file, `s3://`, or torchvision's COCO checkpoints by name.

Weights are only ever read with `torch.load(weights_only=True)`: a checkpoint is data, and a file
that needs pickled code to load (a payload, or torchvision's reference checkpoints with their
pickled argparse Namespace) is refused rather than executed.
"""

from __future__ import annotations

import io
import os
import pickle

import torch
from torch import nn
from torchvision.models import WeightsEnum

from mrcnn import storage, torchvision_models
from mrcnn.errors import UserError, one_line
from mrcnn.torchvision_models import hub_cache_path


class WeightsError(UserError):
    """Weights that cannot be found, read, trusted or fitted to the model; the message is one line."""


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """The state_dict stored at `uri` (local path, `s3://`, or `torchvision:<builder name>`).

    A file holding `{"model": state_dict, ...}` (a training checkpoint) is accepted too.
    """
    if torchvision_models.is_torchvision(uri):
        return _torchvision_state_dict(torchvision_models.builder_of(uri))
    try:
        data = storage.read_bytes(uri)
    except storage.StorageError as error:
        raise WeightsError(str(error)) from error
    return _load_trusted(io.BytesIO(data), uri)


def load_weights(model: nn.Module, uri: str) -> nn.Module:
    """Load the weights at `uri` into `model` with `strict=True` and return the model."""
    state = read_state_dict(uri)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        missing, unexpected = _key_differences(model, state)
        raise WeightsError(
            f"{uri}: weights do not fit the model ({len(missing)} missing keys, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}; or shapes differ: "
            f"{str(error).splitlines()[-1].strip()})"
        ) from error
    return model


def _load_trusted(stream: io.BytesIO, uri: str) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise WeightsError(
            f"{uri}: refused to load: the file needs pickled code, not only tensors "
            f"(save a plain state_dict with torch.save(model.state_dict(), path))"
        ) from error
    except (RuntimeError, EOFError, ValueError) as error:
        raise WeightsError(f"{uri}: not a torch checkpoint ({one_line(error, limit=300)})") from error
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise WeightsError(f"{uri}: not a state_dict (expected a mapping of names to tensors)")
    return loaded


def ensure_torchvision_weights(builder: str) -> str:
    """The hub-cache path of torchvision's COCO weights for `builder`, downloaded there if missing.

    For a driver to check up front what every inference actor will load; raises `WeightsError`
    (one line naming the file) where the file is neither cached nor downloadable.
    """
    path = torchvision_models.cache_path(builder)
    if not os.path.exists(path):
        _torchvision_state_dict(builder)
    return path


def read_hub_weights(weights: WeightsEnum, name: str, alternative: str) -> dict[str, torch.Tensor]:
    """The state_dict of torchvision `weights` from the torch hub cache, downloaded if need be.

    Where the file is neither cached nor downloadable (no network), `WeightsError` names the
    file to fetch and where to put it; `alternative` says what else the user can do.
    """
    cached = hub_cache_path(weights)
    if os.path.exists(cached):
        with open(cached, "rb") as file:
            return _load_trusted(io.BytesIO(file.read()), cached)
    try:
        return torch.hub.load_state_dict_from_url(
            weights.url, progress=False, check_hash=True, weights_only=True
        )
    except Exception as error:  # urllib raises many types; all mean "not downloadable here".
        raise WeightsError(
            f"{name}: weights are not in the torch hub cache and could not be downloaded "
            f"({one_line(error, limit=200)}); fetch {weights.url} to {cached} (or set TORCH_HOME), "
            f"{alternative}"
        ) from error


def _torchvision_state_dict(builder: str) -> dict[str, torch.Tensor]:
    """torchvision's COCO weights from the torch hub cache, downloading them if a network exists."""
    try:
        weights = torchvision_models.default_weights(builder)
    except torchvision_models.UnknownTorchvisionModel as error:
        raise WeightsError(str(error)) from error
    return read_hub_weights(
        weights,
        f"{torchvision_models.PREFIX}{builder}",
        "or pass a local or s3:// path to the file",
    )


def _key_differences(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    expected = set(model.state_dict())
    return sorted(expected - set(state)), sorted(set(state) - expected)
