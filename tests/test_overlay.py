"""Overlays: masks are tinted where they are and nowhere else; captions and boxes are drawn."""

from __future__ import annotations

import numpy as np
import pytest

from mrcnn.overlay import draw_instances, instance_colour


def test_masks_are_tinted_inside_only_and_boxes_outlined():
    image = np.full((64, 80, 3), 100, dtype=np.uint8)
    masks = np.zeros((2, 64, 80), dtype=np.uint8)
    masks[0, 30:40, 30:40] = 1
    masks[1, 45:60, 60:75] = 1
    boxes = np.array([[29, 29, 40, 40], [59, 44, 75, 60]], dtype=np.float32)
    drawn = np.asarray(draw_instances(image, masks, boxes, ["a", "b"]))

    assert drawn.shape == image.shape
    centre = drawn[35, 35].astype(int)
    expected = (0.5 * 100 + 0.5 * np.array(instance_colour(0))).round().astype(int)
    assert np.abs(centre - expected).max() <= 1
    assert (drawn[5, 75] == 100).all(), "far from every instance the image is untouched"
    assert tuple(drawn[59, 59]) == instance_colour(1), "the box outline has the instance's colour"


def test_no_instances_returns_the_image_and_mismatched_inputs_are_refused():
    image = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    empty = draw_instances(image, np.zeros((0, 20, 30), np.uint8), np.zeros((0, 4)), [])
    assert np.array_equal(np.asarray(empty), image)
    with pytest.raises(ValueError, match="1 masks, 0 boxes"):
        draw_instances(image, np.zeros((1, 20, 30), np.uint8), np.zeros((0, 4)), ["x"])
