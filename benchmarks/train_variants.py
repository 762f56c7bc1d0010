"""Training step throughput of the demo's model under each candidate speed change, side by side.

    .venv/bin/python benchmarks/train_variants.py [--steps 20] [--rounds 2] [--threads 1]
        [--variants baseline,channels_last,bf16,compile,threads2,rois32,size96]

What would buy more AP per minute of `make demo`: the quickstart trains the `small` preset on
128 px shapes, batch 4 per worker, one torch thread per worker. Each variant changes one thing:
`channels_last` (the model's weights, hence the convolutions, in NHWC), `bf16` (bfloat16
autocast: AMX / AVX-512 BF16 on CPUs that have them), `compile` (`torch.compile` of the
backbone; its compile time is in its first steps' seconds), `threads2` (one process with 2 torch
threads: one Ray Train worker instead of two) against `procs2` (two baseline processes at once,
their images/s summed: two workers of one thread, before DDP's all-reduce, which
BENCHMARKS.md measures at 1.19x a step), `rois32` (32 sampled RoIs per image instead
of 64), `size96` (images resized to 96 px). A plain loop over batches decoded once beforehand, so
only the model's step is timed; a learning rate of 1e-9 keeps the step cost constant (see
`train_overhead.FROZEN_LR`). The variants take turns for `--rounds` rounds, the baseline first in
each; the table has the best images/s of each and the median over rounds of its ratio to the same
round's baseline, which a machine whose load changes between rounds (a shared one) distorts less.
The last line is the headline: the variant with the best median ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import multiprocessing
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from mrcnn import storage
from mrcnn.coco import build_target, read_coco
from mrcnn.images import decode_image
from mrcnn.model import MaskRCNN
from mrcnn.presets import SMALL
from mrcnn.shapes import generate_shapes

FROZEN_LR = 1e-9
WARMUP_STEPS = 3
VARIANTS = ("baseline", "channels_last", "bf16", "compile", "threads2", "procs2", "rois32", "size96")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="generated 128 px training images")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (threads2 doubles it)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    return parser


def load_batches(annotations: str, images: str, batch_size: int):
    """All images as (images float32[3, H, W] list, targets list) batches, decoded once."""
    dataset = read_coco(annotations, images)
    batches, batch, targets = [], [], []
    for record in dataset.images:
        pixels = decode_image(storage.read_bytes(record.uri))
        target = build_target(record.annotations, record.height, record.width, dataset.category_to_label)
        batch.append(torch.from_numpy(pixels.astype(np.float32) / 255).permute(2, 0, 1).contiguous())
        targets.append({key: torch.from_numpy(target[key]) for key in ("boxes", "labels", "masks")})
        if len(batch) == batch_size:
            batches.append((batch, targets))
            batch, targets = [], []
    return batches, len(dataset.categories) + 1


def build(variant: str, num_classes: int) -> MaskRCNN:
    preset = SMALL
    if variant == "rois32":
        preset = dataclasses.replace(SMALL, box_batch_size_per_image=32)
    elif variant == "size96":
        preset = dataclasses.replace(SMALL, min_size=96, max_size=96)
    torch.manual_seed(0)
    model = MaskRCNN(preset, num_classes)
    if variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    model.train()
    return model


def run(variant: str, batches, num_classes: int, args: argparse.Namespace) -> tuple[float, float]:
    """(images/s over `args.steps` steps after a warm-up, seconds of the warm-up steps)."""
    torch.set_num_threads(args.threads * (2 if variant == "threads2" else 1))
    model = build(variant, num_classes)
    if variant == "compile":
        model.backbone = torch.compile(model.backbone)
    optimizer = torch.optim.SGD(model.parameters(), lr=FROZEN_LR, momentum=0.9)
    warmup_started = time.perf_counter()
    timed_from, seen = None, 0
    for index in range(WARMUP_STEPS + args.steps):
        if index == WARMUP_STEPS:
            timed_from = time.perf_counter()
        images, targets = batches[index % len(batches)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16"):
            losses = model(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        seen += len(images) if index >= WARMUP_STEPS else 0
    return seen / (time.perf_counter() - timed_from), timed_from - warmup_started


def run_two_processes(batches, num_classes: int, args: argparse.Namespace) -> tuple[float, float]:
    """Two baseline runs at once in spawned processes: summed images/s, the slower warm-up."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        results = pool.starmap(run, [("baseline", batches[rank::2], num_classes, args) for rank in (0, 1)])
    return sum(r[0] for r in results), max(r[1] for r in results)


def main() -> None:
    args = build_parser().parse_args()
    variants = args.variants.split(",")
    with tempfile.TemporaryDirectory() as root:
        data = generate_shapes(os.path.join(root, "shapes"), args.images, seed=0, size=128)
        batches, num_classes = load_batches(data.annotations_uri, data.images_root, args.batch_size)
    best = dict.fromkeys(variants, 0.0)
    warmup = dict.fromkeys(variants, 0.0)
    ratios: dict[str, list[float]] = {variant: [] for variant in variants}
    for turn in range(args.rounds):
        baseline = None
        for variant in variants:
            measure = run_two_processes if variant == "procs2" else functools.partial(run, variant)
            images_per_second, warm = measure(batches, num_classes, args)
            best[variant] = max(best[variant], images_per_second)
            warmup[variant] = warm
            baseline = images_per_second if variant == "baseline" else baseline
            if baseline:
                ratios[variant].append(images_per_second / baseline)
            print(f"round {turn + 1}: {variant} {images_per_second:.2f} images/s "
                  f"(first {WARMUP_STEPS} steps {warm:.1f} s)", flush=True)  # fmt: skip
    print(
        f"small preset, batch {args.batch_size}, {args.threads} torch thread(s), {args.steps} steps "
        f"after {WARMUP_STEPS}, {args.rounds} round(s)"
    )
    median = {variant: statistics.median(ratios[variant] or [0.0]) for variant in variants}
    print("| variant | best images/s | median ratio to the round's baseline | first steps s |")
    print("|---|---:|---:|---:|")
    for variant in variants:
        print(f"| {variant} | {best[variant]:.2f} | {median[variant]:.2f}x | {warmup[variant]:.1f} |")
    fastest = max(variants, key=lambda name: median[name])
    print(f"fastest: {fastest} {median[fastest]:.2f}x")


if __name__ == "__main__":
    main()
