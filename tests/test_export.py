"""jobs.export: COCO instances files and results lists of a segmentation output, local and s3://.

The predictions are hand-made rows committed as the segment wing commits them: the shapes'
ground truth as rows (so that the export scored against the same rows must give AP 1), one error
row, low-score extras, and images carrying an EXIF orientation whose rows describe them as
displayed. What is checked is what the next tools read: pycocotools, jobs.evaluate, jobs.train's
image decoding and jobs.train itself.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jobs import evaluate as evaluate_job
from jobs import export as export_job
from mrcnn import storage
from mrcnn.evaluation import STAT_NAMES
from mrcnn.images import decode_image
from mrcnn.model_spec import SPEC_FILE, ModelSpec
from mrcnn.shapes import CATEGORIES, generate_shapes
from pipeline.segment import output, provenance

ROTATED = 2  # image id (of 6) stored with EXIF orientation 6: its rows describe it turned


def _with_orientation(pixels: np.ndarray, orientation: int, kind: str = "PNG") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    options = {"quality": 100} if kind == "JPEG" else {}
    Image.fromarray(pixels).save(buffer, kind, exif=exif.tobytes(), **options)
    return buffer.getvalue()


def _displayed(array: np.ndarray, orientation: int) -> np.ndarray:
    """What Pillow's `exif_transpose` shows of the stored `array` (an image or a mask)."""
    return np.array(ImageOps.exif_transpose(Image.open(io.BytesIO(_with_orientation(array, orientation)))))


def _tight_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _row(path: str, size: tuple[int, int], instances: list[tuple[int, float, np.ndarray]]) -> dict:
    """An output row of `(category id, score, uint8[H, W] mask on the displayed image)`."""
    width, height = size
    return {
        "path": path, "width": width, "height": height,
        "category_ids": [category for category, _, _ in instances],
        "categories": [next(c.name for c in CATEGORIES if c.id == category) for category, _, _ in instances],
        "scores": [score for _, score, _ in instances],
        "boxes": [_tight_box(mask) for _, _, mask in instances],
        "masks": [mask_utils.encode(np.asfortranarray(mask))["counts"].decode() for _, _, mask in instances],
        "error": None, "model": "hand-made",
    }  # fmt: skip


def _error_row(path: str) -> dict:
    return {**_row(path, (1, 1), []), "width": None, "height": None, "error": "ImageDecodeError: empty file"}


def _commit(predictions: str, rows: list[dict], model: str) -> str:
    for start in range(0, len(rows), 4):  # several part files, as a job writes them
        output.commit_part(pa.Table.from_pylist(rows[start : start + 4], schema=output.SCHEMA), predictions)
    storage.write_bytes(storage.join(predictions, provenance.JOB_FILE), json.dumps({"model": model}).encode())
    return predictions


def _model_folder(uri: str) -> str:
    """A model folder as far as export reads one: its `model.json` with the shapes' categories."""
    spec = ModelSpec("tiny", len(CATEGORIES) + 1, "align", "sigmoid", 64, 64, tuple(CATEGORIES))
    storage.write_bytes(storage.join(uri, SPEC_FILE), spec.to_json().encode())
    return uri


def _dataset(root: str) -> tuple[object, list[dict]]:
    """Six 64 px shapes images, image ROTATED re-saved with EXIF orientation 6 (pixels and
    annotations as stored), and their rows: the ground truth on the displayed images, score 1,
    a low-score extra on image 1, and an error row."""
    shapes = generate_shapes(root, 6, seed=3, size=64)
    coco = json.loads(storage.read_bytes(shapes.annotations_uri))
    rows = []
    for image in coco["images"]:
        uri = storage.join(shapes.images_root, image["file_name"])
        masks = [(a["category_id"], 1.0, mask_utils.decode(a["segmentation"]))
                 for a in coco["annotations"] if a["image_id"] == image["id"]]  # fmt: skip
        if image["id"] == ROTATED:
            storage.write_bytes(uri, _with_orientation(decode_image(storage.read_bytes(uri)), 6))
            masks = [(category, score, _displayed(mask, 6)) for category, score, mask in masks]
        if image["id"] == 1:
            extra = np.zeros((64, 64), np.uint8)
            extra[2:9, 3:12] = 1
            masks.append((CATEGORIES[0].id, 0.25, extra))
        rows.append(_row(uri, (64, 64), masks))
    rows.append(_error_row(storage.join(shapes.images_root, "broken.png")))
    return shapes, rows


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """(shapes, predictions folder, number of ground-truth annotations)."""
    folder = tmp_path_factory.mktemp("export")
    shapes, rows = _dataset(str(folder / "shapes"))
    predictions = _commit(str(folder / "pred"), rows, _model_folder(str(folder / "model")))
    ground_truth = json.loads(storage.read_bytes(shapes.annotations_uri))
    return shapes, predictions, len(ground_truth["annotations"])


