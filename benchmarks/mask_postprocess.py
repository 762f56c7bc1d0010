"""Mask post-process: `mrcnn.rle.masks_to_rle` against paste + threshold + pycocotools encode.

    .venv/bin/python benchmarks/mask_postprocess.py [--detections 100] [--repeats 3] [--threads N]

For each image size (800x1333 and 2000x3000) it makes the same synthetic detections for both paths:
smooth 28x28 mask probabilities and boxes whose side (the square root of their area) is log-uniform
between 2 % and 60 % of the image's short side ("realistic"; and, as a worst case, between 30 % and
100 %: "large"), aspect ratio log-uniform in [1/2, 2], centres anywhere in the image and boxes
clipped to it, as the model's boxes are. The baseline is what torchvision's reference evaluation
does (`references/detection/coco_eval.py`): paste every mask into a full image with
`paste_masks_in_image`, threshold at 0.5, and encode each mask with `pycocotools.mask.encode`.
Both paths run on CPU with torch on every core of the machine (`torch.set_num_threads`; `--threads`
overrides it); each time is the best of `--repeats` runs, the two paths taking turns. The RLEs of
the two paths are checked byte for byte. The last line is the smaller of the two image sizes'
speed-ups with realistic boxes.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_util
from torchvision.models.detection.roi_heads import paste_masks_in_image

from mrcnn.rle import masks_to_rle

IMAGE_SIZES = ((800, 1333), (2000, 3000))
# Box side (square root of the area) as a fraction of the image's short side, log-uniform in the
# range: "realistic" spans COCO's small to large objects and is the headline; "large" is the worst
# case for masks_to_rle, whose work grows with the box area while the baseline's grows with the image.
BOX_SIDES = {"realistic": (0.02, 0.6), "large": (0.3, 1.0)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detections", type=int, default=100, help="detections per image")
    parser.add_argument("--repeats", type=int, default=3, help="runs per path; the best counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    return parser


def make_detections(
    n: int, height: int, width: int, side_range: tuple[float, float], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth mask probabilities float32[n, 1, 28, 28] and clipped xyxy boxes float32[n, 4]."""
    coarse = torch.rand(n, 1, 7, 7, generator=generator)
    smooth = F.interpolate(coarse, size=(28, 28), mode="bilinear", align_corners=False)
    mask_probs = torch.sigmoid(12.0 * (smooth - 0.5))

    short = min(height, width)
    log_side = torch.empty(n).uniform_(*(math.log(f) for f in side_range), generator=generator)
    log_aspect = torch.empty(n).uniform_(math.log(0.5), math.log(2.0), generator=generator)
    side = short * log_side.exp()
    box_w = side * (log_aspect / 2).exp()
    box_h = side / (log_aspect / 2).exp()
    cx = torch.rand(n, generator=generator) * width
    cy = torch.rand(n, generator=generator) * height
    boxes = torch.stack([cx - box_w / 2, cy - box_h / 2, cx + box_w / 2, cy + box_h / 2], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return mask_probs, boxes


def paste_and_encode(mask_probs: torch.Tensor, boxes: torch.Tensor, height: int, width: int) -> list[bytes]:
    masks = paste_masks_in_image(mask_probs, boxes, (height, width)) > 0.5
    return [
        mask_util.encode(np.array(mask[0, :, :, np.newaxis].numpy(), dtype=np.uint8, order="F"))[0]["counts"]
        for mask in masks
    ]


def best_times(
    paths: tuple[Callable[[], list[bytes]], ...], repeats: int
) -> tuple[list[float], list[list[bytes]]]:
    """Best time and result of each path, the paths taking turns so that both see the same load."""
    best, results = [math.inf] * len(paths), [[] for _ in paths]
    for _ in range(repeats):
        for index, path in enumerate(paths):
            start = time.perf_counter()
            results[index] = path()
            best[index] = min(best[index], time.perf_counter() - start)
    return best, results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(args.threads or cores)
    print(f"torch threads: {torch.get_num_threads()} (machine cores: {cores}), device: cpu")
    print(
        f"{'boxes':>9} {'image':>11} {'dets':>5} {'paste+encode s':>15} {'masks_to_rle s':>15}"
        f" {'speed-up':>9}"
    )
    headline = []
    generator = torch.Generator().manual_seed(args.seed)
    for boxes_name, side_range in BOX_SIDES.items():
        for height, width in IMAGE_SIZES:
            mask_probs, boxes = make_detections(args.detections, height, width, side_range, generator)
            (base_s, fast_s), (expected, got) = best_times(
                (
                    partial(paste_and_encode, mask_probs, boxes, height, width),
                    partial(masks_to_rle, mask_probs, boxes, height, width),
                ),
                args.repeats,
            )
            if got != expected:
                print(f"RLEs differ: {boxes_name} boxes at {height}x{width}")
                return 1
            speedup = base_s / fast_s
            if boxes_name == "realistic":
                headline.append(speedup)
            print(
                f"{boxes_name:>9} {height:>5}x{width:<5} {args.detections:>5} {base_s:>15.3f}"
                f" {fast_s:>15.4f} {speedup:>8.1f}x"
            )
    print("RLEs identical: yes")
    print(f"speedup: {min(headline):.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
