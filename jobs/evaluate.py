"""Score the Parquet output of `jobs.segment` against COCO annotations (COCOeval bbox and segm).

    python -m jobs.evaluate --predictions s3://bucket/masks --annotations s3://bucket/val/annotations.json \\
        --images-root s3://bucket/val/images --json eval.json

Each row is matched to the COCO image whose `file_name` its path ends with (at a `/`), or, with
`--images-root`, whose `IMAGES_ROOT/file_name` is its path. Every annotated image is evaluated: one
without a row counts its objects as missed, and the counts of matched and unmatched images and
rows are printed first. Then COCOeval's two summaries; `--json OUT` writes
`{"bbox": {"AP": ..., ...}, "segm": {...}}` with the 12 stats under their names.

Orientation: `jobs.segment`'s rows describe the displayed image (EXIF applied), while annotated
datasets such as COCO describe the stored pixels. By default (`--exif-orientation stored`, the
convention of `jobs.train` too) each row's image is read for its EXIF orientation and the boxes
and masks of a rotated or flipped image are mapped back to the stored pixels before scoring;
`--exif-orientation apply` scores rows as they are, for annotations made on displayed images.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from jobs.cli import OneLineParser, run_job
from mrcnn import storage
from mrcnn.coco import read_coco
from mrcnn.errors import UserError
from mrcnn.evaluation import detections_from_prediction, evaluate_coco_with_summary
from mrcnn.images import ORIENTATIONS
from mrcnn.orientation import boxes_to_stored, exif_orientation, mask_to_stored, stored_size
from mrcnn.rle import encode_mask, rle_to_mask
from pipeline.segment import output

COLUMNS = ["path", "width", "height", "category_ids", "scores", "boxes", "masks", "error"]


class EvaluationError(UserError):
    """Predictions or annotations that cannot be evaluated together; the message is one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m jobs.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", required=True, help="output folder of jobs.segment (local or s3://)")
    parser.add_argument("--annotations", required=True, help="COCO instances JSON (local or s3://)")
    parser.add_argument(
        "--images-root", default=None, help="folder of the images: match rows by IMAGES_ROOT/file_name"
    )
    parser.add_argument("--json", default=None, metavar="OUT", help="write the stats as JSON here")
    parser.add_argument(
        "--exif-orientation", choices=ORIENTATIONS, default="stored",
        help="the annotations describe the stored pixels (COCO's convention: rows of EXIF-rotated "
        "images are mapped back to them) or the displayed images ('apply') (default stored)",
    )
    return parser


def image_index(ground_truth: dict, images_root: str | None) -> dict[str, dict]:
    """The key a row's path is looked up with -> the COCO image record."""
    if images_root is None:
        return {image["file_name"].lstrip("/"): image for image in ground_truth["images"]}
    filesystem, root = storage.resolve(images_root)
    base = storage.to_uri(filesystem, root)
    return {storage.join(base, image["file_name"]): image for image in ground_truth["images"]}


def match(path: str, index: dict[str, dict], by_suffix: bool) -> dict | None:
    """The image whose key equals `path`, or (`by_suffix`) equals one of its `/`-suffixes."""
    if not by_suffix:
        return index.get(path)
    parts = path.split("/")
    for start in range(len(parts)):
        image = index.get("/".join(parts[start:]))
        if image is not None:
            return image
    return None


def read_detections(
    predictions_uri: str, ground_truth: dict, images_root: str | None, exif_orientation: str = "stored"
) -> tuple[list, dict]:
    """COCO result dicts of the rows that match an annotated image, and the matching counts.

    With `exif_orientation="stored"`, rows of images with an EXIF orientation are mapped back to
    the stored pixels (see the module docstring).
    """
    index = image_index(ground_truth, images_root)
    listed = output.part_files(predictions_uri)
    if not listed[1]:
        raise EvaluationError(f"{predictions_uri}: no such predictions folder (no segmentation output there)")
    batches = output.scan_parts(predictions_uri, COLUMNS, listed)
    detections: list[dict] = []
    matched: set[int] = set()
    counts = {"rows": 0, "error_rows": 0, "unmatched_rows": 0}
    for batch in batches:
        rows = batch.to_pylist()
        wanted = [
            row["error"] is None and match(row["path"], index, by_suffix=images_root is None) is not None
            for row in rows
        ]
        orientations = _orientations(rows, wanted) if exif_orientation == "stored" else [1] * len(rows)
        for row, orientation in zip(rows, orientations, strict=True):
            counts["rows"] += 1
            image = match(row["path"], index, by_suffix=images_root is None)
            if image is None:
                counts["unmatched_rows"] += 1
                continue
            if image["id"] in matched:
                raise EvaluationError(f"{row['path']}: a second row for image {image['file_name']}")
            matched.add(image["id"])
            if row["error"] is not None:
                counts["error_rows"] += 1
                continue
            if orientation != 1:
                row = _to_stored(row, orientation)
            if (row["width"], row["height"]) != (image["width"], image["height"]):
                raise EvaluationError(
                    f"{row['path']}: the row is {row['width']}x{row['height']} but the annotations "
                    f"say {image['width']}x{image['height']}"
                )
            detections += detections_from_prediction(
                image["id"],
                row["boxes"],
                row["scores"],
                row["category_ids"],
                [counts_text.encode("ascii") for counts_text in row["masks"]],
                row["height"],
                row["width"],
            )
    counts["matched_images"] = len(matched)
    counts["images"] = len(ground_truth["images"])
    return detections, counts


def _orientations(rows: list[dict], wanted: list[bool]) -> list[int]:
    """The EXIF orientation of each wanted row's image (1 for the others), read in a few threads."""

    def orientation(row: dict, want: bool) -> int:
        if not want:
            return 1
        try:
            return exif_orientation(storage.read_bytes(row["path"]))
        except storage.StorageError as error:
            raise EvaluationError(
                f"{row['path']}: cannot read the image for its EXIF orientation ({error}); "
                "use --exif-orientation apply if the annotations describe the displayed images"
            ) from error

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(orientation, rows, wanted))


