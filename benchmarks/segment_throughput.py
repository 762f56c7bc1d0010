"""Bulk segmentation throughput: `jobs.segment` as a user types it, against a bare loop and Ray's docs.

    PYTHONPATH=. .venv/bin/python benchmarks/segment_throughput.py [--images shapes|photos]
        [--preset small] [--num-images 600] [--size 256] [--batch-size 8] [--score-threshold 0.05]
        [--rounds 2] [--amp auto|bf16|off] [--no-docs-pipeline]

The same images, the same random model of `--preset`, all on this machine's CPUs:
(a) the bare loop, one process, torch on every core: read and decode each image, shrink it to
    the model's input size, batched forward with `paste_masks = False`, `mrcnn.rle.masks_to_rle`
    per image; nothing else (no output). Timed from its first read, the model already loaded.
    Its forward runs in the precision the job's actors use (`--amp`, "auto" resolved for this
    CPU by `mrcnn.precision.inference_precision`: bf16 with AMX or AVX512-BF16, else float32).
(b) `python -m jobs.segment --input ... --output ... --model ... --batch-size B
    --score-threshold T` with no other flag (`--amp` only when given here other than auto): the
    whole command, timed as a subprocess (Python and Ray start-up, listing, actor start,
    inference, RLE and Parquet commits, the output check and `_SUCCESS.json`).
(c) `benchmarks/ray_docs_pipeline.py`, what Ray's batch-inference documentation leads a user to
    write (`read_images` -> `map_batches` with a callable class, default actor resources ->
    pycocotools RLE of the pasted masks -> `write_parquet`), also the whole command, in float32
    as those pages write it.
`--images shapes`: generated shapes PNGs of `--size` px (256 by default). `--images photos`: JPEGs
of the photos scikit-image ships (`benchmarks/photos.py`), landscape and portrait, shorter side `--size`
(800 by default, the R50 presets' `min_size`).

The job pays a fixed start-up the bare loop does not (Ray's, the actor's process with its torch
and torchvision imports and the model load). Each round therefore also runs the job on the first
quarter of the images: the difference of the two runs' seconds is the job's time for the other
three quarters, start-up cancelled, which gives its steady-state rate, what a job over millions of
images sees. The paths take turns for `--rounds` rounds and each keeps its best round, which damps
the noise of a shared machine. The last lines give the ratios, job/bare end to end (the whole
command) and at steady state, and job/docs pipeline, and the number of images from which the
job's whole command reaches 0.9 of the bare loop (`images_for_ratio`: the fixed start-up repaid
by the steady-state rate).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

from jobs.cli import OneLineParser, bounded
from mrcnn import storage
from mrcnn.images import decode_image
from mrcnn.model import build_model
from mrcnn.model_folder import load_model, save_model_folder, spec_for
from mrcnn.precision import autocast, inference_precision
from mrcnn.presets import PRESETS
from mrcnn.rle import masks_to_rle
from mrcnn.shapes import CATEGORIES, generate_shapes
from pipeline.segment.decode import shrink_to_model_size

DOCS_PIPELINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ray_docs_pipeline.py")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="segment_throughput.py", description=__doc__.splitlines()[0])
    parser.add_argument("--images", choices=("shapes", "photos"), default="shapes")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="small")
    parser.add_argument("--num-images", type=bounded(int, 8), default=600)
    parser.add_argument("--size", type=bounded(int, 32), default=None, help="default: 256 shapes, 800 photos")
    parser.add_argument("--batch-size", type=bounded(int, 1), default=8)
    parser.add_argument("--score-threshold", type=bounded(float, 0.0, 1.0), default=0.05)
    parser.add_argument("--rounds", type=bounded(int, 1), default=2)
    parser.add_argument(
        "--amp", choices=("auto", "bf16", "off"), default="auto",
        help="precision of the job's and the bare loop's forward (default auto, the job's default)",
    )  # fmt: skip
    parser.add_argument("--no-docs-pipeline", action="store_true", help="skip baseline (c)")
    return parser


def bare_loop(
    model_dir: str, paths: list[str], batch_size: int, score_threshold: float, precision: str
) -> float:
    """Images per second of decode -> shrink -> batched forward -> RLE in this process."""
    torch.set_num_threads(os.cpu_count() or 1)
    model, spec = load_model(model_dir)
    model.paste_masks = False
    model.score_threshold = score_threshold
    start = time.perf_counter()
    for first in range(0, len(paths), batch_size):
        decoded = [decode_image(storage.read_bytes(path)) for path in paths[first : first + batch_size]]
        images = [
            torch.from_numpy(shrink_to_model_size(pixels, spec.min_size, spec.max_size)).permute(2, 0, 1)
            .float() / 255
            for pixels in decoded
        ]  # fmt: skip
        with torch.inference_mode(), autocast(torch.device("cpu"), precision):
            predictions = model(images)
        for pixels, image, prediction in zip(decoded, images, predictions, strict=True):
            scale = torch.tensor([pixels.shape[1] / image.shape[2], pixels.shape[0] / image.shape[1]] * 2)
            masks_to_rle(prediction["mask_probs"], prediction["boxes"] * scale, *pixels.shape[:2])
    return len(paths) / (time.perf_counter() - start)


def whole_command(command: list[str], output: str) -> float:
    """Seconds `command` took, start to exit; its output folder must hold Parquet files then."""
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=3600)
    seconds = time.perf_counter() - start
    if not any(path.endswith(".parquet") for path in storage.iter_files(output)):
        raise RuntimeError(f"{command[:3]} wrote no Parquet file into {output}")
    return seconds


def job_command(model_dir: str, images: str, output: str, args: argparse.Namespace, limit: int) -> list[str]:
    """`jobs.segment` with the flags a user must give, and no tuning flag."""
    return [
        sys.executable, "-m", "jobs.segment", "--input", images, "--output", output,
        "--model", model_dir, "--batch-size", str(args.batch_size), "--limit", str(limit),
        "--score-threshold", str(args.score_threshold),
    ] + ([] if args.amp == "auto" else ["--amp", args.amp])  # fmt: skip


def images_for_ratio(ratio: float, bare: float, steady: float, start_up: float) -> float:
    """Images from which `images / (start_up + images / steady)` is at least `ratio * bare`.

    Infinite when the steady state itself is below `ratio * bare`.
    """
    gain = 1 / (ratio * bare) - 1 / steady
    return start_up / gain if gain > 0 else float("inf")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    size = args.size or (256 if args.images == "shapes" else 800)
    cores = os.cpu_count() or 1
    precision = inference_precision(torch.device("cpu"), args.amp)
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        model = build_model(args.preset, len(CATEGORIES) + 1)
        model_dir = os.path.join(folder, "model")
        save_model_folder(model, spec_for(model, CATEGORIES), model_dir)
        images = os.path.join(folder, "images")
        if args.images == "shapes":
            images = generate_shapes(images, args.num_images, seed=0, size=size).images_root
        else:
            from benchmarks.photos import write_photos

            write_photos(images, args.num_images, short_side=size)
        paths = sorted(storage.iter_files(images))
        quarter = max(1, len(paths) // 4)

        bare = job = steady = docs = 0.0
        start_up = float("inf")
        for round_ in range(args.rounds):
            bare = max(bare, bare_loop(model_dir, paths, args.batch_size, args.score_threshold, precision))
            out = os.path.join(folder, f"all-{round_}")
            whole = whole_command(job_command(model_dir, images, out, args, len(paths)), out)
            out = os.path.join(folder, f"part-{round_}")
            part = whole_command(job_command(model_dir, images, out, args, quarter), out)
            job = max(job, len(paths) / whole)
            rate = (len(paths) - quarter) / (whole - part)
            steady = max(steady, rate)
            start_up = min(start_up, part - quarter / rate)
            if not args.no_docs_pipeline:
                out = os.path.join(folder, f"docs-{round_}")
                command = [
                    sys.executable, DOCS_PIPELINE, images, out, model_dir,
                    "--batch-size", str(args.batch_size), "--score-threshold", str(args.score_threshold),
                ]  # fmt: skip
                docs = max(docs, len(paths) / whole_command(command, out))
            print(
                f"round {round_ + 1}: best bare {bare:.2f}, job {job:.2f} end to end, "
                f"{steady:.2f} steady state, docs pipeline {docs:.2f} images/s",
                flush=True,
            )
        print(
            f"{len(paths)} {args.images} of {size} px, preset {args.preset}, batch {args.batch_size}, "
            f"{cores} cores, job and bare loop in {precision} (--amp {args.amp}), "
            f"load average {os.getloadavg()[0]:.2f} at the end"
        )
        print(f"(a) bare loop: {bare:.2f} images/s")
        print(f"(b) jobs.segment, default flags, the whole command: {job:.2f} images/s")
        print(f"    steady state: {steady:.2f} images/s (fixed start-up about {start_up:.1f} s)")
        if docs:
            print(f"(c) Ray docs pipeline, the whole command: {docs:.2f} images/s")
        ratios = f"ratio job/bare: {job / bare:.2f} end to end, {steady / bare:.2f} steady state"
        print(ratios + (f"; job/docs pipeline: {job / docs:.2f}" if docs else ""))
        needed = images_for_ratio(0.9, bare, steady, start_up)
        print(f"0.9 of the bare loop end to end from about {needed:.0f} images of this kind")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
