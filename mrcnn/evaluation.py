"""COCO evaluation of detections (bbox and segm AP/AR) with pycocotools, in memory and quietly.

Training (validation AP) and the evaluate job both use it: `detections_from_prediction` turns one
image's model output into COCO result dicts, `evaluate_coco` scores a list of them against a COCO
instances dict and returns COCOeval's 12 summary stats per IoU type, and
`evaluate_coco_with_summary` also returns the summary lines COCOeval itself printed. pycocotools
prints as it works; that output is swallowed here.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

if TYPE_CHECKING:
    import torch

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")

# The fields COCOeval reads from a result for each IoU type. A segm result keeps no bbox: given
# one, pycocotools takes the box area, not the mask area, for the small/medium/large ranges
# (Detectron2's COCOEvaluator drops it for the same reason).
_RESULT_FIELDS = {
    "bbox": ("image_id", "category_id", "score", "bbox"),
    "segm": ("image_id", "category_id", "score", "segmentation"),
}


def evaluate_coco(
    ground_truth: dict,
    detections: Sequence[dict],
    iou_types: Sequence[str] = IOU_TYPES,
) -> dict[str, dict[str, float]]:
    """COCOeval's 12 stats (`STAT_NAMES`) for each IoU type; see `evaluate_coco_with_summary`."""
    return evaluate_coco_with_summary(ground_truth, detections, iou_types)[0]


def evaluate_coco_with_summary(
    ground_truth: dict,
    detections: Sequence[dict],
    iou_types: Sequence[str] = IOU_TYPES,
) -> tuple[dict[str, dict[str, float]], str]:
    """COCOeval's 12 stats (`STAT_NAMES`) for each IoU type in `iou_types` ("bbox", "segm").

    Args:
        ground_truth: a COCO instances dict (`images`, `annotations` with `area` and `iscrowd`,
            `categories`). Not modified.
        detections: COCO result dicts (`image_id`, `category_id`, `score`, `bbox` [x, y, w, h] in
            pixels, and for segm `segmentation` {"size": [h, w], "counts": str or bytes}), for
            images of `ground_truth`. Not modified.

    Returns:
        `({iou_type: {stat_name: value}}, summary)`, where `summary` holds the lines
        `COCOeval.summarize()` printed, each prefixed by its IoU type. Every image of
        `ground_truth` is evaluated, so an image without detections counts its objects as missed;
        no detections at all give 0. As in COCOeval, a stat is -1 when the ground truth has no
        object it could count (for example APl without any large object).
    """
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"evaluate_coco: unknown iou type {iou_type!r}; expected one of {IOU_TYPES}")
    missing = [key for key in ("images", "annotations", "categories") if key not in ground_truth]
    if missing:
        raise ValueError(f"evaluate_coco: ground truth has no {', '.join(missing)}")
    image_ids = {image["id"] for image in ground_truth["images"]}
    unknown = sorted({det["image_id"] for det in detections} - image_ids)
    if unknown:
        raise ValueError(f"evaluate_coco: detections for image ids not in the ground truth: {unknown[:10]}")

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        # COCOeval writes into the ground truth's annotations (polygons become RLE, "ignore" flags).
        coco_gt.dataset = copy.deepcopy(ground_truth)
        coco_gt.createIndex()
        stats, summary = {}, []
        for iou_type in iou_types:
            results = [_result(det, index, iou_type) for index, det in enumerate(detections)]
            coco_eval = COCOeval(coco_gt, _load_results(coco_gt, results), iou_type)
            coco_eval.evaluate()
            coco_eval.accumulate()
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                coco_eval.summarize()
            summary += [f"{iou_type:<4} {line.strip()}" for line in printed.getvalue().splitlines()]
            stats[iou_type] = {
                name: float(value) for name, value in zip(STAT_NAMES, coco_eval.stats, strict=True)
            }
    return stats, "\n".join(summary)


def _result(detection: dict, index: int, iou_type: str) -> dict:
    """A fresh result dict with the fields `iou_type` needs (pycocotools adds fields to it)."""
    fields = _RESULT_FIELDS[iou_type]
    for field in fields:
        if field not in detection:
            raise ValueError(f"evaluate_coco: detection {index} has no {field!r}, needed for {iou_type}")
    return {field: copy.deepcopy(detection[field]) for field in fields}


def _load_results(coco_gt: COCO, results: list[dict]) -> COCO:
    """`coco_gt.loadRes(results)`, also for no results at all (where `loadRes` fails)."""
    if results:
        return coco_gt.loadRes(results)
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    coco_dt.createIndex()
    return coco_dt


def detections_from_prediction(
    image_id: int,
    boxes: torch.Tensor | np.ndarray,
    scores: torch.Tensor | np.ndarray,
    category_ids: torch.Tensor | np.ndarray | Sequence[int],
    rle_counts: Sequence[bytes],
    height: int,
    width: int,
) -> list[dict]:
    """COCO result dicts for one image's detections.

    Args:
        image_id: the COCO id of the image.
        boxes: float[N, 4] x1, y1, x2, y2 in pixels of the `height x width` image (tensor or array).
        scores: float[N].
        category_ids: int[N] COCO category ids (not the model's contiguous labels).
        rle_counts: N compressed RLE `counts` at `height x width`, as `mrcnn.rle.masks_to_rle` gives.

    Returns:
        N dicts `{"image_id", "category_id", "score", "bbox": [x, y, w, h], "segmentation":
        {"size": [height, width], "counts": str}}` of plain Python values (JSON-ready).
    """
    scores, category_ids = _to_numpy(scores).reshape(-1), _to_numpy(category_ids).reshape(-1)
    xywh = _to_numpy(boxes).astype(np.float64).reshape(-1, 4)
    xywh[:, 2:] -= xywh[:, :2]
    lengths = {len(xywh), len(scores), len(category_ids), len(rle_counts)}
    if len(lengths) != 1:
        raise ValueError(
            f"detections_from_prediction: {len(xywh)} boxes, {len(scores)} scores, "
            f"{len(category_ids)} category ids and {len(rle_counts)} masks for image {image_id}"
        )
    return [
        {
            "image_id": int(image_id),
            "category_id": int(category_id),
            "score": float(score),
            "bbox": box,
            "segmentation": {"size": [int(height), int(width)], "counts": counts.decode("ascii")},
        }
        for box, score, category_id, counts in zip(
            xywh.tolist(), scores.tolist(), category_ids.tolist(), rle_counts, strict=True
        )
    ]


def _to_numpy(values: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
    """A tensor (on any device) or array-like as a numpy array."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)
