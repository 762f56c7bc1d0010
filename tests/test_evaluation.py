"""evaluate_coco scores detections like COCOeval; detections_from_prediction builds its input."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mrcnn.evaluation import (
    STAT_NAMES,
    detections_from_prediction,
    evaluate_coco,
    evaluate_coco_with_summary,
)
from mrcnn.rle import masks_to_rle

SIZE = 128
# (image id, category id, x, y, w, h): small (< 32^2), medium and large (> 96^2) objects.
OBJECTS = (
    (1, 1, 5, 5, 20, 20),
    (1, 2, 30, 30, 60, 50),
    (2, 3, 10, 8, 110, 100),
    (2, 1, 40, 50, 25, 16),
    (3, 2, 70, 10, 40, 45),
)


def rectangle_polygon(x: float, y: float, w: float, h: float) -> list[list[float]]:
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def ground_truth() -> dict:
    return {
        "images": [{"id": i, "file_name": f"{i}.png", "width": SIZE, "height": SIZE} for i in (1, 2, 3, 4)],
        "categories": [{"id": c, "name": name} for c, name in ((1, "circle"), (2, "square"), (3, "star"))],
        "annotations": [
            {
                "id": index + 1,
                "image_id": image_id,
                "category_id": category_id,
                "bbox": [x, y, w, h],
                "area": float(w * h),
                "iscrowd": 0,
                "segmentation": rectangle_polygon(x, y, w, h),
            }
            for index, (image_id, category_id, x, y, w, h) in enumerate(OBJECTS)
        ],
    }


def rectangle_rle(x: float, y: float, w: float, h: float) -> dict:
    rle = mask_util.merge(mask_util.frPyObjects(rectangle_polygon(x, y, w, h), SIZE, SIZE))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def detections(shift: float = 0.0) -> list[dict]:
    return [
        {
            "image_id": image_id,
            "category_id": category_id,
            "score": 0.9,
            "bbox": [x + shift, y + shift, w, h],
            "segmentation": rectangle_rle(x + shift, y + shift, w, h),
        }
        for image_id, category_id, x, y, w, h in OBJECTS
    ]


def test_stat_names_are_cocoevals_twelve():
    assert STAT_NAMES == (
        "AP",
        "AP50",
        "AP75",
        "APs",
        "APm",
        "APl",
        "AR1",
        "AR10",
        "AR100",
        "ARs",
        "ARm",
        "ARl",
    )


def test_perfect_detections_score_one():
    stats = evaluate_coco(ground_truth(), detections())

    assert set(stats) == {"bbox", "segm"}
    for iou_type in ("bbox", "segm"):
        assert list(stats[iou_type]) == list(STAT_NAMES)
        assert stats[iou_type] == pytest.approx(dict.fromkeys(STAT_NAMES, 1.0))


def test_shifted_and_wrong_detections_score_lower():
    perfect = evaluate_coco(ground_truth(), detections())
    shifted = evaluate_coco(ground_truth(), detections(shift=2.0))
    wrong_class = [dict(det, category_id=det["category_id"] % 3 + 1) for det in detections()]
    wrong = evaluate_coco(ground_truth(), wrong_class)

    for iou_type in ("bbox", "segm"):
        assert 0.0 < shifted[iou_type]["AP"] < perfect[iou_type]["AP"]
        assert shifted[iou_type]["AP50"] == pytest.approx(1.0)
        assert wrong[iou_type]["AP"] == 0.0


def test_a_missed_object_lowers_recall():
    stats = evaluate_coco(ground_truth(), detections()[1:])

    for iou_type in ("bbox", "segm"):
        assert stats[iou_type]["AR100"] < 1.0
        assert stats[iou_type]["ARs"] == pytest.approx(0.5)


def test_no_detections_give_zeros():
    stats = evaluate_coco(ground_truth(), [])

    assert stats == {"bbox": dict.fromkeys(STAT_NAMES, 0.0), "segm": dict.fromkeys(STAT_NAMES, 0.0)}


def test_only_the_asked_iou_type_and_bbox_only_detections():
    bbox_only = [{k: v for k, v in det.items() if k != "segmentation"} for det in detections()]

    stats = evaluate_coco(ground_truth(), bbox_only, iou_types=("bbox",))

    assert list(stats) == ["bbox"]
    assert stats["bbox"]["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="segmentation"):
        evaluate_coco(ground_truth(), bbox_only, iou_types=("segm",))


def test_inputs_are_not_modified():
    truth, dets = ground_truth(), detections()
    truth_before, dets_before = copy.deepcopy(truth), copy.deepcopy(dets)

    evaluate_coco(truth, dets)

    assert truth == truth_before
    assert dets == dets_before


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="image ids not in the ground truth: \\[99\\]"):
        evaluate_coco(ground_truth(), [dict(detections()[0], image_id=99)])
    with pytest.raises(ValueError, match="keypoints"):
        evaluate_coco(ground_truth(), detections(), iou_types=("keypoints",))
    with pytest.raises(ValueError, match="annotations"):
        evaluate_coco({"images": [], "categories": []}, [])


def test_evaluation_prints_nothing(capsys):
    evaluate_coco(ground_truth(), detections())

    assert capsys.readouterr().out == ""


def test_summary_is_cocoevals_lines_of_the_same_stats():
    stats, text = evaluate_coco_with_summary(ground_truth(), detections(shift=2.0))

    lines = text.splitlines()
    assert len(lines) == 24
    assert lines[0].startswith("bbox Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]")
    assert lines[1].endswith("= 1.000")
    assert lines[12].startswith("segm")
    printed = [float(line.rsplit("=", 1)[1]) for line in lines]
    expected = [stats[t][name] for t in ("bbox", "segm") for name in STAT_NAMES]
    assert printed == pytest.approx(expected, abs=5e-4)


def test_model_output_through_masks_to_rle_scores_like_the_boxes():
    image_objects = [obj for obj in OBJECTS if obj[0] == 2]
    boxes = torch.tensor([[x, y, x + w, y + h] for _, _, x, y, w, h in image_objects], dtype=torch.float32)
    rles = masks_to_rle(torch.ones(len(boxes), 1, 28, 28), boxes, SIZE, SIZE)

    dets = detections_from_prediction(
        2, boxes, torch.tensor([0.9, 0.8]), torch.tensor([3, 1]), rles, SIZE, SIZE
    )

    assert json.loads(json.dumps(dets)) == dets
    assert dets[0]["bbox"] == [10.0, 8.0, 110.0, 100.0]
    assert dets[1] == {
        "image_id": 2,
        "category_id": 1,
        "score": pytest.approx(0.8),
        "bbox": [40.0, 50.0, 25.0, 16.0],
        "segmentation": {"size": [SIZE, SIZE], "counts": rles[1].decode("ascii")},
    }
    truth = ground_truth()
    truth["images"] = [image for image in truth["images"] if image["id"] == 2]
    stats = evaluate_coco(truth, dets)
    assert stats["bbox"]["AP"] == pytest.approx(1.0)
    assert stats["segm"]["AP50"] == pytest.approx(1.0)


def test_detections_from_prediction_takes_lists_empty_inputs_and_checks_lengths():
    counts = mask_util.encode(np.asfortranarray(np.ones((8, 8), np.uint8)))["counts"]

    dets = detections_from_prediction(7, [[1.0, 2.0, 4.0, 7.0]], [0.5], [3], [counts], 8, 8)

    assert [det["bbox"] for det in dets] == [[1.0, 2.0, 3.0, 5.0]]
    assert dets[0]["segmentation"]["counts"] == counts.decode("ascii")
    assert detections_from_prediction(1, [], [], [], [], 8, 8) == []
    assert (
        detections_from_prediction(
            1, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), [], 8, 8
        )
        == []
    )
    with pytest.raises(ValueError, match="2 boxes, 1 scores"):
        detections_from_prediction(1, np.zeros((2, 4)), np.zeros(1), [1, 2], [b"", b""], 8, 8)


def test_stats_equal_a_direct_cocoeval_run():
    dets = detections(shift=2.0)
    expected = {}
    for iou_type, dropped in (("bbox", "segmentation"), ("segm", "bbox")):
        coco_gt = COCO()
        coco_gt.dataset = ground_truth()
        coco_gt.createIndex()
        results = [{k: v for k, v in det.items() if k != dropped} for det in dets]
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
        expected[iou_type] = dict(zip(STAT_NAMES, coco_eval.stats.tolist(), strict=True))

    assert evaluate_coco(ground_truth(), dets) == expected
