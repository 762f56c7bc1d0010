"""Training and validation data on Ray Data: COCO records in, decoded images and targets out.

The driver turns a `CocoDataset` into a dataset of small records (URI, size, annotations as JSON);
Ray Data tasks read and decode each image, build its target with `mrcnn.coco.build_target` and,
for training, flip it horizontally at random. Masks travel from the tasks to the training workers
as COCO compressed RLE (a few hundred bytes per object instead of H x W bytes) and are decoded in
the worker's collate function, in Ray Data's prefetch thread, into the lists of variable-size
tensors torchvision's detection models take.

An image that is missing, undecodable or whose size differs from its annotations is left out with
a warning, never an exception that ends the run; a store that keeps failing after the retries of
`mrcnn.s3_retry` raises, and the run fails with one line (a re-run resumes from its checkpoint).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from mrcnn import storage
from mrcnn.coco import CocoDataset, build_target
from mrcnn.images import ImageDecodeError, decode_image
from mrcnn.rle import decode_masks, encode_masks
from pipeline.cluster.idle_backoff import with_idle_backoff
from pipeline.cluster.job_log import warn

# Images above this many pixels (read from the header, before decoding) are left out: a training
# set has no business holding decompression bombs.
MAX_PIXELS = 100_000_000
FLIP_PROBABILITY = 0.5
# Rows per block of the records dataset: one decode task per block. Small enough that every
# worker gets several blocks and that a retried task redoes little; large enough that task
# overhead (a few ms) stays small next to decoding.
ROWS_PER_BLOCK = 16
# Logical CPUs of one decode task. Fractional so that decoding fits beside training workers on a
# small machine; the tasks are short and mostly wait on I/O and zlib.
DECODE_TASK_CPUS = 0.25


def records_dataset(dataset: CocoDataset, *, part: int = 0, parts: int = 1):
    """A Ray Dataset of the images of `dataset` (every `parts`-th from the `part`-th), one row each.

    Columns: `image_id` int64, `file_name`, `uri` str, `width`, `height` int64, `annotations`
    str (the kept raw COCO annotations of the image as a JSON list).
    """
    import ray

    records = dataset.to_records()[part::parts]
    num_blocks = max(1, -(-len(records) // ROWS_PER_BLOCK))
    return ray.data.from_items(records, override_num_blocks=num_blocks)


def training_dataset(dataset: CocoDataset, *, flip: bool = True, exif_orientation: str = "stored"):
    """Decoded training rows (see `decode_training_batch`), in an order that changes every epoch.

    The block order is shuffled on every pass over the data; the workers shuffle rows further
    with a local buffer as they iterate (`pipeline.train.loop`).
    """
    decoded = (
        records_dataset(dataset)
        .randomize_block_order()
        .map_batches(
            decode_training_batch,
            fn_kwargs={
                "category_to_label": dataset.category_to_label,
                "flip": flip,
                "exif_orientation": exif_orientation,
            },
            batch_size=None,
            num_cpus=DECODE_TASK_CPUS,
        )
    )
    # Decoding outruns training steps, so the executor is mostly idle: keep it from spinning.
    return with_idle_backoff(decoded)


def validation_dataset(
    dataset: CocoDataset, *, part: int = 0, parts: int = 1, exif_orientation: str = "stored"
):
    """Decoded validation rows (see `decode_validation_batch`), no augmentation.

    With `parts` > 1, the `part`-th of `parts` disjoint sets of images (one per training worker,
    `pipeline.train.validation`): splitting the records, before decoding, keeps every image in exactly
    one part, which Ray Data's equal split of a decoded dataset does not promise.
    """
    decoded = records_dataset(dataset, part=part, parts=parts).map_batches(
        decode_validation_batch,
        fn_kwargs={"exif_orientation": exif_orientation},
        batch_size=None,
        num_cpus=DECODE_TASK_CPUS,
    )
    return with_idle_backoff(decoded)


def decode_training_batch(
    batch: dict[str, np.ndarray],
    *,
    category_to_label: dict[int, int],
    flip: bool,
    exif_orientation: str = "stored",
) -> dict[str, Any]:
    """Read, decode and build the training target of each record of `batch`.

    Returns, per kept image (rows that cannot be used are dropped, with a warning):
        image_id: int64.
        image: uint8[H, W, 3] RGB in the orientation the annotations describe: as stored
            (`exif_orientation="stored"`, COCO's convention) or as displayed ("apply").
        boxes: float32[N, 4] x1, y1, x2, y2 in pixels of the image.
        labels: int64[N], contiguous labels 1..K.
        masks: N COCO compressed RLE `counts` (bytes) at H x W, in the order of `boxes`.
    With `flip`, each image is mirrored left-right with probability 1/2, its target with it.
    """
    rng = np.random.default_rng()
    out: dict[str, list] = {"image_id": [], "image": [], "boxes": [], "labels": [], "masks": []}
    for row in range(len(batch["uri"])):
        image = _read_image(batch, row, exif_orientation)
        if image is None:
            continue
        height, width = image.shape[:2]
        target = build_target(
            json.loads(batch["annotations"][row]), height, width, category_to_label
        )
        boxes, masks = target["boxes"], target["masks"]
        if flip and rng.random() < FLIP_PROBABILITY:
            image = image[:, ::-1]
            masks = masks[:, :, ::-1]
            boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
        out["image_id"].append(int(batch["image_id"][row]))
        out["image"].append(np.ascontiguousarray(image))
        out["boxes"].append(boxes.astype(np.float32, copy=False).reshape(-1, 4))
        out["labels"].append(target["labels"])
        out["masks"].append(encode_masks(masks))
    return out


def decode_validation_batch(
    batch: dict[str, np.ndarray], *, exif_orientation: str = "stored"
) -> dict[str, Any]:
    """Read and decode each record of `batch`: `image_id` int64, `image` uint8[H, W, 3] RGB
    (oriented as in `decode_training_batch`)."""
    out: dict[str, list] = {"image_id": [], "image": []}
    for row in range(len(batch["uri"])):
        image = _read_image(batch, row, exif_orientation)
        if image is not None:
            out["image_id"].append(int(batch["image_id"][row]))
            out["image"].append(image)
    return out


def _read_image(batch: dict[str, np.ndarray], row: int, exif_orientation: str) -> np.ndarray | None:
    """The decoded image of a record, or None (with a warning) when it cannot be used."""
    uri = batch["uri"][row]
    try:
        image = decode_image(storage.read_bytes(uri), max_pixels=MAX_PIXELS, orientation=exif_orientation)
    except (ImageDecodeError, storage.ObjectMissing) as error:
        reason = f"cannot read: {error.reason}" if isinstance(error, storage.ObjectMissing) else error
        warn(f"train: warning: {uri}: left out of training: {reason}")
        return None
    expected = (int(batch["height"][row]), int(batch["width"][row]))
    if image.shape[:2] != expected:
        # Never trained against masks of the other orientation: a size mismatch is reported.
        hint = ""
        if image.shape[:2] == expected[::-1]:
            other = "apply" if exif_orientation == "stored" else "stored"
            hint = f" (EXIF orientation turns it: are the annotations for --exif-orientation {other}?)"
        warn(
            f"train: warning: {uri}: left out of training: the image is {image.shape[1]}x"
            f"{image.shape[0]} but its annotations say {expected[1]}x{expected[0]}{hint}"
        )
        return None
    return image


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8[H, W, 3] RGB as the model's input, float32[3, H, W] in 0..1."""
    # A float copy: Ray hands out read-only arrays, which torch.from_numpy would share.
    return torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)


