"""jobs.evaluate: rows matched to COCO images by file name, COCOeval bbox and segm, --json.

The ground truth written as predictions must score AP 1; the output of jobs.segment must score
what `mrcnn.evaluation.evaluate_coco` gives for the same model run in this process. That
segment + evaluate give exactly the AP a training run reported for its last epoch is checked where
the three jobs run as users submit them (`tests/test_ray_job_submit.py`), not trained twice.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs import evaluate as evaluate_job
from jobs import segment as segment_job
from mrcnn import storage
from mrcnn.categories import category_of
from mrcnn.coco import read_coco
from mrcnn.evaluation import STAT_NAMES, detections_from_prediction, evaluate_coco
from mrcnn.images import decode_image
from mrcnn.model import build_model
from mrcnn.model_folder import load_model, save_model_folder, spec_for
from mrcnn.rle import masks_to_rle
from mrcnn.shapes import CATEGORIES, generate_shapes
from pipeline.segment.output import SCHEMA


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Six 64 px shapes images with their annotations."""
    return generate_shapes(str(tmp_path_factory.mktemp("shapes")), 6, seed=3, size=64)


def ground_truth_rows(shapes, skip: int = 0) -> list[dict]:
    """One output row per image (after the first `skip`) holding its annotations, score 1."""
    data = read_coco(shapes.annotations_uri, shapes.images_root)
    rows = []
    for record in data.images[skip:]:
        annotations = record.annotations
        rows.append(
            {
                "path": record.uri,
                "width": record.width,
                "height": record.height,
                "category_ids": [a["category_id"] for a in annotations],
                "categories": ["shape"] * len(annotations),
                "scores": [1.0] * len(annotations),
                "boxes": [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)],
                "masks": [a["segmentation"]["counts"] for a in annotations],
                "error": None,
                "model": "ground-truth",
            }
        )
    return rows


def write_predictions(folder, rows: list[dict]) -> str:
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), folder / "part-0.parquet")
    return str(folder)


def evaluate(*argv: str) -> int:
    return evaluate_job.main(list(argv))


def test_ground_truth_as_predictions_scores_one_and_json_has_every_stat(shapes, tmp_path, capsys):
    rows = ground_truth_rows(shapes)
    rows.append({**rows[0], "path": "/elsewhere/not-annotated.png"})
    predictions = write_predictions(tmp_path / "pred", rows)
    out = tmp_path / "eval.json"
    argv = ["--predictions", predictions, "--annotations", shapes.annotations_uri, "--json", str(out)]
    assert evaluate(*argv) == 0
    stats = json.loads(out.read_text())
    assert set(stats) == {"bbox", "segm"}
    for iou_type in ("bbox", "segm"):
        assert list(stats[iou_type]) == list(STAT_NAMES)
        assert stats[iou_type]["AP"] == pytest.approx(1.0)
        assert stats[iou_type]["AR100"] == pytest.approx(1.0)
    printed = capsys.readouterr().out
    assert "6 of 6 annotated images have a row" in printed and "1 not in the annotations" in printed
    assert "segm Average Precision" in printed and "bbox Average Precision" in printed


def test_images_root_matches_by_full_path_and_missing_rows_count_as_missed(shapes, tmp_path, capsys):
    predictions = write_predictions(tmp_path / "pred", ground_truth_rows(shapes, skip=2))
    out = tmp_path / "eval.json"
    argv = ["--predictions", predictions, "--annotations", shapes.annotations_uri, "--json", str(out)]
    assert evaluate(*argv, "--images-root", shapes.images_root) == 0
    stats = json.loads(out.read_text())
    assert 0 < stats["bbox"]["AR100"] < 1 and stats["bbox"]["AP"] < 1
    captured = capsys.readouterr()
    assert "4 of 6 annotated images have a row" in captured.out
    assert "2 annotated images have no row" in captured.err

    assert evaluate(*argv, "--images-root", "/some/other/root") == 0
    assert json.loads(out.read_text())["bbox"]["AR100"] == 0


def test_unreadable_inputs_exit_2_with_one_line(shapes, tmp_path, capsys):
    predictions = write_predictions(tmp_path / "pred", ground_truth_rows(shapes))
    assert evaluate("--predictions", str(tmp_path / "none"), "--annotations", shapes.annotations_uri) == 2
    assert evaluate("--predictions", predictions, "--annotations", str(tmp_path / "none.json")) == 2
    (tmp_path / "bad.json").write_text('{"images": []}')
    assert evaluate("--predictions", predictions, "--annotations", str(tmp_path / "bad.json")) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all(line.startswith("evaluate: error:") for line in lines)


@pytest.mark.slow
def test_segment_output_scores_what_the_model_scores_in_process(shapes, tmp_path, ray_local):
    """jobs.segment + jobs.evaluate give exactly the AP of the same model evaluated in this process
    (same detections, float32 boxes and the same RLEs, so every one of the 12 stats is equal)."""
    torch.manual_seed(0)
    model = build_model("tiny", len(CATEGORIES) + 1)
    model_dir = str(tmp_path / "model")
    save_model_folder(model, spec_for(model, CATEGORIES), model_dir)
    threshold = 0.05
    output = str(tmp_path / "out")
    assert segment_job.main([
        "--input", shapes.images_root, "--output", output, "--model", model_dir,
        "--batch-size", "3", "--score-threshold", str(threshold), "--amp", "off",
    ]) == 0  # fmt: skip
    out = tmp_path / "eval.json"
    assert evaluate("--predictions", output, "--annotations", shapes.annotations_uri, "--json", str(out)) == 0

    model, spec = load_model(model_dir)
    model.paste_masks = False
    model.score_threshold = threshold
    data = read_coco(shapes.annotations_uri, shapes.images_root)
    detections = []
    for record in data.images:
        pixels = decode_image(storage.read_bytes(record.uri))
        image = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float() / 255
        with torch.inference_mode():
            [prediction] = model([image])
        rles = masks_to_rle(prediction["mask_probs"], prediction["boxes"], record.height, record.width)
        category_ids = [category_of(spec.categories, label).id for label in prediction["labels"].tolist()]
        detections += detections_from_prediction(
            record.image_id, prediction["boxes"], prediction["scores"], category_ids, rles,
            record.height, record.width,
        )  # fmt: skip
    assert detections, "the random model should detect something at this threshold"
    expected = evaluate_coco(data.ground_truth, detections)
    measured = json.loads(out.read_text())
    for iou_type in ("bbox", "segm"):
        for name in STAT_NAMES:
            assert measured[iou_type][name] == expected[iou_type][name], name
