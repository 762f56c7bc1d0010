"""Read a COCO instances dataset (JSON + images root, local or s3://) and build training targets.

`read_coco` reads and checks the JSON once, in the driver; `build_target` is a pure function
that turns one image's raw annotations into the tensors Mask R-CNN trains on, cheap to call
inside Ray tasks. Both apply the same rules, so an annotation is either kept or skipped for one
named reason.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mrcnn import rle, storage
from mrcnn.categories import Category
from mrcnn.errors import UserError

logger = logging.getLogger("mrcnn.coco")

# Reasons for skipping an annotation; the warning of `read_coco` counts them by these names.
UNKNOWN_IMAGE = "unknown image id"
UNKNOWN_CATEGORY = "unknown category id"
EMPTY_BOX = "empty box (zero or negative area, or outside the image)"
SHORT_POLYGON = "polygon with fewer than 3 points"
EMPTY_MASK = "empty mask (or entirely outside the image)"
MALFORMED = "malformed bbox or segmentation"


class CocoError(UserError):
    """An annotations file that cannot be read or is not a COCO instances file."""


@dataclass(frozen=True)
class ImageRecord:
    """One image of the dataset.

    `width`, `height` are those of the JSON (the displayed image); `annotations` are the raw
    COCO annotation dicts that passed the checks, crowd regions included.
    """

    image_id: int
    file_name: str
    uri: str
    width: int
    height: int
    annotations: tuple[dict, ...]


@dataclass(frozen=True)
class CocoDataset:
    """A COCO instances dataset.

    `categories` are sorted by id; model label `i` (1..K) is `categories[i - 1]`.
    `ground_truth` is the JSON as read, for pycocotools evaluation. `skipped` counts the
    annotations left out of `images`, by reason. Images without annotations are kept.
    """

    annotations_uri: str
    images_root: str
    categories: tuple[Category, ...]
    images: list[ImageRecord]
    ground_truth: dict
    skipped: dict[str, int]

    @property
    def category_to_label(self) -> dict[int, int]:
        return {category.id: label for label, category in enumerate(self.categories, start=1)}

    def to_records(self) -> list[dict[str, Any]]:
        """Plain rows for a Ray Dataset: image_id, file_name, uri, width, height, and the
        kept annotations as a JSON string (`build_target(json.loads(row["annotations"]), ...)`)."""
        return [
            {
                "image_id": record.image_id,
                "file_name": record.file_name,
                "uri": record.uri,
                "width": record.width,
                "height": record.height,
                "annotations": json.dumps(list(record.annotations)),
            }
            for record in self.images
        ]

    def evaluation_ground_truth(self) -> dict:
        """The COCO dict AP is computed against (validation and `jobs.evaluate` alike): the
        images, the categories and only the annotations `read_coco` kept.

        Degenerate annotations are left out of the ground truth as they are left out of training;
        some of them (a 4-number polygon, which pycocotools reads as a box) would make COCOeval
        fail.
        """
        return {
            "images": self.ground_truth["images"],
            "categories": self.ground_truth["categories"],
            "annotations": [annotation for record in self.images for annotation in record.annotations],
        }


def read_coco(annotations_uri: str, images_root: str) -> CocoDataset:
    """Read a COCO instances JSON; image `file_name`s are relative to `images_root`.

    Degenerate annotations are dropped from `images` and logged in ONE warning (logger
    "mrcnn.coco") that counts them by reason: unknown image or category id, a box of zero or
    negative area or outside the image (after clipping), a polygon with fewer than 3 points, a
    mask that is empty or entirely outside the image, a malformed bbox or segmentation (an RLE
    of another size, counts that do not cover the image). Crowd regions are kept; `build_target`
    separates them. Raises `CocoError` naming the URI when the file
    is missing, is not JSON, or lacks the images/categories a COCO instances file has.
    """
    try:
        ground_truth = json.loads(storage.read_bytes(annotations_uri))
    except storage.StorageError as error:
        raise CocoError(f"cannot read annotations: {error}") from error
    except ValueError as error:
        raise CocoError(f"{annotations_uri}: not valid JSON ({error})") from error
    categories = _read_categories(ground_truth, annotations_uri)
    sizes, file_names = _read_images(ground_truth, annotations_uri)
    annotations = ground_truth.get("annotations", [])
    if not isinstance(annotations, list):
        raise CocoError(f"{annotations_uri}: 'annotations' is not a list")

    category_to_label = {category.id: label for label, category in enumerate(categories, 1)}
    kept, skipped = _keep_annotations(annotations, sizes, category_to_label)
    if skipped:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items()))
        logger.warning(
            "%s: skipped %d of %d annotations: %s",
            annotations_uri,
            sum(skipped.values()),
            len(annotations),
            reasons,
        )
    images = [
        ImageRecord(
            image_id=image_id,
            file_name=file_names[image_id],
            uri=storage.join(images_root, file_names[image_id]),
            width=sizes[image_id][1],
            height=sizes[image_id][0],
            annotations=tuple(kept[image_id]),
        )
        for image_id in sizes
    ]
    return CocoDataset(
        annotations_uri=annotations_uri,
        images_root=images_root,
        categories=categories,
        images=images,
        ground_truth=ground_truth,
        skipped=dict(skipped),
    )


def _keep_annotations(
    annotations: list, sizes: dict[int, tuple[int, int]], category_to_label: dict[int, int]
) -> tuple[dict[int, list[dict]], Counter[str]]:
    """The usable annotations of each image id, and the others counted by the reason they go."""
    kept: dict[int, list[dict]] = {image_id: [] for image_id in sizes}
    skipped: Counter[str] = Counter()
    for annotation in annotations:
        if not isinstance(annotation, dict):
            skipped[MALFORMED] += 1
            continue
        image_id = annotation.get("image_id")
        if not isinstance(image_id, int) or image_id not in sizes:
            skipped[UNKNOWN_IMAGE] += 1
            continue
        height, width = sizes[image_id]
        prepared = _prepare(annotation, height, width, category_to_label)
        if isinstance(prepared, str):
            skipped[prepared] += 1
        elif rle.area(prepared.rle) == 0:
            skipped[EMPTY_MASK] += 1
        else:
            kept[image_id].append(annotation)
    return kept, skipped


def build_target(
    annotations: Sequence[Mapping[str, Any]],
    height: int,
    width: int,
    category_to_label: Mapping[int, int],
) -> dict[str, np.ndarray]:
    """Training target of one image from its raw COCO annotations.

    Returns numpy arrays (wrap with `torch.from_numpy` for the model):
    - `boxes`: float32[N, 4], x1, y1, x2, y2 in pixels of the displayed image, from the `bbox`
      field clipped to the image (from the mask when `bbox` is absent);
    - `labels`: int64[N], contiguous labels 1..K from `category_to_label`;
    - `masks`: uint8[N, H, W], 0/1;
    - `iscrowd`: int64[N], all 0: crowd regions are kept out of what the loss sees, as in
      torchvision's detection reference;
    - `crowd_boxes`: float32[C, 4] xyxy, the crowd (`iscrowd=1`) regions, for callers that
      want to ignore detections there.

    Degenerate annotations (see `read_coco`) are skipped, so N may be smaller than the input;
    an image without annotations gives N = 0 with the shapes above.
    """
    boxes, labels, masks, crowd_boxes = [], [], [], []
    for annotation in annotations:
        prepared = _prepare(annotation, height, width, category_to_label)
        if isinstance(prepared, str):
            continue
        if prepared.iscrowd:
            crowd_boxes.append(prepared.box)
            continue
        try:
            mask = rle.decode_rle(prepared.rle)
        except ValueError:  # counts that do not add up to the image: pycocotools refuses them
            continue
        if not mask.any():
            continue
        boxes.append(prepared.box)
        labels.append(prepared.label)
        masks.append(mask)
    return {
        "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        "labels": np.asarray(labels, dtype=np.int64),
        "masks": (
            np.stack(masks).astype(np.uint8, copy=False)
            if masks
            else np.zeros((0, height, width), dtype=np.uint8)
        ),
        "iscrowd": np.zeros(len(labels), dtype=np.int64),
        "crowd_boxes": np.asarray(crowd_boxes, dtype=np.float32).reshape(-1, 4),
    }


@dataclass(frozen=True)
class _Prepared:
    box: tuple[float, float, float, float]
    label: int
    iscrowd: bool
    rle: dict


def _prepare(
    annotation: Mapping[str, Any], height: int, width: int, category_to_label: Mapping[int, int]
) -> _Prepared | str:
    """The checked parts of one annotation, or the reason to skip it (no mask is decoded)."""
    if not isinstance(annotation, Mapping):
        return MALFORMED
    category_id = annotation.get("category_id")
    label = category_to_label.get(category_id) if isinstance(category_id, int) else None
    if label is None:
        return UNKNOWN_CATEGORY
    encoded = _segmentation_rle(annotation.get("segmentation"), height, width)
    if isinstance(encoded, str):
        return encoded
    bbox = annotation.get("bbox")
    if bbox is None:
        bbox = rle.to_bbox(encoded)
    if not (isinstance(bbox, Sequence) and len(bbox) == 4 and all(map(_is_finite, bbox))):
        return MALFORMED
    x, y, w, h = (float(value) for value in bbox)
    box = (max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height)))
    if box[2] <= box[0] or box[3] <= box[1]:
        return EMPTY_BOX
    return _Prepared(box=box, label=label, iscrowd=bool(annotation.get("iscrowd", 0)), rle=encoded)


def _segmentation_rle(segmentation: Any, height: int, width: int) -> dict | str:
    """Compressed RLE of a polygon list, an uncompressed or a compressed RLE, or a skip reason."""
    if isinstance(segmentation, list):
        # A polygon needs 3 points; pycocotools would read 4 numbers as a box, so drop such
        # parts here and keep the object if any part is left.
        parts = []
        for part in segmentation:
            try:
                coordinates = np.asarray(part, dtype=np.float64)
            except (TypeError, ValueError):
                return MALFORMED
            if coordinates.ndim != 1 or not np.isfinite(coordinates).all():
                return MALFORMED
            if coordinates.size >= 6 and coordinates.size % 2 == 0:
                parts.append(coordinates)
        if not parts:
            return SHORT_POLYGON
        return rle.polygons_to_rle(parts, height, width)
    if not isinstance(segmentation, dict) or list(segmentation.get("size", ())) != [height, width]:
        return MALFORMED
    counts = segmentation.get("counts")
    if isinstance(counts, list):
        valid = all(isinstance(count, int) and count >= 0 for count in counts)
        if not valid or sum(counts) != height * width:
            return MALFORMED
        return rle.uncompressed_to_rle(segmentation, height, width)
    if isinstance(counts, str | bytes):
        return {"size": [height, width], "counts": counts}
    return MALFORMED


def _read_categories(ground_truth: Any, uri: str) -> tuple[Category, ...]:
    if not isinstance(ground_truth, dict) or not isinstance(ground_truth.get("categories"), list):
        raise CocoError(f"{uri}: not a COCO instances file (no 'categories' list)")
    try:
        categories = sorted(
            (Category(id=int(item["id"]), name=str(item["name"])) for item in ground_truth["categories"]),
            key=lambda category: category.id,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CocoError(f"{uri}: a category lacks an integer 'id' or a 'name' ({error!r})") from error
    ids = [category.id for category in categories]
    if len(set(ids)) != len(ids):
        raise CocoError(f"{uri}: duplicate category ids")
    return tuple(categories)


def _read_images(ground_truth: dict, uri: str) -> tuple[dict[int, tuple[int, int]], dict[int, str]]:
    """`{image_id: (height, width)}` and `{image_id: file_name}` in file order."""
    if not isinstance(ground_truth.get("images"), list):
        raise CocoError(f"{uri}: not a COCO instances file (no 'images' list)")
    sizes: dict[int, tuple[int, int]] = {}
    file_names: dict[int, str] = {}
    for item in ground_truth["images"]:
        try:
            image_id, height, width = int(item["id"]), int(item["height"]), int(item["width"])
            file_name = item["file_name"]
        except (KeyError, TypeError, ValueError) as error:
            raise CocoError(
                f"{uri}: an image lacks an integer id/width/height or a file_name ({error!r})"
            ) from error
        if image_id in sizes:
            raise CocoError(f"{uri}: duplicate image id {image_id}")
        if height <= 0 or width <= 0 or not isinstance(file_name, str):
            raise CocoError(f"{uri}: image {image_id} has a bad size or file_name")
        sizes[image_id] = (height, width)
        file_names[image_id] = file_name
    return sizes, file_names


def _is_finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
