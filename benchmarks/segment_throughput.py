"""Bulk segmentation throughput: `jobs.segment` end to end against the bare model loop.

    .venv/bin/python benchmarks/segment_throughput.py [--preset small] [--num-images 600] [--size 256]
        [--batch-size 8] [--score-threshold 0.05] [--rounds 2]

Both paths segment the same generated shapes images (`--size` px PNGs) with the same random model
of `--preset`, all on this machine's CPUs:
(a) the bare loop, one process, torch on every core: read and decode each image, batched forward
    with `paste_masks = False`, `mrcnn.rle.masks_to_rle` per image; nothing else (no output);
(b) `python -m jobs.segment` as a user runs it, on a local Ray started by the job: listing,
    decode tasks, one inference actor given every core but one (and as many torch threads), RLE
    and Parquet commits on tasks, the output check and `_SUCCESS.json`. Its time is the job's
    own (`_SUCCESS.json` seconds: from the listing to the summary, actor start-up included, Ray
    start-up not).
Ray's CPUs are logical: the local Ray gets one CPU more than the machine has, so that the actor can
use every core while the short decode and RLE tasks share them. The two paths take turns for
`--rounds` rounds and each keeps its best round, which damps the noise of a shared machine.

The job pays a fixed start-up the bare loop does not (the actor's process, its torch and
torchvision imports and the model load, about 7 s on 2 cores, while the first decode workers
start beside it). Each round therefore also runs the job on the first quarter of the images: the
difference of the two runs' seconds is the job's time for the other three quarters, start-up
cancelled, which gives its steady-state rate, what a job over millions of images sees. Both ratios
are printed; the last line is the end-to-end ratio b/a at `--num-images`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from mrcnn import storage
from mrcnn.images import decode_image
from mrcnn.model import build_model
from mrcnn.model_folder import load_model, save_model_folder, spec_for
from mrcnn.rle import masks_to_rle
from mrcnn.shapes import CATEGORIES, generate_shapes


def bare_loop(model_dir: str, paths: list[str], batch_size: int, score_threshold: float) -> float:
    """Images per second of decode -> batched forward -> RLE in this process."""
    torch.set_num_threads(os.cpu_count() or 1)
    model, _ = load_model(model_dir)
    model.paste_masks = False
    model.score_threshold = score_threshold
    start = time.perf_counter()
    for first in range(0, len(paths), batch_size):
        images = [
            torch.from_numpy(decode_image(storage.read_bytes(path))).permute(2, 0, 1).float() / 255
            for path in paths[first : first + batch_size]
        ]
        with torch.inference_mode():
            predictions = model(images)
        for image, prediction in zip(images, predictions, strict=True):
            masks_to_rle(prediction["mask_probs"], prediction["boxes"], image.shape[1], image.shape[2])
    return len(paths) / (time.perf_counter() - start)


def segment_job(
    model_dir: str, images: str, output: str, batch_size: int, score_threshold: float, limit: int
) -> float:
    """Seconds `jobs.segment` took for the first `limit` images, as `_SUCCESS.json` reports them."""
    cores = os.cpu_count() or 1
    command = [
        sys.executable, "-m", "jobs.segment", "--input", images, "--output", output,
        "--model", model_dir, "--batch-size", str(batch_size), "--limit", str(limit),
        "--score-threshold", str(score_threshold),
        "--cpus-per-actor", str(cores), "--num-cpus", str(cores + 1),
    ]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(storage.read_bytes(storage.join(output, "_SUCCESS.json")))["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--num-images", type=int, default=600)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--score-threshold", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        model = build_model(args.preset, len(CATEGORIES) + 1)
        model_dir = os.path.join(folder, "model")
        save_model_folder(model, spec_for(model, CATEGORIES), model_dir)
        shapes = generate_shapes(os.path.join(folder, "shapes"), args.num_images, seed=0, size=args.size)
        paths = sorted(storage.iter_files(shapes.images_root))

        quarter = max(1, args.num_images // 4)
        bare = job = steady = 0.0
        start_up = float("inf")
        run = functools.partial(
            segment_job, model_dir, shapes.images_root, batch_size=args.batch_size,
            score_threshold=args.score_threshold,
        )  # fmt: skip
        for round_ in range(args.rounds):
            bare = max(bare, bare_loop(model_dir, paths, args.batch_size, args.score_threshold))
            whole = run(os.path.join(folder, f"all-{round_}"), limit=len(paths))
            part = run(os.path.join(folder, f"part-{round_}"), limit=quarter)
            job = max(job, len(paths) / whole)
            rate = (len(paths) - quarter) / (whole - part)
            steady = max(steady, rate)
            start_up = min(start_up, part - quarter / rate)
            print(
                f"round {round_ + 1}: best bare {bare:.2f}, job {job:.2f} end to end, "
                f"{steady:.2f} steady state images/s",
                flush=True,
            )
        print(
            f"{args.num_images} images of {args.size} px, preset {args.preset}, batch {args.batch_size}, "
            f"{os.cpu_count()} cores"
        )
        print(f"bare loop: {bare:.2f} images/s")
        print(f"jobs.segment, end to end: {job:.2f} images/s")
        print(f"jobs.segment, steady state: {steady:.2f} images/s (fixed start-up about {start_up:.1f} s)")
        print(f"steady-state ratio: {steady / bare:.2f}")
        print(f"ratio: {job / bare:.2f}")


if __name__ == "__main__":
    main()
