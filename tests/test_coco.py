"""read_coco and build_target on small hand-made COCO files, local and on moto S3."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mrcnn import coco, storage
from mrcnn.categories import Category
from mrcnn.images import decode_image

HEIGHT, WIDTH = 30, 40


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with zeros."""
    flat = mask.astype(np.uint8).flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    edges = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(edges).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"size": [HEIGHT, WIDTH], "counts": counts}


def rect(y1: int, y2: int, x1: int, x2: int) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[y1:y2, x1:x2] = 1
    return mask


def annotation(id, image_id, category_id, segmentation, bbox, iscrowd=0) -> dict:
    return {
        "id": id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": segmentation,
        "bbox": bbox,
        "area": float(np.prod(bbox[2:])),
        "iscrowd": iscrowd,
    }


GOOD = [
    # A square polygon, one part.
    annotation(1, 1, 3, [[10, 5, 20, 5, 20, 15, 10, 15]], [10, 5, 10, 10]),
    # An object in two parts; the bbox spans both.
    annotation(2, 1, 7, [[0, 0, 4, 0, 4, 4, 0, 4], [30, 20, 36, 20, 36, 26]], [0, 0, 36, 26]),
    # Uncompressed RLE starting with a foreground pixel, bbox partly outside the image.
    annotation(3, 1, 1, uncompressed_rle(rect(0, 6, 35, 40)), [35, -2, 10, 8]),
    # Compressed RLE with str counts.
    annotation(4, 2, 3, compressed_rle(rect(10, 20, 5, 25)), [5, 10, 20, 10]),
    # A crowd region (uncompressed RLE, as COCO stores them).
    annotation(5, 2, 1, uncompressed_rle(rect(0, 8, 0, 30)), [0, 0, 30, 8], iscrowd=1),
    # A polygon with one degenerate part: the good part keeps the object.
    annotation(6, 2, 7, [[1, 25, 3, 25], [30, 10, 38, 10, 38, 18, 30, 18]], [30, 10, 8, 8]),
]

DEGENERATE = [
    annotation(10, 1, 3, [[10, 5, 20, 5, 20, 15]], [10, 5, 0, 10]),  # zero width
    annotation(11, 1, 3, [[10, 5, 20, 5, 20, 15]], [20, 5, -10, 10]),  # negative width
    annotation(12, 1, 3, [[50, 5, 60, 5, 60, 15]], [50, 5, 10, 10]),  # box outside the image
    annotation(13, 2, 3, [[1, 1, 9, 9]], [1, 1, 8, 8]),  # 2 points
    annotation(14, 2, 3, [[1, 1, 9, 9, 5]], [1, 1, 8, 8]),  # odd number of coordinates
    annotation(15, 2, 3, [[45, 5, 55, 5, 55, 15]], [35, 5, 10, 10]),  # polygon outside
    annotation(16, 2, 3, compressed_rle(rect(0, 0, 0, 0)), [1, 1, 5, 5]),  # empty RLE
    annotation(17, 1, 99, [[10, 5, 20, 5, 20, 15]], [10, 5, 10, 10]),  # unknown category
    annotation(18, 42, 3, [[10, 5, 20, 5, 20, 15]], [10, 5, 10, 10]),  # unknown image
    annotation(19, 1, 3, {"size": [10, 10], "counts": [0, 100]}, [0, 0, 5, 5]),  # wrong size
    annotation(20, 1, 3, {"size": [HEIGHT, WIDTH], "counts": [5, 5]}, [0, 0, 5, 5]),  # short
    annotation(21, 2, 3, [[1, 1, "x", 9, 9, 1]], [1, 1, 8, 8]),  # not a number
]

EXPECTED_SKIPS = {
    coco.EMPTY_BOX: 3,
    coco.SHORT_POLYGON: 2,
    coco.EMPTY_MASK: 2,
    coco.UNKNOWN_CATEGORY: 1,
    coco.UNKNOWN_IMAGE: 1,
    coco.MALFORMED: 3,
}


def ground_truth() -> dict:
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": WIDTH, "height": HEIGHT},
            {"id": 2, "file_name": "sub/b.png", "width": WIDTH, "height": HEIGHT},
            {"id": 3, "file_name": "empty.png", "width": WIDTH, "height": HEIGHT},
        ],
        # Ids with gaps, listed out of order.
        "categories": [
            {"id": 7, "name": "triangle"},
            {"id": 1, "name": "circle"},
            {"id": 3, "name": "square"},
        ],
        "annotations": GOOD + DEGENERATE,
    }


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (WIDTH, HEIGHT), (value, value, value)).save(buffer, "PNG")
    return buffer.getvalue()


