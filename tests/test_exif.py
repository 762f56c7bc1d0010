"""EXIF orientation in annotated data: training and evaluation read images as stored by default,
as their annotators saw them; `--exif-orientation apply` is for annotations of displayed images.

The data: shapes images re-saved with an EXIF orientation tag, 6 (turn right to display) on one
and 3 (turn 180 degrees) on another, pixels unchanged.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

from jobs import evaluate as evaluate_job
from jobs import train as train_job
from mrcnn import storage
from mrcnn.coco import read_coco
from mrcnn.images import decode_image
from mrcnn.orientation import boxes_to_stored, exif_orientation, mask_to_stored
from mrcnn.shapes import generate_shapes
from pipeline.segment.output import SCHEMA
from pipeline.train.data import TrainingCollate, decode_training_batch
from pipeline.train.metrics import read_history

ORIENTED = {1: 6, 2: 3}  # image id -> EXIF orientation


def _with_orientation(pixels: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", exif=exif.tobytes())
    return buffer.getvalue()


def _displayed(array: np.ndarray, orientation: int) -> np.ndarray:
    """What `exif_transpose` shows for stored `array` (an image or a mask) with `orientation`."""
    image = Image.open(io.BytesIO(_with_orientation(array, orientation)))
    return np.array(ImageOps.exif_transpose(image))


@pytest.fixture(scope="module")
def exif_shapes(tmp_path_factory):
    """Shapes (64 px) whose images 1 and 2 carry EXIF orientations 6 and 3; annotations as stored."""
    shapes = generate_shapes(str(tmp_path_factory.mktemp("exif")), 6, seed=4, size=64)
    coco = json.loads(storage.read_bytes(shapes.annotations_uri))
    for image in coco["images"]:
        if image["id"] in ORIENTED:
            uri = storage.join(shapes.images_root, image["file_name"])
            pixels = decode_image(storage.read_bytes(uri))
            storage.write_bytes(uri, _with_orientation(pixels, ORIENTED[image["id"]]))
    return shapes


def _batch(records: list[dict]) -> dict:
    return {key: np.array([r[key] for r in records], dtype=object) for key in records[0]}


def _column(values: list) -> np.ndarray:
    column = np.empty(len(values), dtype=object)
    for index, value in enumerate(values):
        column[index] = value
    return column


def _decoded_targets(dataset, orientation: str):
    records = dataset.to_records()
    rows = decode_training_batch(
        _batch(records), category_to_label=dataset.category_to_label, flip=False, exif_orientation=orientation
    )
    images, targets = TrainingCollate()({key: _column(values) for key, values in rows.items()})
    return records, images, targets


@pytest.mark.parametrize("orientation", range(2, 9))
def test_detections_on_the_displayed_image_map_back_to_the_stored_pixels(orientation):
    stored = np.zeros((30, 50), np.uint8)
    stored[4:11, 7:20] = 1
    displayed = _displayed(stored, orientation)
    assert exif_orientation(_with_orientation(stored, orientation)) == orientation
    np.testing.assert_array_equal(mask_to_stored(displayed, orientation), stored)
    ys, xs = np.nonzero(displayed)
    box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
    height, width = displayed.shape
    np.testing.assert_array_equal(boxes_to_stored(box, orientation, width, height), [[7, 4, 20, 11]])


def test_training_reads_stored_pixels_and_their_masks_by_default(exif_shapes):
    """Stored convention: the image is the file's pixels, the masks those of the annotations."""
    dataset = read_coco(exif_shapes.annotations_uri, exif_shapes.images_root)
    records, images, targets = _decoded_targets(dataset, "stored")
    assert len(images) == len(records)  # none left out
    for record, image, target in zip(records, images, targets, strict=True):
        if record["image_id"] not in ORIENTED:
            continue
        pixels = np.array(Image.open(io.BytesIO(storage.read_bytes(record["uri"]))).convert("RGB"))
        assert torch.equal(image, torch.from_numpy(pixels.astype(np.float32) / 255).permute(2, 0, 1))
        annotations = json.loads(record["annotations"])
        expected = [mask_utils.decode(a["segmentation"]) for a in annotations if not a.get("iscrowd")]
        kept = [m for m in expected if m.any()]
        assert len(target["masks"]) == len(kept) > 0
        for mask, annotation_mask in zip(target["masks"], kept, strict=True):
            np.testing.assert_array_equal(mask.numpy(), annotation_mask)