class TrainingCollate(NumpyBatchCollateFn):
    """A batch of training rows as `(images, targets)` for `model(images, targets)`.

    images: list of float32[3, H, W] in 0..1 (sizes differ); targets: list of dicts with
    `boxes` float32[N, 4] xyxy, `labels` int64[N], `masks` uint8[N, H, W]. On the CPU; the
    training loop moves them to its device.
    """

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[list[torch.Tensor], list[dict]]:
        images, targets = [], []
        for image, boxes, labels, masks in zip(
            batch["image"], batch["boxes"], batch["labels"], batch["masks"], strict=True
        ):
            height, width = image.shape[:2]
            images.append(image_tensor(image))
            targets.append(
                {
                    "boxes": torch.tensor(np.asarray(boxes, np.float32).reshape(-1, 4)),
                    "labels": torch.tensor(np.asarray(labels, np.int64).reshape(-1)),
                    "masks": torch.from_numpy(decode_masks(masks, height, width)),
                }
            )
        return images, targets


class ValidationCollate(NumpyBatchCollateFn):
    """A batch of validation rows as `(image_ids, images)`: int list, float32[3, H, W] list."""

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[list[int], list[torch.Tensor]]:
        return [int(i) for i in batch["image_id"]], [image_tensor(image) for image in batch["image"]]