def write_dataset(root: str) -> str:
    storage.write_bytes(storage.join(root, "annotations.json"), json.dumps(ground_truth()).encode())
    for value, name in enumerate(["a.png", "sub/b.png", "empty.png"]):
        storage.write_bytes(storage.join(root, "images", name), png(value * 50))
    return storage.join(root, "annotations.json")


@pytest.fixture
def dataset(tmp_path) -> coco.CocoDataset:
    return coco.read_coco(write_dataset(str(tmp_path)), str(tmp_path / "images"))


def target_of(dataset: coco.CocoDataset, image_id: int) -> dict:
    record = next(record for record in dataset.images if record.image_id == image_id)
    return coco.build_target(record.annotations, record.height, record.width, dataset.category_to_label)


def test_categories_are_sorted_and_gapped_ids_map_to_contiguous_labels(dataset):
    assert dataset.categories == (
        Category(1, "circle"),
        Category(3, "square"),
        Category(7, "triangle"),
    )
    assert dataset.category_to_label == {1: 1, 3: 2, 7: 3}
    assert {label: c.id for label, c in enumerate(dataset.categories, 1)} == {1: 1, 2: 3, 3: 7}


def test_images_keep_file_order_uris_and_only_good_annotations(dataset, tmp_path):
    assert [record.image_id for record in dataset.images] == [1, 2, 3]
    assert dataset.images[1].uri == str(tmp_path / "images" / "sub" / "b.png")
    assert (dataset.images[1].width, dataset.images[1].height) == (WIDTH, HEIGHT)
    kept = [a["id"] for record in dataset.images for a in record.annotations]
    assert kept == [1, 2, 3, 4, 5, 6]
    assert dataset.images[2].annotations == ()
    assert dataset.ground_truth == ground_truth()


def test_evaluation_ground_truth_holds_only_the_kept_annotations(dataset):
    truth = dataset.evaluation_ground_truth()

    assert [a["id"] for a in truth["annotations"]] == [1, 2, 3, 4, 5, 6]
    assert truth["images"] == ground_truth()["images"]
    assert truth["categories"] == ground_truth()["categories"]


def test_degenerate_annotations_are_counted_in_one_warning(tmp_path, caplog):
    uri = write_dataset(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="mrcnn.coco"):
        dataset = coco.read_coco(uri, str(tmp_path / "images"))
    assert dataset.skipped == EXPECTED_SKIPS
    warnings = [r for r in caplog.records if r.name == "mrcnn.coco"]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert f"skipped 12 of {len(GOOD) + len(DEGENERATE)} annotations" in message
    assert f"3 {coco.EMPTY_BOX}" in message
    assert f"2 {coco.SHORT_POLYGON}" in message
    assert uri in message


def test_clean_dataset_logs_nothing(tmp_path, caplog):
    clean = dict(ground_truth(), annotations=GOOD)
    path = tmp_path / "clean.json"
    path.write_text(json.dumps(clean))
    with caplog.at_level(logging.WARNING, logger="mrcnn.coco"):
        dataset = coco.read_coco(str(path), str(tmp_path))
    assert dataset.skipped == {}
    assert caplog.records == []


def test_annotation_that_is_not_an_object_is_malformed(tmp_path):
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(dict(ground_truth(), annotations=["oops", GOOD[0]])))
    dataset = coco.read_coco(str(path), str(tmp_path))
    assert dataset.skipped == {coco.MALFORMED: 1}
    assert dataset.images[0].annotations == (GOOD[0],)


def test_target_of_polygons_and_rle_matches_pycocotools(dataset, tmp_path):
    target = target_of(dataset, 1)
    assert target["boxes"].dtype == np.float32
    assert target["labels"].dtype == np.int64
    assert target["masks"].dtype == np.uint8
    assert target["iscrowd"].dtype == np.int64
    np.testing.assert_array_equal(target["labels"], [2, 3, 1])  # categories 3, 7, 1
    np.testing.assert_array_equal(
        target["boxes"],
        [[10, 5, 20, 15], [0, 0, 36, 26], [35, 0, 40, 6]],  # the last one clipped
    )
    np.testing.assert_array_equal(target["iscrowd"], [0, 0, 0])
    assert target["masks"].shape == (3, HEIGHT, WIDTH)
    reference = COCO(str(tmp_path / "annotations.json"))
    for mask, annotation_id in zip(target["masks"], [1, 2, 3], strict=True):
        expected = reference.annToMask(reference.anns[annotation_id])
        np.testing.assert_array_equal(mask, expected)
    # The two-part object covers both parts; the RLE is exactly the rectangle it encodes.
    assert target["masks"][1][2, 2] == 1 and target["masks"][1][22, 33] == 1
    np.testing.assert_array_equal(target["masks"][2], rect(0, 6, 35, 40))
    assert target["crowd_boxes"].shape == (0, 4)


