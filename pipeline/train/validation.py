"""Validation during training, sharded over all workers and scored once with COCOeval.

Every worker runs the model (its own copy; DDP keeps them equal) on its part of the validation
images (`pipeline.train.data.validation_dataset(part=rank)`), turns the detections into COCO
result dicts, and rank 0 gathers them all and runs COCOeval. Images go through the model one at
a time, as torchvision's reference evaluates: batching pads images to a common size, which
would make an image's detections depend on which images share its batch, and so on the number
of workers. The AP is then the same whatever the number of workers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from mrcnn.categories import Category, category_of
from mrcnn.evaluation import detections_from_prediction, evaluate_coco
from mrcnn.precision import autocast
from mrcnn.rle import masks_to_rle


@torch.inference_mode()
def detect(
    model: torch.nn.Module,
    batches: Iterable[tuple[list[int], list[torch.Tensor]]],
    categories: tuple[Category, ...],
    device: torch.device,
    precision: str,
) -> list[dict]:
    """COCO result dicts of `model` (in eval mode, not DDP-wrapped) on the images of `batches`.

    `batches` yields `(image_ids, images)` as `pipeline.train.data.ValidationCollate` does, images
    float32[3, H, W] in 0..1. Masks are encoded from the per-RoI probabilities
    (`paste_masks = False` + `masks_to_rle`), not pasted into full-size images (slow on a CPU).
    """
    model.paste_masks = False
    detections: list[dict] = []
    try:
        for image_ids, images in batches:
            for image_id, image in zip(image_ids, images, strict=True):
                with autocast(device, precision):
                    (output,) = model([image.to(device, non_blocking=True)])
                height, width = image.shape[-2:]
                boxes = output["boxes"].float()
                counts = masks_to_rle(output["mask_probs"].float(), boxes, height, width)
                category_ids = [category_of(categories, label).id for label in output["labels"].tolist()]
                detections += detections_from_prediction(
                    image_id, boxes, output["scores"].float(), category_ids, counts, height, width
                )
    finally:
        model.paste_masks = True
    return detections


def gather_and_score(
    detections: list[dict], images: int, ground_truth: dict | None, rank: int
) -> dict | None:
    """COCOeval stats of every worker's `detections` together, on rank 0; None on other ranks.

    `images`: how many validation images this worker ran the model on. The result holds COCOeval's
    stats per IoU type and `val_images`, the workers' images together (every image of the
    validation set when no shard lost one). Every worker must call it (a collective); without a
    process group it scores `detections`.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list | None = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object((detections, images), gathered, dst=0)
        if rank != 0:
            return None
        detections = [d for part, _ in gathered for d in part]
        images = sum(count for _, count in gathered)
    return {**evaluate_coco(ground_truth, detections), "val_images": images}