def export(*argv: str) -> int:
    return export_job.main(list(argv))


def exit_code(*argv: str) -> int:
    """`main`'s exit code, also for flags that argparse refuses (which exit)."""
    try:
        return export(*argv)
    except SystemExit as error:
        return int(error.code)


def _quiet_coco(path: str) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(path)


def test_coco_file_loads_in_pycocotools_and_scores_ap_one_against_the_same_rows(local, tmp_path, capsys):
    shapes, predictions, annotated = local
    exported = str(tmp_path / "labels.json")
    argv = ["--predictions", predictions, "--output", exported, "--images-root", shapes.images_root]
    assert export(*argv, "--min-score", "0.5") == 0
    line = capsys.readouterr().out
    assert f"export: 6 images, {annotated} annotations, 4 categories -> {exported}" in line
    assert "1 images turned to their stored pixels" in line and "1 error rows" in line
    assert "1 instances below --min-score" in line

    coco = _quiet_coco(exported)
    ground_truth = _quiet_coco(shapes.annotations_uri)
    assert [(c["id"], c["name"]) for c in coco.dataset["categories"]] == [(c.id, c.name) for c in CATEGORIES]
    assert sorted(image["file_name"] for image in coco.dataset["images"]) == sorted(
        image["file_name"] for image in ground_truth.dataset["images"]
    )
    for annotation in coco.dataset["annotations"]:
        assert annotation["iscrowd"] == 0 and annotation["score"] == 1.0
        assert annotation["area"] == int(mask_utils.area(annotation["segmentation"])) > 0
        x, y, w, h = annotation["bbox"]
        assert [x, y, w, h] == pytest.approx(mask_utils.toBbox(annotation["segmentation"]).tolist())

    stats = tmp_path / "stats.json"
    assert evaluate_job.main([
        "--predictions", predictions, "--annotations", exported, "--images-root", shapes.images_root,
        "--json", str(stats),
    ]) == 0  # fmt: skip
    for iou_type in ("bbox", "segm"):
        assert json.loads(stats.read_text())[iou_type]["AP"] == pytest.approx(1.0)

    assert export(*argv) == 0  # without --min-score every instance is kept
    assert len(_quiet_coco(exported).dataset["annotations"]) == annotated + 1


def test_without_images_root_file_names_are_the_rows_paths(local, tmp_path):
    shapes, predictions, _ = local
    exported = str(tmp_path / "labels.json")
    assert export("--predictions", predictions, "--output", exported) == 0
    names = {image["file_name"] for image in json.loads(storage.read_bytes(exported))["images"]}
    assert names == {storage.join(shapes.images_root, f"{i:06d}.png") for i in range(1, 7)}