def test_apply_convention_turns_pixels_and_masks_together(exif_shapes, tmp_path):
    """Annotations made on the displayed images, read with `apply`: each decoded mask is the
    stored one turned as the pixels are, so it covers the same object."""
    coco = json.loads(storage.read_bytes(exif_shapes.annotations_uri))
    for annotation in coco["annotations"]:
        orientation = ORIENTED.get(annotation["image_id"])
        if orientation:
            mask = _displayed(mask_utils.decode(annotation["segmentation"]), orientation)
            rle = mask_utils.encode(np.asfortranarray(mask))
            annotation["segmentation"] = {"size": list(mask.shape), "counts": rle["counts"].decode()}
            annotation["bbox"] = [float(v) for v in mask_utils.toBbox(rle)]
    annotations = tmp_path / "displayed.json"
    annotations.write_text(json.dumps(coco))
    stored_set = read_coco(exif_shapes.annotations_uri, exif_shapes.images_root)
    applied_set = read_coco(str(annotations), exif_shapes.images_root)
    _, stored_images, stored_targets = _decoded_targets(stored_set, "stored")
    records, images, targets = _decoded_targets(applied_set, "apply")
    for record, image, target, stored_image, stored_target in zip(
        records, images, targets, stored_images, stored_targets, strict=True
    ):
        orientation = ORIENTED.get(record["image_id"], 1)
        pixels = (stored_image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        turned = _displayed(pixels, orientation) if orientation != 1 else pixels
        np.testing.assert_array_equal((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), turned)
        for mask, stored_mask in zip(target["masks"], stored_target["masks"], strict=True):
            expected = stored_mask.numpy()
            if orientation != 1:
                expected = _displayed(expected, orientation)
            np.testing.assert_array_equal(mask.numpy(), expected)


def _displayed_rows(shapes) -> list[dict]:
    """Perfect jobs.segment rows: the ground truth as a person sees each image (EXIF applied)."""
    dataset = read_coco(shapes.annotations_uri, shapes.images_root)
    rows = []
    for record in dataset.images:
        orientation = ORIENTED.get(record.image_id, 1)
        boxes, masks = [], []
        for annotation in record.annotations:
            mask = mask_utils.decode(annotation["segmentation"])
            if orientation != 1:
                mask = _displayed(mask, orientation)
            rle = mask_utils.encode(np.asfortranarray(mask))
            x, y, w, h = mask_utils.toBbox(rle).tolist()
            boxes.append([x, y, x + w, y + h])
            masks.append(rle["counts"].decode())
        rows.append({
            "path": record.uri, "width": record.width, "height": record.height,
            "category_ids": [a["category_id"] for a in record.annotations],
            "categories": ["shape"] * len(masks), "scores": [1.0] * len(masks), "boxes": boxes,
            "masks": masks, "error": None, "model": "ground-truth",
        })  # fmt: skip
    return rows


def test_evaluate_maps_rows_of_oriented_images_back_to_the_stored_annotations(exif_shapes, tmp_path):
    folder = tmp_path / "pred"
    folder.mkdir()
    table = pa.Table.from_pylist(_displayed_rows(exif_shapes), schema=SCHEMA)
    pq.write_table(table, folder / "part-0.parquet")
    argv = ["--predictions", str(folder), "--annotations", exif_shapes.annotations_uri]
    assert evaluate_job.main([*argv, "--json", str(tmp_path / "stored.json")]) == 0
    stored = json.loads((tmp_path / "stored.json").read_text())
    assert stored["segm"]["AP"] == pytest.approx(1.0) and stored["bbox"]["AP"] == pytest.approx(1.0)

    # Scored as displayed against stored annotations, the turned images' objects are misplaced.
    as_is_json = str(tmp_path / "as-is.json")
    assert evaluate_job.main([*argv, "--exif-orientation", "apply", "--json", as_is_json]) == 0
    as_is = json.loads((tmp_path / "as-is.json").read_text())
    assert as_is["segm"]["AP"] < 0.9


@pytest.mark.slow
def test_a_dataset_of_oriented_images_trains_and_validates_on_every_image(
    exif_shapes, tmp_path, ray_local, capsys
):
    """jobs.train in the default convention: no image is left out of training or validation."""
    argv = [
        "--train-annotations", exif_shapes.annotations_uri, "--train-images", exif_shapes.images_root,
        "--val-annotations", exif_shapes.annotations_uri, "--val-images", exif_shapes.images_root,
        "--output", str(tmp_path / "run"), "--preset", "tiny", "--num-workers", "2", "--batch-size", "1",
        "--epochs", "1",
    ]  # fmt: skip
    assert train_job.main(argv) == 0
    printed = capsys.readouterr()
    (epoch,) = read_history(str(tmp_path / "run" / "metrics.jsonl"))
    assert epoch["images"] == 6
    assert "left out" not in printed.out + printed.err
    # Every image validated, over both workers' shards.
    assert epoch["val_images"] == 6
