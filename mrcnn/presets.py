"""Named model presets: frozen dataclasses that say how `build_model` assembles a Mask R-CNN.

The two R50-FPN presets reproduce torchvision's `maskrcnn_resnet50_fpn` and
`maskrcnn_resnet50_fpn_v2` module for module, so their COCO checkpoints load with `strict=True`.
The small presets exist for CPUs: a ResNet-18 FPN with narrow heads, small anchors and small input
images, which trains on the synthetic shapes in minutes on two cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Preset:
    """Architecture and input size of a Mask R-CNN.

    Attributes:
        name: the preset's name, as given to `build_model`.
        backbone: torchvision ResNet builder, "resnet50" or "resnet18".
        heads: "v1" (torchvision's original heads: 1-conv RPN, 2-layer MLP box head, plain FPN) or
            "v2" (Li et al. 2021: 2-conv RPN, 4-conv + FC box head, BatchNorm in FPN and heads).
        fpn_channels: channels of every FPN level and of the heads' inputs.
        mask_head_channels: output channels of each 3x3 conv of the mask FCN (its depth is the
            tuple's length).
        box_head_channels: for "v2", channels of each conv of the box head.
        box_representation: width of the box head's fully connected layer(s).
        anchor_sizes: one anchor size (pixels of the resized input) per FPN level, P2..P6.
        min_size, max_size: the input image is resized so its short side is `min_size` and its
            long side at most `max_size` (torchvision's `GeneralizedRCNNTransform`).
        rpn_pre_nms_top_n_train, rpn_post_nms_top_n_train, rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test: proposals kept per level before NMS / per image after NMS.
        box_batch_size_per_image: RoIs sampled per image to train the box and mask heads.
        roi_sampling_ratio: RoIAlign's bilinear sample points per bin along each axis (2: the
            paper's 2 x 2 regular points; 1: one point at the bin's centre).
        detections_per_image: detections kept per image at inference.
    """

    name: str
    backbone: Literal["resnet50", "resnet18"]
    heads: Literal["v1", "v2"]
    fpn_channels: int = 256
    mask_head_channels: tuple[int, ...] = (256, 256, 256, 256)
    box_head_channels: tuple[int, ...] = (256, 256, 256, 256)
    box_representation: int = 1024
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    min_size: int = 800
    max_size: int = 1333
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512
    roi_sampling_ratio: int = 2
    detections_per_image: int = 100


R50_FPN = Preset(name="r50-fpn", backbone="resnet50", heads="v1")
R50_FPN_V2 = Preset(name="r50-fpn-v2", backbone="resnet50", heads="v2")

# The quickstart's model: shapes images are 128 px with objects of 13-64 px, so anchors start at
# 16 px and images keep their size. Narrow FPN and heads: on a CPU the mask FCN and RoIAlign's
# backward dominate the step at full width. For the same reason 64 sampled RoIs per image (the
# paper's N for its C4 models; a shapes image holds ~11 objects, so the 16 positives still cover
# them) and one RoIAlign sample per bin: a 13-64 px object spans 3-16 cells of P2, so a 14 x 14
# mask bin is under one feature cell and a 2 x 2 grid inside it samples nearly the same point
# four times (the paper finds RoIAlign insensitive to the number of samples). Together they make a
# training step much cheaper on a CPU (figures in BENCHMARKS.md, "Training throughput on 2 cores").
SMALL = Preset(
    name="small",
    backbone="resnet18",
    heads="v1",
    fpn_channels=64,
    mask_head_channels=(64, 64, 64, 64),
    box_representation=256,
    anchor_sizes=(16, 32, 64, 128, 256),
    min_size=128,
    max_size=128,
    rpn_pre_nms_top_n_train=600,
    rpn_post_nms_top_n_train=300,
    rpn_pre_nms_top_n_test=300,
    rpn_post_nms_top_n_test=150,
    box_batch_size_per_image=64,
    roi_sampling_ratio=1,
    detections_per_image=50,
)

# The smallest model that still exercises every code path; for tests.
TINY = Preset(
    name="tiny",
    backbone="resnet18",
    heads="v1",
    fpn_channels=16,
    mask_head_channels=(16, 16),
    box_representation=64,
    anchor_sizes=(8, 16, 32, 64, 128),
    min_size=64,
    max_size=96,
    rpn_pre_nms_top_n_train=200,
    rpn_post_nms_top_n_train=100,
    rpn_pre_nms_top_n_test=100,
    rpn_post_nms_top_n_test=50,
    box_batch_size_per_image=64,
    detections_per_image=20,
)

PRESETS: dict[str, Preset] = {p.name: p for p in (R50_FPN, R50_FPN_V2, SMALL, TINY)}


def get_preset(name: str) -> Preset:
    """The preset called `name`; `ValueError` naming the choices otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})") from None
