"""Export the Parquet output of `jobs.segment` as COCO JSON: an instances file, or a results list.

    python -m jobs.export --predictions s3://bucket/masks --format coco \\
        --images-root s3://bucket/photos --min-score 0.5 --output s3://bucket/pseudo-labels.json
    python -m jobs.train --train-annotations s3://bucket/pseudo-labels.json \\
        --train-images s3://bucket/photos --output s3://bucket/runs/next

`--format coco` (default) writes a COCO instances file: `images` with `file_name` relative to
`--images-root` (the `--train-images` of the next training; without it, each row's path as it
is), the model's categories, one annotation per instance with its RLE `segmentation`, `bbox`
[x, y, w, h], mask `area`, `score` and `iscrowd` 0. `--format coco-results --annotations GT.json`
writes the results list COCO's tools and Detectron2 write (`image_id`, `category_id`, `bbox`,
`score`, `segmentation`) for the rows that match an image of GT.json, matched as `jobs.evaluate`
matches them (`IMAGES_ROOT/file_name`, or without `--images-root` the `file_name` a path ends
with); rows that match none are counted, or with `--strict` end the job (exit 2, nothing written).

Instances below `--min-score` are dropped and error rows skipped; the job prints one line with
what it wrote and what it skipped. `--orientation stored` (the default, as `jobs.train` and
`jobs.evaluate` read images by default) maps the masks and boxes of EXIF-rotated images to the
stored pixels; `apply` keeps them as displayed. Rows are streamed and the JSON is written item by
item, then published whole (local or s3://); see `pipeline.results.coco_export`.
"""

from __future__ import annotations

import argparse
import sys

from jobs.cli import OneLineParser, bounded, run_job
from mrcnn.images import ORIENTATIONS
from pipeline.results.coco_export import FORMATS, export_coco, export_results

# The default `--exif-orientation` of jobs.train and jobs.evaluate, which read the file next (a
# test holds them equal; importing jobs.train's config here would cost the job torch's start-up).
DEFAULT_ORIENTATION = "stored"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m jobs.export", description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", required=True, help="output folder of jobs.segment (local or s3://)")
    parser.add_argument(
        "--format", choices=FORMATS, default=FORMATS[0],
        help="coco: an instances file; coco-results: a results list for --annotations (default coco)",
    )  # fmt: skip
    parser.add_argument("--output", required=True, metavar="FILE.json", help="the JSON to write (local or s3://)")
    parser.add_argument(
        "--images-root", default=None, metavar="ROOT",
        help="folder of the images: file_name is a row's path relative to it (coco), or rows match "
        "ROOT/file_name of --annotations (coco-results) (default: paths as they are; coco-results "
        "matches by the file_name a path ends with)",
    )  # fmt: skip
    parser.add_argument(
        "--min-score", type=bounded(float, 0.0, 1.0), default=0.0, metavar="S",
        help="drop instances scoring below S (default 0: every instance of the rows)",
    )  # fmt: skip
    parser.add_argument(
        "--orientation", choices=ORIENTATIONS, default=DEFAULT_ORIENTATION,
        help="masks and boxes on the stored pixels, EXIF orientation undone, as jobs.train and "
        "jobs.evaluate read images by default; or 'apply': as displayed, for tools that apply it "
        f"(default {DEFAULT_ORIENTATION})",
    )  # fmt: skip
    parser.add_argument(
        "--annotations", default=None, metavar="GT.json",
        help="coco-results: the COCO instances file whose image ids the results use",
    )
    parser.add_argument(
        "--strict", action="store_true",
        help="coco-results: a row matching no image of --annotations ends the job (exit 2) instead "
        "of being counted and skipped",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.format == "coco-results" and args.annotations is None:
        parser.error("--format coco-results needs --annotations GT.json")
    if args.format == "coco" and (args.annotations is not None or args.strict):
        parser.error("--annotations and --strict are for --format coco-results")
    return run_job("export", lambda: export(args))


def export(args: argparse.Namespace) -> int:
    """Write the file, print what it holds and what was skipped."""
    if args.format == "coco":
        summary = export_coco(
            args.predictions, args.output, args.images_root, args.min_score, args.orientation
        )
    else:
        summary = export_results(
            args.predictions, args.output, args.annotations, args.images_root, args.min_score,
            args.orientation, args.strict,
        )  # fmt: skip
    for note in summary.notes:
        print(f"export: note: {note}", file=sys.stderr)
    print(f"export: {summary.line()}")
    if summary.images == 0:
        print("export: warning: no row was exported (see what was skipped above)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
