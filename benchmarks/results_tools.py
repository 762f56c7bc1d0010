"""Time and peak memory of `jobs.report` and `jobs.export` on large outputs, side by side.

    .venv/bin/python benchmarks/results_tools.py [--rows 10000 100000] [--instances 5]

For each size, writes a segmentation output as `jobs.segment` leaves it (part files of 256 rows by
`pipeline.segment.output.commit_part`, the job record of a random `tiny` model, `--instances`
instances per row with RLE masks, 1 % error rows) over that many 64x48 PNG images, then runs, each
in a process of its own as a user would: `jobs.report` (statistics of every row, a gallery of 24),
`jobs.export --format coco` in the stored orientation (every image's EXIF header read) and with
`--orientation apply` (no image read). It prints seconds, rows per second and the process's peak
RSS (GNU time's `%M`) per tool and size, and the ratio of each tool's peak at the largest size
to that at the smallest: close to 1 when memory does not grow with the output.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
from PIL import Image

from mrcnn.categories import Category
from mrcnn.model import build_model
from mrcnn.model_folder import save_model_folder, spec_for
from mrcnn.rle import encode_mask
from pipeline.segment import output, provenance

WIDTH, HEIGHT = 64, 48
ROWS_PER_PART = 256
CATEGORIES = (Category(1, "circle"), Category(2, "square"), Category(3, "triangle"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--instances", type=int, default=5, help="instances per segmented row")
    return parser


def make_model(folder: str) -> str:
    model = build_model("tiny", len(CATEGORIES) + 1)
    uri = os.path.join(folder, "model")
    save_model_folder(model, spec_for(model, CATEGORIES), uri)
    return uri


def make_output(folder: str, rows: int, instances: int, model_uri: str) -> str:
    """`rows` images under FOLDER/images and their output under FOLDER/predictions."""
    images, predictions = os.path.join(folder, "images"), os.path.join(folder, "predictions")
    os.makedirs(images)
    rng = np.random.default_rng(0)
    masks, boxes = [], []
    for _ in range(32):  # a pool of masks the rows draw from
        x0, y0 = int(rng.integers(0, WIDTH - 20)), int(rng.integers(0, HEIGHT - 16))
        mask = np.zeros((HEIGHT, WIDTH), np.uint8)
        mask[y0 : y0 + 16, x0 : x0 + 20] = 1
        masks.append(encode_mask(mask).decode("ascii"))
        boxes.append([float(x0), float(y0), float(x0 + 20), float(y0 + 16)])
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(png, "PNG")
    record = provenance.job_record(model_uri, score_threshold=0.3, max_pixels=1 << 24)
    provenance.record_output(predictions, record)
    batch = []
    for index in range(rows):
        path = os.path.join(images, f"{index:08d}.png")
        with open(path, "wb") as file:
            file.write(png.getvalue())
        batch.append(_row(path, index, instances, masks, boxes, rng, model_uri))
        if len(batch) == ROWS_PER_PART or index == rows - 1:
            output.commit_part(pa.Table.from_pylist(batch, schema=output.SCHEMA), predictions)
            batch = []
    output.write_success(predictions, {"images": rows, "job": record})
    return predictions


def _row(path, index, instances, masks, boxes, rng, model_uri) -> dict:
    if index % 100 == 99:
        return {"path": path, "width": None, "height": None, "category_ids": [], "categories": [],
                "scores": [], "boxes": [], "masks": [], "error": "cannot read: not found",
                "model": model_uri}  # fmt: skip
    picks = rng.integers(0, len(masks), instances)
    labels = [CATEGORIES[(index + k) % len(CATEGORIES)] for k in range(instances)]
    return {
        "path": path, "width": WIDTH, "height": HEIGHT,
        "category_ids": [c.id for c in labels], "categories": [c.name for c in labels],
        "scores": rng.uniform(0.3, 1.0, instances).round(3).tolist(),
        "boxes": [boxes[p] for p in picks], "masks": [masks[p] for p in picks],
        "error": None, "model": model_uri,
    }  # fmt: skip


def timed(argv: list[str]) -> tuple[float, float]:
    """Run `python -m argv` to its end; returns (seconds, peak RSS in MiB).

    The peak is GNU time's (`%M`, from `wait4`): started from this process, which holds torch, the
    child's figure would start at this process's RSS (Linux carries the forked copy's high-water
    mark across `exec`)."""
    with tempfile.NamedTemporaryFile("r") as peak, tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        command = ["/usr/bin/time", "-f", "%M", "-o", peak.name, sys.executable, "-m", *argv]
        code = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=errors).returncode
        seconds = time.perf_counter() - start
        if code != 0:
            errors.seek(0)
            raise SystemExit(f"{' '.join(argv)} failed: {errors.read().decode()[-2000:]}")
        return seconds, int(peak.read().split()[-1]) / 1024


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    peaks: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        model_uri = make_model(scratch)
        print(f"{'rows':>8} {'tool':<28} {'seconds':>8} {'rows/s':>8} {'peak MiB':>9}")
        for rows in args.rows:
            folder = os.path.join(scratch, str(rows))
            predictions = make_output(folder, rows, args.instances, model_uri)
            tools = {
                "jobs.report": ["jobs.report", "--predictions", predictions, "--output", f"{folder}/report"],
                "jobs.export coco (stored)": ["jobs.export", "--predictions", predictions, "--format", "coco",
                                              "--output", f"{folder}/stored.json"],
                "jobs.export coco (apply)": ["jobs.export", "--predictions", predictions, "--format", "coco",
                                             "--orientation", "apply", "--output", f"{folder}/apply.json"],
            }  # fmt: skip
            for name, command in tools.items():
                seconds, peak = timed(command)
                peaks.setdefault(name, []).append(peak)
                print(f"{rows:>8} {name:<28} {seconds:>8.1f} {rows / seconds:>8.0f} {peak:>9.0f}", flush=True)
    for name, values in peaks.items():
        print(f"peak at {args.rows[-1]} / at {args.rows[0]} rows, {name}: {values[-1] / values[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
