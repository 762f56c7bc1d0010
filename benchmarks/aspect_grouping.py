"""Orientation grouping of inference batches: the segmenter's images/s with grouping on and off.

    PYTHONPATH=. python benchmarks/aspect_grouping.py --device cuda [--preset r50-fpn-v2]
        [--batch-size 8] [--images 64] [--rounds 5] [--short-side 800]

Landscape and portrait photos (`benchmarks/photos.py`, half of each, in random order) at `--short-side`
px go through what a bulk segmentation job's decode task and inference actor do with them:
`pipeline.segment.decode.shrink_to_model_size`, then `pipeline.segment.inference.Segmenter` (its forward, bf16
autocast on CUDA, and the copy of the detections to host memory) on batches of `--batch-size`,
once with `group_by_orientation` on (one forward per orientation when that saves a quarter of the
padded pixels, `mrcnn.batching`) and once off (one forward per batch). The model is `--preset`
with random weights (no download), keeping detections that score >= 0.05 (torchvision's
default). The two settings alternate, in swapped order
every other batch, after one warm-up batch each; rates are over all rounds.

Needs no Ray and no boto3 (it runs on a bare GPU machine): torch, torchvision, numpy, Pillow,
pyarrow, pycocotools and scikit-image. Prints the padding waste of both settings (padded pixels
that are not image, over all batches) and, last, the ratio of images/s grouped to ungrouped.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

from benchmarks.photos import photos
from jobs.cli import OneLineParser, bounded
from mrcnn.batching import input_size, orientation_groups, padding_waste
from mrcnn.model import build_model
from mrcnn.model_folder import save_model_folder, spec_for
from mrcnn.presets import PRESETS, get_preset
from mrcnn.shapes import CATEGORIES
from pipeline.segment.decode import shrink_to_model_size
from pipeline.segment.inference import Segmenter

SCORE_THRESHOLD = 0.05


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="aspect_grouping.py", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--preset", choices=tuple(PRESETS), default=None, help="default: r50-fpn-v2 on cuda, small on cpu"
    )
    parser.add_argument("--batch-size", type=bounded(int, 2), default=8)
    parser.add_argument("--images", type=bounded(int, 2), default=64)
    parser.add_argument("--rounds", type=bounded(int, 1), default=3)
    parser.add_argument(
        "--short-side", type=bounded(int, 32), default=800, help="photos' shorter side before decode"
    )
    return parser


def batches(images: list[np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
    """Decoded batches as `pipeline.segment.decode.decode_batch` makes them (no error rows)."""
    result = []
    for first in range(0, len(images), batch_size):
        part = images[first : first + batch_size]
        result.append(
            {
                "path": np.array([f"{first + i}.jpg" for i in range(len(part))], dtype=object),
                "width": np.array([image.shape[1] for image in part], np.int32),
                "height": np.array([image.shape[0] for image in part], np.int32),
                "error": np.array([""] * len(part), dtype=object),
                "image": part,
            }
        )
    return result


def waste(batch_list: list[dict[str, np.ndarray]], min_size: int, max_size: int, grouped: bool) -> float:
    """Padding waste over every forward of every batch, as the segmenter groups them."""
    groups = []
    for batch in batch_list:
        sizes = [input_size(*image.shape[:2], min_size, max_size) for image in batch["image"]]
        indices = orientation_groups(sizes) if grouped else [list(range(len(sizes)))]
        groups.extend([sizes[i] for i in group] for group in indices)
    return padding_waste(groups)


def seconds(segment: Segmenter, batch: dict[str, np.ndarray], grouped: bool) -> float:
    """Seconds the segmenter takes for one batch, detections copied to host memory."""
    segment.group_by_orientation = grouped
    start = time.perf_counter()
    segment(batch)
    if segment.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("aspect_grouping: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    preset = get_preset(args.preset or ("r50-fpn-v2" if args.device == "cuda" else "small"))
    cores = os.cpu_count() or 1
    images = [
        shrink_to_model_size(image, preset.min_size, preset.max_size)
        for image in photos(args.images, args.short_side)
    ]
    batch_list = batches(images, args.batch_size)

    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        model_dir = os.path.join(folder, "model")
        model = build_model(preset.name, len(CATEGORIES) + 1)
        save_model_folder(model, spec_for(model, CATEGORIES), model_dir)
        segment = Segmenter(model_dir, SCORE_THRESHOLD, num_threads=cores, use_gpu=args.device == "cuda")
    for grouped in (True, False):
        seconds(segment, batch_list[0], grouped)
    # Both settings run each batch back to back, in swapped order every other time: a load that
    # comes and goes on a shared machine then falls on both alike.
    total = {True: 0.0, False: 0.0}
    ratios = []
    for round_ in range(args.rounds):
        spent = {True: 0.0, False: 0.0}
        for index, batch in enumerate(batch_list):
            order = (True, False) if (round_ + index) % 2 == 0 else (False, True)
            times = {grouped: seconds(segment, batch, grouped) for grouped in order}
            ratios.append(times[False] / times[True])
            for grouped in order:
                spent[grouped] += times[grouped]
                total[grouped] += times[grouped]
        print(
            f"round {round_ + 1}: grouped {len(images) / spent[True]:.2f}, "
            f"one forward {len(images) / spent[False]:.2f} images/s",
            flush=True,
        )
    rate = {grouped: args.rounds * len(images) / total[grouped] for grouped in total}

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {cores} cores"
    portrait = sum(image.shape[0] > image.shape[1] for image in images)
    print(
        f"{device}; torch {torch.__version__}, Python {platform.python_version()}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"preset {preset.name} (min_size {preset.min_size}, max_size {preset.max_size}), "
        f"{len(images)} photos ({portrait} portrait) of {args.short_side} px short side, "
        f"batch {args.batch_size}, {args.rounds} rounds"
    )
    on = waste(batch_list, preset.min_size, preset.max_size, grouped=True)
    off = waste(batch_list, preset.min_size, preset.max_size, grouped=False)
    print(f"one forward per batch: {rate[False]:.2f} images/s, padding waste {100 * off:.1f} %")
    print(f"grouped by orientation: {rate[True]:.2f} images/s, padding waste {100 * on:.1f} %")
    print(
        f"ratio grouped/one forward: {rate[True] / rate[False]:.2f} images/s over all rounds "
        f"(median per batch {np.median(ratios):.2f}), padding waste {100 * off:.1f} % -> {100 * on:.1f} %"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
