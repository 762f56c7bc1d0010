"""Draw overlays of chosen rows of a segmentation output: one PNG per row, its image as the row
describes it (EXIF orientation applied) with the masks, boxes, categories and scores drawn.

    python -m jobs.render --predictions s3://bucket/masks --output overlays/ --paths worst.txt
    python -m jobs.render --predictions s3://bucket/masks --output overlays/ --sample 20 --min-score 0.8

`--paths FILE` (local or s3://) lists the rows by their `path`, one URI a line; every one must
have a row. `--sample N` draws a uniform sample of the segmented rows (`--seed`). `--min-score`
and `--categories` keep the instances drawn, and make a sample choose among rows that have one.
Each image is read from its row's `path` (local or s3://); one that is gone or changed is named on
stderr and skipped.
"""

from __future__ import annotations

import argparse
import sys

from jobs.cli import OneLineParser, run_job
from jobs.report import add_choice_flags
from pipeline.results import publish
from pipeline.results.job_record import read_provenance
from pipeline.results.reading import list_parts
from pipeline.results.render import OverlayNames, draw_rows, encoded, pixel_limit
from pipeline.results.selection import (
    InstanceFilter,
    parse_categories,
    read_paths_file,
    rows_named,
    sample_rows,
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m jobs.render", description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", required=True, help="output folder of jobs.segment (local or s3://)")
    parser.add_argument("--output", required=True, help="folder for the PNGs (local or s3://)")
    parser.add_argument(
        "--paths", default=None, metavar="FILE", help="draw the rows of these URIs, one a line"
    )
    add_choice_flags(parser, sample_default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.paths is None) == (args.sample is None):
        parser.error("give one of --paths FILE or --sample N")
    return run_job("render", lambda: render(args))


def render(args: argparse.Namespace) -> int:
    """Choose the rows, draw each, write its PNG."""
    instance_filter = InstanceFilter(args.min_score, parse_categories(args.categories))
    parts = list_parts(args.predictions)
    publish.check_writable(args.output)
    if args.paths is not None:
        refs = rows_named(parts, read_paths_file(args.paths), args.paths)
    else:
        sample = sample_rows(parts, args.sample, args.seed, instance_filter)
        refs = sample.refs()
        if not sample.eligible:
            print("render: warning: no segmented row has an instance the filters keep; nothing to draw")
    names = OverlayNames("png")
    written = skipped = 0
    for row, drawing, why in draw_rows(
        parts, refs, instance_filter, pixel_limit(read_provenance(args.predictions))
    ):
        if drawing is None:
            print(f"render: skipped {why}", file=sys.stderr)
            skipped += 1
            continue
        publish.write_file(args.output, names(row["path"]), encoded(drawing, "png"))
        written += 1
    print(f"render: {written} overlays in {args.output}" + (f" ({skipped} skipped)" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
