"""Mask R-CNN: the model and its maths (presets, RoI ops, losses, masks/RLE, COCO I/O, evaluation).

Imports no Ray: everything here runs in a plain Python process.

The names below load on first use (PEP 562): `from mrcnn import storage` in a Ray decode or
listing task must not pay torchvision's import in every worker process, which on a small machine
competes with the inference actor's start-up (figures in BENCHMARKS.md, "Bulk segmentation
against the bare model loop").
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mrcnn.model import MaskRCNN, build_model
    from mrcnn.presets import PRESETS, Preset, get_preset
    from mrcnn.weights import WeightsError, load_weights

_LAZY = {
    "MaskRCNN": "mrcnn.model",
    "build_model": "mrcnn.model",
    "PRESETS": "mrcnn.presets",
    "Preset": "mrcnn.presets",
    "get_preset": "mrcnn.presets",
    "WeightsError": "mrcnn.weights",
    "load_weights": "mrcnn.weights",
}

__all__ = ["MaskRCNN", "PRESETS", "Preset", "WeightsError", "build_model", "get_preset", "load_weights"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mrcnn' has no attribute {name!r}")