def test_crowd_regions_are_kept_out_of_the_loss_but_reported(dataset):
    target = target_of(dataset, 2)
    np.testing.assert_array_equal(target["labels"], [2, 3])  # annotations 4 and 6
    np.testing.assert_array_equal(target["masks"][0], rect(10, 20, 5, 25))
    np.testing.assert_array_equal(target["iscrowd"], [0, 0])
    np.testing.assert_array_equal(target["crowd_boxes"], [[0, 0, 30, 8]])
    # Annotation 6 lost its 2-point part but kept its square.
    assert target["masks"][1][14, 34] == 1
    assert target["masks"][1].sum() == 64


def test_image_without_annotations_gives_empty_well_formed_target(dataset):
    target = target_of(dataset, 3)
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == np.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == np.int64
    assert target["masks"].shape == (0, HEIGHT, WIDTH) and target["masks"].dtype == np.uint8
    assert target["iscrowd"].shape == (0,)
    assert target["crowd_boxes"].shape == (0, 4)


def test_build_target_skips_degenerate_annotations_on_its_own():
    # Every reason but the unknown image id, which only the whole file can tell.
    degenerate = [a for a in DEGENERATE if a["image_id"] != 42]
    target = coco.build_target(degenerate + GOOD[:1], HEIGHT, WIDTH, {1: 1, 3: 2, 7: 3})
    np.testing.assert_array_equal(target["labels"], [2])
    np.testing.assert_array_equal(target["boxes"], [[10, 5, 20, 15]])


def test_missing_bbox_is_taken_from_the_mask():
    without_bbox = {"category_id": 1, "segmentation": compressed_rle(rect(3, 9, 4, 14))}
    target = coco.build_target([without_bbox], HEIGHT, WIDTH, {1: 1})
    np.testing.assert_array_equal(target["boxes"], [[4, 3, 14, 9]])


def test_records_are_plain_rows_that_rebuild_the_same_targets(dataset):
    rows = dataset.to_records()
    assert [row["image_id"] for row in rows] == [1, 2, 3]
    assert set(rows[0]) == {"image_id", "file_name", "uri", "width", "height", "annotations"}
    assert isinstance(rows[0]["annotations"], str)
    for row in rows:
        target = coco.build_target(
            json.loads(row["annotations"]), row["height"], row["width"], dataset.category_to_label
        )
        expected = target_of(dataset, row["image_id"])
        for key in expected:
            np.testing.assert_array_equal(target[key], expected[key])


def test_missing_file_names_the_uri(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(coco.CocoError, match="nope.json") as caught:
        coco.read_coco(missing, str(tmp_path))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "no 'categories' list"),
        (b'{"categories": [], "annotations": []}', "no 'images' list"),
        (b'{"categories": [{"id": 1}], "images": []}', "category lacks"),
        (b'{"categories": [], "images": [{"id": 1, "file_name": "a.png"}]}', "image lacks"),
    ],
)
def test_invalid_files_name_the_uri_and_the_problem(tmp_path, content, reason):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(coco.CocoError, match=reason) as caught:
        coco.read_coco(str(path), str(tmp_path))
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_reads_annotations_and_images_from_s3(s3_bucket):
    root = f"{s3_bucket}/coco"
    dataset = coco.read_coco(write_dataset(root), f"{root}/images")
    assert dataset.skipped == EXPECTED_SKIPS
    assert [record.uri for record in dataset.images] == [
        f"{root}/images/a.png",
        f"{root}/images/sub/b.png",
        f"{root}/images/empty.png",
    ]
    for value, record in enumerate(dataset.images):
        pixels = decode_image(storage.read_bytes(record.uri))
        assert pixels.shape == (record.height, record.width, 3)
        assert (pixels == value * 50).all()
    assert target_of(dataset, 1)["masks"].shape == (3, HEIGHT, WIDTH)


def test_missing_s3_object_is_a_coco_error(s3_bucket):
    with pytest.raises(coco.CocoError, match=f"{s3_bucket}/absent.json"):
        coco.read_coco(f"{s3_bucket}/absent.json", s3_bucket)
