"""Write a synthetic COCO dataset of coloured shapes (circle, square, triangle, star).

    python -m jobs.make_shapes s3://bucket/shapes/train --num-images 1000 --seed 0 --size 128

writes OUT/annotations.json and OUT/images/*.png, locally or on S3, the same bytes for the same
seed. Train on it with `--annotations OUT/annotations.json --images-root OUT/images`.
"""

from __future__ import annotations

import argparse
import time

from jobs.cli import OneLineParser, bounded, run_job
from mrcnn.errors import UserError
from mrcnn.shapes import MIN_SIZE, generate_shapes
from mrcnn.storage import StorageError


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m jobs.make_shapes", description=__doc__.splitlines()[0])
    parser.add_argument("out", metavar="OUT", help="output folder: a local path or s3://bucket/prefix")
    parser.add_argument("--num-images", type=bounded(int, 1), required=True, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--size", type=bounded(int, MIN_SIZE), default=128, help="image side in pixels (default 128)"
    )
    return parser


class OutputUnwritable(UserError):
    """`OUT` cannot be written: the command names a place to fix."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_job("make_shapes", lambda: make_shapes(args))


def make_shapes(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:
        result = generate_shapes(args.out, args.num_images, seed=args.seed, size=args.size)
    except StorageError as error:
        raise OutputUnwritable(str(error)) from error
    print(
        f"wrote {result.num_images} images and {result.num_annotations} annotations "
        f"to {args.out} in {time.perf_counter() - started:.1f} s "
        f"(annotations: {result.annotations_uri})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
