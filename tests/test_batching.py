"""Orientation grouping of inference batches: padded pixels, when a batch splits, and that the
segmenter's outputs for a mixed batch are those of each image on its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from mrcnn.batching import (
    GPU_MIN_SPLIT_BATCH,
    input_size,
    min_batch_to_split,
    orientation_groups,
    padded_size,
    padding_waste,
)
from pipeline.segment.inference import Segmenter

LANDSCAPE_800 = (800, 1333)
PORTRAIT_800 = (1333, 800)


@pytest.mark.parametrize("height, width", [(480, 640), (640, 480), (3000, 1000), (37, 1001), (800, 800)])
def test_input_size_is_what_torchvisions_transform_resizes_to(height, width):
    transform = GeneralizedRCNNTransform(800, 1333, [0.0] * 3, [1.0] * 3).eval()
    images = transform([torch.zeros(3, height, width)])[0]
    assert input_size(height, width, 800, 1333) == tuple(images.image_sizes[0])
    assert padded_size([input_size(height, width, 800, 1333)]) == tuple(images.tensors.shape[2:])


def test_mixed_orientations_waste_two_fifths_of_a_batch_and_split_in_input_order():
    sizes = [LANDSCAPE_800, PORTRAIT_800, LANDSCAPE_800, PORTRAIT_800, LANDSCAPE_800]
    assert padding_waste([sizes]) == pytest.approx(1 - 800 * 1333 / 1344**2)
    groups = orientation_groups(sizes)
    assert groups == [[0, 2, 4], [1, 3]]
    assert padding_waste([[sizes[i] for i in group] for group in groups]) < 0.01


def test_one_orientation_or_a_small_saving_stays_one_forward():
    assert orientation_groups([LANDSCAPE_800, (800, 1066), (800, 800)]) == [[0, 1, 2]]
    assert orientation_groups([PORTRAIT_800, (1066, 800)]) == [[0, 1]]
    # A near-square portrait beside a landscape image: splitting saves 22 % of the pixels.
    near_square = [LANDSCAPE_800, (820, 800)]
    assert orientation_groups(near_square) == [[0, 1]]
    assert orientation_groups(near_square, min_saving=0.0) == [[0], [1]]
    assert orientation_groups([]) == []
    assert padding_waste([]) == 0.0


def test_a_gpu_splits_only_batches_whose_halves_still_fill_it():
    """On a GPU a batch of 4 mixed images stays one forward (halves of 2 idle the device longer
    than the padding costs); from 8 on it splits; a CPU splits any batch that saves enough."""
    mixed = [LANDSCAPE_800, PORTRAIT_800] * 2
    cuda, cpu = min_batch_to_split("cuda"), min_batch_to_split("cpu")
    assert orientation_groups(mixed, min_batch=cuda) == [[0, 1, 2, 3]]
    assert orientation_groups(mixed, min_batch=cpu) == [[0, 2], [1, 3]]
    eight = [LANDSCAPE_800, PORTRAIT_800] * (GPU_MIN_SPLIT_BATCH // 2)
    assert len(orientation_groups(eight, min_batch=cuda)) == 2


@pytest.fixture(scope="module")
def mixed_batch() -> dict[str, np.ndarray]:
    """Landscape 48x72 and portrait 72x48 noise images (the tiny preset's inputs: 64x96, 96x64)."""
    rng = np.random.default_rng(0)
    shapes = [(48, 72), (72, 48), (48, 72), (72, 48), (48, 72)]
    images = [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for shape in shapes]
    return {
        "path": np.array([f"{i}.png" for i in range(len(images))], dtype=object),
        "width": np.array([shape[1] for shape in shapes], np.int32),
        "height": np.array([shape[0] for shape in shapes], np.int32),
        "error": np.array([""] * len(images), dtype=object),
        "image": images,
    }


def rows(batch: dict[str, np.ndarray], indices: list[int]) -> dict[str, np.ndarray]:
    return {
        name: [column[i] for i in indices] if name == "image" else column[indices]
        for name, column in batch.items()
    }


def same_detections(a: dict, b: dict, row_a: int, row_b: int) -> bool:
    return (
        a["boxes"][row_a].shape == b["boxes"][row_b].shape
        and np.allclose(a["boxes"][row_a], b["boxes"][row_b], atol=1e-3)
        and np.allclose(a["scores"][row_a], b["scores"][row_b], atol=1e-5)
        and np.array_equal(a["labels"][row_a], b["labels"][row_b])
    )


def test_a_mixed_batch_gives_each_image_its_own_detections(model_dir, mixed_batch):
    """Grouped, each image is padded as it would be alone; ungrouped, the landscape images pad to
    96x96 and their detections change (which is what makes this test fail if grouping broke)."""
    segment = Segmenter(model_dir, score_threshold=0.0, num_threads=1, use_gpu=False, precision="off")
    batch = segment(mixed_batch)
    count = len(mixed_batch["path"])
    alone = [segment(rows(mixed_batch, [i])) for i in range(count)]
    for i in range(count):
        assert len(batch["boxes"][i]) > 0
        assert same_detections(batch, alone[i], i, 0), f"row {i}"
    assert list(batch["path"]) == list(mixed_batch["path"])

    segment.group_by_orientation = False
    ungrouped = segment(mixed_batch)
    assert not all(same_detections(ungrouped, alone[i], i, 0) for i in range(count))


def test_error_rows_keep_their_place_and_get_no_detections(model_dir, mixed_batch):
    batch = dict(mixed_batch)
    batch["error"] = np.array(["", "corrupt", "", "", "not found"], dtype=object)
    batch["image"] = [
        np.zeros((0, 0, 3), np.uint8) if error else image
        for image, error in zip(mixed_batch["image"], batch["error"], strict=True)
    ]
    segment = Segmenter(model_dir, score_threshold=0.0, num_threads=1, use_gpu=False, precision="off")
    result = segment(batch)
    assert [len(boxes) for boxes in result["boxes"]][1::3] == [0, 0]
    assert list(result["error"]) == list(batch["error"])
    for i in (0, 2, 3):
        assert same_detections(result, segment(rows(mixed_batch, [i])), i, 0), f"row {i}"