@pytest.mark.parametrize("kind", ["JPEG", "PNG"])
def test_an_exif_rotated_image_lands_in_the_orientation_training_reads(tmp_path, kind, capsys):
    """A 64 x 40 image stored with orientation 6 (shown 40 x 64) whose one row describes a
    rectangle as displayed: the export holds the rectangle where the stored pixels have it, which
    is what jobs.train decodes by default; `--orientation apply` keeps it as displayed. The JPEG
    is padded past the header read, so its tag comes from the header alone."""
    stored = np.zeros((40, 64), np.uint8)
    stored[8:24, 16:48] = 1  # where the image is red, in stored pixels
    pixels = np.zeros((40, 64, 3), np.uint8)
    pixels[stored == 1] = (255, 0, 0)
    image = str(tmp_path / "images" / f"turned.{kind.lower()}")
    data = _with_orientation(pixels, 6, kind) + (b"\0" * (100 << 10) if kind == "JPEG" else b"")
    storage.write_bytes(image, data)
    displayed = _displayed(stored, 6)
    assert displayed.shape == (64, 40)
    predictions = _commit(str(tmp_path / "pred"), [_row(image, (40, 64), [(1, 0.9, displayed)])], "gone")

    exported = str(tmp_path / "labels.json")
    root = str(tmp_path / "images")
    assert export("--predictions", predictions, "--output", exported, "--images-root", root) == 0
    assert "categories from the rows (model gone" in capsys.readouterr().err
    coco = json.loads(storage.read_bytes(exported))
    assert coco["images"] == [{"id": 1, "file_name": f"turned.{kind.lower()}", "width": 64, "height": 40}]
    [annotation] = coco["annotations"]
    mask = mask_utils.decode(annotation["segmentation"])
    np.testing.assert_array_equal(mask, stored)
    assert annotation["bbox"] == [16.0, 8.0, 32.0, 16.0]
    training_pixels = decode_image(storage.read_bytes(image), orientation="stored")  # jobs.train's default
    np.testing.assert_array_equal(training_pixels[:, :, 0] > 128, mask == 1)
    assert coco["categories"] == [{"id": 1, "name": CATEGORIES[0].name}]

    assert export("--predictions", predictions, "--output", exported, "--orientation", "apply") == 0
    coco = json.loads(storage.read_bytes(exported))
    assert (coco["images"][0]["width"], coco["images"][0]["height"]) == (40, 64)
    np.testing.assert_array_equal(mask_utils.decode(coco["annotations"][0]["segmentation"]), displayed)


def _perturbed(rows: list[dict]) -> list[dict]:
    """Rows that do not score 1: scores spread, one instance dropped, one box shifted."""
    changed = copy.deepcopy(rows)
    for number, row in enumerate(changed):
        row["scores"] = [0.3 + 0.1 * ((number + index) % 7) for index in range(len(row["scores"]))]
    first = changed[0]
    for column in ("category_ids", "categories", "scores", "boxes", "masks"):
        first[column] = first[column][1:]
    changed[1]["boxes"][0] = [value + 6 for value in changed[1]["boxes"][0]]
    return changed


