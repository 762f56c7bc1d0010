"""Write a static HTML report of a segmentation output, to open in a browser or serve from a bucket.

    python -m jobs.report --predictions s3://bucket/masks --output s3://bucket/masks-report \\
        --sample 48 --min-score 0.7 --categories person,dog

The page (`OUTPUT/index.html`, with its figures and gallery beside it, linked by relative paths)
shows what made the rows (model, threshold, when), the counts of rows, error rows and instances,
the errors grouped by reason with example paths, instances per category, the score distribution
per category, instance sizes, instances per image, and a gallery of sampled images with their
masks, boxes, categories and scores drawn (thumbnails linking to full-size overlays). The
statistics stream the output's columns a part file at a time, so memory stays bounded whatever
its size; `--sample`, `--seed`, `--min-score` and `--categories` shape the gallery only (a sample
of the rows with an instance that passes, drawn with those instances).

For `s3://` each file goes up with its content type: make the prefix readable (a bucket policy or
a website endpoint) and open `index.html`.
"""

from __future__ import annotations

import argparse
import sys
import time

from jobs.cli import OneLineParser, bounded, run_job
from pipeline.results.report import DEFAULT_SAMPLE, write_report
from pipeline.results.selection import parse_categories


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m jobs.report", description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", required=True, help="output folder of jobs.segment (local or s3://)")
    parser.add_argument(
        "--output", required=True, help="folder for index.html and its files (local or s3://)"
    )
    add_choice_flags(parser, sample_default=DEFAULT_SAMPLE)
    return parser


def add_choice_flags(parser: argparse.ArgumentParser, sample_default: int | None) -> None:
    """`--sample`, `--seed`, `--min-score`, `--categories`: which rows and instances are drawn."""
    parser.add_argument(
        "--sample", type=bounded(int, 0), default=sample_default,
        help="draw a uniform sample of this many segmented rows"
        + (f" (default {sample_default})" if sample_default is not None else ""),
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    parser.add_argument(
        "--min-score", type=bounded(float, 0.0, 1.0), default=None,
        help="draw only instances scoring at least this; sample only rows that have one",
    )  # fmt: skip
    parser.add_argument(
        "--categories", default=None, metavar="A,B",
        help="draw only instances of these categories (comma-separated); sample only rows that have one",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_job("report", lambda: report(args))


def report(args: argparse.Namespace) -> int:
    """Write the report and say where it is."""
    started = time.monotonic()
    written = write_report(
        args.predictions,
        args.output,
        sample=args.sample,
        seed=args.seed,
        min_score=args.min_score,
        categories=parse_categories(args.categories),
    )
    statistics, gallery = written.statistics, written.gallery
    for line in gallery.failed:
        print(f"report: not in the gallery: {line}", file=sys.stderr)
    if not gallery.eligible and args.sample:
        print("report: warning: no row has an instance the gallery's filters keep; the gallery is empty")
    print(
        f"report: {statistics.rows:,} rows ({statistics.errors:,} error rows, {statistics.instances:,} "
        f"instances), {len(gallery.tiles)} images in the gallery, in {time.monotonic() - started:.1f} s"
    )
    print(f"report: open {written.index_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