def _to_stored(row: dict, orientation: int) -> dict:
    """A row on the displayed image as it would be on the stored pixels."""
    width, height = stored_size(orientation, row["width"], row["height"])
    boxes = boxes_to_stored(np.asarray(row["boxes"], np.float32), orientation, row["width"], row["height"])
    masks = []
    for counts in row["masks"]:
        stored = mask_to_stored(rle_to_mask(counts, row["height"], row["width"]), orientation)
        masks.append(encode_mask(stored).decode("ascii"))
    return {**row, "width": width, "height": height, "boxes": boxes.tolist(), "masks": masks}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_job("evaluate", lambda: evaluate(args))


def evaluate(args: argparse.Namespace) -> int:
    """Match the rows to the annotations, score them with COCOeval, print and write the stats."""
    try:
        ground_truth = read_coco(args.annotations, images_root="").evaluation_ground_truth()
        detections, counts = read_detections(
            args.predictions, ground_truth, args.images_root, args.exif_orientation
        )
    except storage.StorageError as error:
        # The predictions or annotations could not be read: the command names what to fix.
        raise EvaluationError(str(error)) from error
    print(
        f"evaluate: {counts['matched_images']} of {counts['images']} annotated images have a row "
        f"({counts['error_rows']} of them error rows); {counts['rows']} rows, "
        f"{counts['unmatched_rows']} not in the annotations; {len(detections)} detections"
    )
    if counts["matched_images"] < counts["images"]:
        print(
            f"evaluate: warning: {counts['images'] - counts['matched_images']} annotated images have "
            f"no row; their objects count as missed",
            file=sys.stderr,
        )
    stats, summary = evaluate_coco_with_summary(ground_truth, detections)
    print(summary)
    if args.json:
        storage.write_bytes(args.json, (json.dumps(stats, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
