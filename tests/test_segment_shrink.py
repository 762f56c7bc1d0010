"""The decode-time shrink and the box rescale: a large image through `jobs.segment` gets the
detections the model gives on the full image in a plain process.

`pipeline.segment.decode` resizes an image larger than the model's input on the CPU task, in uint8, and
the actor scales the boxes back to the displayed size; in process, torchvision's transform does
the resize in float and its postprocess the rescale. Both must agree up to the uint8 rounding.
"""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as pads
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from jobs import segment as segment_job
from mrcnn.model_folder import load_model
from mrcnn.rle import rle_to_mask

THRESHOLD = 0.05
COMPARED = 10


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of `a` (float[N, 4] xyxy) with every box of `b` (float[M, 4])."""
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    overlap = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return overlap / (area_a[:, None] + area_b[None, :] - overlap)


def test_a_large_image_gets_the_full_image_detections_within_a_pixel(tmp_path, model_dir, ray_local):
    height, width = 600, 800  # the tiny preset's input is at most 96 px: a shrink of 8x
    rng = np.random.default_rng(0)
    pixels = (rng.integers(0, 255, (height, width, 3)) // 4 + 100).astype(np.uint8)
    pixels[150:450, 200:500] = (250, 20, 20)
    pixels[100:300, 550:750] = (20, 200, 20)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(pixels).save(images / "large.png")

    output = tmp_path / "out"
    argv = [
        "--input", str(images), "--output", str(output), "--model", model_dir,
        "--score-threshold", str(THRESHOLD), "--gpus-per-actor", "0",
        "--amp", "off",  # the reference below is a float32 forward
    ]  # fmt: skip
    assert segment_job.main(argv) == 0
    (row,) = pads.dataset(str(output), format="parquet").to_table().to_pylist()
    assert (row["width"], row["height"]) == (width, height)

    model, _ = load_model(model_dir)
    model.score_threshold = THRESHOLD
    with torch.inference_mode():
        expected = model([torch.from_numpy(pixels).permute(2, 0, 1).float() / 255])[0]
    expected_boxes = expected["boxes"][:COMPARED].numpy()
    expected_masks = (expected["masks"][:COMPARED, 0] > 0.5).numpy().astype(np.uint8)
    assert len(expected_boxes) == COMPARED, "the random model should detect enough to compare"

    boxes = np.array(row["boxes"], np.float32)
    # Near-equal scores may swap places: match each expected detection to its best box.
    match = box_iou(expected_boxes, boxes).argmax(axis=1)
    assert np.abs(boxes[match] - expected_boxes).max() <= 1.0
    ious = []
    for index, found in enumerate(match):
        job_mask = rle_to_mask(row["masks"][found], height, width)
        encoded = [coco_mask.encode(np.asfortranarray(mask)) for mask in (job_mask, expected_masks[index])]
        ious.append(coco_mask.iou([encoded[0]], [encoded[1]], [0])[0][0])
    # A random model's mask probabilities hover around the 0.5 threshold, where the uint8 rounding
    # of the shrunk image flips a few pixels of a small mask: most masks agree to IoU 0.99.
    assert np.median(ious) >= 0.99 and min(ious) >= 0.95, ious
