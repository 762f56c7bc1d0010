"""masks_to_rle against the baseline it replaces: torchvision's paste, a threshold, pycocotools."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from torchvision.models.detection.roi_heads import paste_masks_in_image

from mrcnn.rle import masks_to_rle, rle_to_mask


def pasted_masks(
    mask_probs: torch.Tensor, boxes: torch.Tensor, height: int, width: int, threshold: float = 0.5
) -> np.ndarray:
    """The baseline's binary masks, uint8[N, H, W]."""
    pasted = paste_masks_in_image(mask_probs, boxes, (height, width))
    return (pasted[:, 0] > threshold).numpy().astype(np.uint8)


def encode(masks: np.ndarray) -> list[bytes]:
    return [mask_util.encode(np.asfortranarray(mask))["counts"] for mask in masks]


def random_detections(
    n: int, height: int, width: int, seed: int, dtype: torch.dtype = torch.float32, size: int = 28
) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth mask probabilities and boxes centred in the image, up to 1.5x its size, so that many
    cross one or more borders."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 5, 5, generator=generator, dtype=torch.float64)
    probs = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
    centre = torch.rand(n, 2, generator=generator, dtype=torch.float64) * torch.tensor([width, height])
    half = (
        torch.rand(n, 2, generator=generator, dtype=torch.float64)
        * torch.tensor([width, height], dtype=torch.float64)
        * 0.75
    )
    boxes = torch.cat([centre - half, centre + half], dim=1)
    return probs.to(dtype), boxes.to(dtype)


@pytest.mark.parametrize("height,width", [(64, 64), (48, 80), (97, 33), (1, 1), (1, 9), (7, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_paste_and_encode_on_random_boxes(height, width, dtype):
    probs, boxes = random_detections(40, height, width, seed=height * 1000 + width, dtype=dtype)

    got = masks_to_rle(probs, boxes, height, width)

    assert got == encode(pasted_masks(probs, boxes, height, width))


def test_mask_resolution_other_than_28():
    probs, boxes = random_detections(20, 50, 70, seed=1, size=14)

    assert masks_to_rle(probs, boxes, 50, 70) == encode(pasted_masks(probs, boxes, 50, 70))


@pytest.mark.parametrize("threshold", [0.0, 0.25, 0.9])
def test_threshold_other_than_half(threshold):
    probs, boxes = random_detections(30, 40, 56, seed=2)

    got = masks_to_rle(probs, boxes, 40, 56, threshold=threshold)

    assert got == encode(pasted_masks(probs, boxes, 40, 56, threshold=threshold))


def test_edge_boxes_match_baseline():
    height, width = 30, 50
    boxes = torch.tensor(
        [
            [-10.0, 5.0, 12.0, 20.0],  # crosses the left border
            [40.0, 5.0, 70.0, 20.0],  # crosses the right border
            [10.0, -8.0, 30.0, 12.0],  # crosses the top border
            [10.0, 20.0, 30.0, 45.0],  # crosses the bottom border
            [-20.0, -20.0, 80.0, 60.0],  # larger than the image: every pixel set, pixel 0 too
            [0.0, 0.0, 50.0, 30.0],  # exactly the image: crop columns touch
            [5.0, -5.0, 20.0, 40.0],  # full image height only
            [-4.0, 25.0, 3.0, 32.0],  # bottom-left corner
            [45.0, -3.0, 53.0, 4.0],  # top-right corner
            [12.0, 12.0, 12.0, 12.0],  # zero size
            [7.3, 8.6, 7.9, 9.1],  # sub-pixel
            [30.0, 20.0, 10.0, 5.0],  # inverted
            [49.0, 29.0, 49.0, 29.0],  # the image's last pixel
            [-0.9, -0.9, -0.2, -0.2],  # just off the first pixel
        ]
    )
    probs = torch.rand(len(boxes), 1, 28, 28, generator=torch.Generator().manual_seed(3))
    probs[4:7] = 1.0
    probs[12] = 1.0

    got = masks_to_rle(probs, boxes, height, width)

    expected = pasted_masks(probs, boxes, height, width)
    assert got == encode(expected)
    assert expected[4].all() and expected[12][-1, -1] == 1


def test_boxes_wholly_outside_give_empty_masks():
    height, width = 30, 50
    boxes = torch.tensor(
        [
            [-100.0, 5.0, -30.0, 20.0],
            [80.0, 5.0, 120.0, 20.0],
            [5.0, -100.0, 20.0, -30.0],
            [5.0, 60.0, 20.0, 90.0],
            [-50.0, -50.0, -20.0, -20.0],
        ]
    )
    probs = torch.ones(len(boxes), 1, 28, 28)

    got = masks_to_rle(probs, boxes, height, width)

    assert got == encode(np.zeros((len(boxes), height, width), dtype=np.uint8))


def test_no_detections_give_empty_list():
    assert masks_to_rle(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), 800, 1333) == []


def test_decoding_gives_the_pasted_mask():
    probs, boxes = random_detections(10, 36, 44, seed=4)
    expected = pasted_masks(probs, boxes, 36, 44)

    for counts, mask in zip(masks_to_rle(probs, boxes, 36, 44), expected, strict=True):
        np.testing.assert_array_equal(rle_to_mask(counts, 36, 44), mask)
        np.testing.assert_array_equal(rle_to_mask(counts.decode("ascii"), 36, 44), mask)


def test_bad_arguments_raise_value_error():
    probs, boxes = random_detections(3, 10, 10, seed=5)
    with pytest.raises(ValueError, match="threshold"):
        masks_to_rle(probs, boxes, 10, 10, threshold=-0.1)
    with pytest.raises(ValueError, match="3 masks but 2 boxes"):
        masks_to_rle(probs, boxes[:2], 10, 10)
    with pytest.raises(ValueError, match="image size"):
        masks_to_rle(probs, boxes, 0, 10)


def test_mask_probs_that_require_grad():
    probs, boxes = random_detections(5, 20, 30, seed=6)

    got = masks_to_rle(probs.requires_grad_(), boxes, 20, 30)

    assert got == encode(pasted_masks(probs.detach(), boxes, 20, 30))
