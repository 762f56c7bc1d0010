"""Mask R-CNN: the model and its maths (presets, RoI ops, losses, masks/RLE, COCO I/O, evaluation).

Imports no Ray: everything here runs in a plain Python process.
"""

from mrcnn.model import MaskRCNN, build_model
from mrcnn.presets import PRESETS, Preset, get_preset
from mrcnn.weights import WeightsError, load_weights

__all__ = ["MaskRCNN", "PRESETS", "Preset", "WeightsError", "build_model", "get_preset", "load_weights"]