def test_results_list_through_loadres_scores_what_jobs_evaluate_scores(tmp_path, capsys):
    shapes, rows = _dataset(str(tmp_path / "shapes"))
    rows = [*_perturbed(rows), _row("/elsewhere/other.png", (64, 64), [])]
    predictions = _commit(str(tmp_path / "pred"), rows, "gone")
    results = str(tmp_path / "results.json")
    argv = ["--predictions", predictions, "--format", "coco-results", "--annotations",
            shapes.annotations_uri, "--output", results]  # fmt: skip
    assert export(*argv) == 0
    line = capsys.readouterr().out
    assert "6 images" in line and "1 rows not in the annotations" in line and "1 error rows" in line
    stats_file = tmp_path / "stats.json"
    assert evaluate_job.main(
        ["--predictions", predictions, "--annotations", shapes.annotations_uri, "--json", str(stats_file)]
    ) == 0
    expected = json.loads(stats_file.read_text())
    assert 0 < expected["segm"]["AP"] < 1

    listed = json.loads(storage.read_bytes(results))
    assert set(listed[0]) == {"image_id", "category_id", "bbox", "score", "segmentation"}
    ground_truth = _quiet_coco(shapes.annotations_uri)
    for iou_type in ("bbox", "segm"):
        # As Detectron2's COCOEvaluator: a segm result without its box, or loadRes takes the
        # box's area for the size ranges.
        loaded = [{k: v for k, v in r.items() if iou_type == "bbox" or k != "bbox"} for r in listed]
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator = COCOeval(ground_truth, ground_truth.loadRes(loaded), iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = dict(zip(STAT_NAMES, evaluator.stats.tolist(), strict=True))
        assert stats == pytest.approx(expected[iou_type])

    assert export(*argv, "--strict") == 2
    assert "1 rows have no image in" in capsys.readouterr().err
    assert export(*argv, "--images-root", shapes.images_root) == 0  # exact paths: the same rows match
    assert json.loads(storage.read_bytes(results)) == listed


def test_default_orientation_is_the_one_train_and_evaluate_read_with():
    from pipeline.train.config import TrainConfig

    evaluate_default = evaluate_job.build_parser().get_default("exif_orientation")
    assert export_job.DEFAULT_ORIENTATION == TrainConfig.exif_orientation == evaluate_default
    assert export_job.build_parser().get_default("orientation") == export_job.DEFAULT_ORIENTATION


def test_bad_input_gets_one_line_and_exit_2(local, tmp_path, capsys):
    shapes, predictions, _ = local
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-folder").mkdir()
    out = str(tmp_path / "out.json")
    cases = [
        (["--predictions", str(tmp_path / "empty"), "--output", out], "no segmentation output"),
        (["--predictions", predictions, "--output", str(tmp_path / "a-file" / "out.json")], "cannot write"),
        (["--predictions", predictions, "--output", str(tmp_path / "a-folder")], "a folder"),
        (["--predictions", predictions, "--output", out, "--format", "coco-results"], "--annotations"),
        (["--predictions", predictions, "--output", out, "--format", "yaml"], "--format"),
        (["--predictions", predictions, "--output", out, "--images-root", str(tmp_path)], "not under"),
        (["--predictions", predictions, "--output", out, "--min-score", "2"], "--min-score"),
    ]
    for argv, named in cases:
        capsys.readouterr()
        assert exit_code(*argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and named in err, (argv, err)
    assert not (tmp_path / "out.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder", "empty"]  # no leftovers


def test_from_and_to_s3(s3_bucket, capsys):
    shapes, rows = _dataset(f"{s3_bucket}/shapes")
    predictions = _commit(f"{s3_bucket}/pred", rows, _model_folder(f"{s3_bucket}/model"))
    exported = f"{s3_bucket}/labels/pseudo.json"
    argv = ["--predictions", predictions, "--output", exported, "--images-root", shapes.images_root]
    assert export(*argv) == 0
    assert "1 images turned to their stored pixels" in capsys.readouterr().out
    coco = json.loads(storage.read_bytes(exported))
    ground_truth = json.loads(storage.read_bytes(shapes.annotations_uri))
    assert {i["file_name"] for i in coco["images"]} == {i["file_name"] for i in ground_truth["images"]}
    by_image = {i["file_name"]: i["id"] for i in coco["images"]}
    names = {i["id"]: i["file_name"] for i in ground_truth["images"]}
    exported_masks = sorted(
        (by_image[names[ROTATED]], mask_utils.decode(a["segmentation"]).tobytes())
        for a in coco["annotations"] if a["image_id"] == by_image[names[ROTATED]]
    )  # fmt: skip
    stored_masks = sorted(
        (by_image[names[ROTATED]], mask_utils.decode(a["segmentation"]).tobytes())
        for a in ground_truth["annotations"] if a["image_id"] == ROTATED
    )  # fmt: skip
    assert exported_masks == stored_masks and exported_masks
    assert export("--predictions", predictions, "--output", "s3://no-such-bucket-here/x.json") == 2
    assert "cannot write there" in capsys.readouterr().err


@pytest.mark.slow
def test_jobs_train_trains_on_the_exported_file(local, tmp_path, ray_local):
    from jobs import train as train_job

    shapes, predictions, _ = local
    exported = str(tmp_path / "labels.json")
    argv = ["--predictions", predictions, "--output", exported, "--images-root", shapes.images_root]
    assert export(*argv) == 0
    run = str(tmp_path / "run")
    assert train_job.main([
        "--train-annotations", exported, "--train-images", shapes.images_root, "--output", run,
        "--preset", "tiny", "--num-workers", "1", "--batch-size", "2", "--epochs", "1", "--max-steps", "2",
        "--warmup-iters", "1",
    ]) == 0  # fmt: skip
    spec = json.loads(storage.read_bytes(storage.join(run, "model", SPEC_FILE)))
    assert [(c["id"], c["name"]) for c in spec["categories"]] == [(c.id, c.name) for c in CATEGORIES]
