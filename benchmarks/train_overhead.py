"""Training step time: `jobs.train` with N Ray Train workers against N plain single-process loops.

    .venv/bin/python benchmarks/train_overhead.py [--images 96] [--epochs 2] [--preset small]
        [--batch-size 4] [--threads 1] [--rounds 1] [--amp] [--workers 1]

Both sides train the same preset on the same generated shapes (128 px) with the same batch size,
SGD settings (a learning rate so small that the model does not change, see `FROZEN_LR`), flips
and torch threads (and, with `--amp`, bfloat16 autocast). The plain loop is
what one would write without Ray: read, decode and build each target inline
(`mrcnn.images.decode_image`, `mrcnn.coco.build_target`), forward, backward, step. `jobs.train`
runs end to end in a subprocess with its own local Ray (`--num-workers 1 --cpus-per-worker
THREADS`): Ray Data decode tasks, RLE-carried masks, the collate in the prefetch thread, DDP
wrapping (a no-op for one worker), reports and checkpoints. The figure compared is the last
epoch's images/s of each side (the first epoch pays start-up on both: Ray Data's first blocks,
the allocator's first shapes); `jobs.train`'s comes from its `metrics.jsonl` and covers the
epoch's loop only, its checkpoint after the epoch excluded. With `--rounds N` the two sides take
turns N times and the best of each counts. The last line is the step-time ratio
`overhead: train / plain` in step time (goal <= 1.05).

With `--workers 2` the plain side runs twice: two such processes at once, each on its half of the
images, their images/s summed (what two cores can do with no synchronisation), then the same two
processes as a plain torch DDP job (gloo on 127.0.0.1: the gradient all-reduce every step).
`jobs.train` runs 2 DDP workers with its default CPU share (so that Ray Data keeps a slot to
decode in; `--threads 1` is then what each worker gets). The headline compares `jobs.train` with
plain DDP, which is what Ray Train, Ray Data and the collate add; `ddp_cost` is DDP's own.

Where the difference goes: during `jobs.train`'s last epoch every process on the machine is
sampled once a second (`/proc/<pid>/stat`: its CPU time and its process title, which Ray sets to
the actor or task it runs) and its CPU-seconds are summed by role: the training workers, Ray
Data's tasks (read, decode), Ray Data's coordinators (split coordinator, dataset manager, stats
actor), Ray Train's controller, the driver, Ray's own daemons (raylet, GCS, dashboard and its
agents), and the rest of the machine. On a machine whose cores are all busy, what the workers do
not get is what their steps wait for: the share of the CPU left to the workers bounds the step
time that the plain loops, which have the whole CPU, can be beaten by.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
from proc_cpu import machine_busy_seconds, processes

from mrcnn import build_model, storage
from mrcnn.coco import build_target, read_coco
from mrcnn.images import decode_image
from mrcnn.shapes import generate_shapes
from pipeline.train.metrics import read_history

# The model must not learn during the measurement: as it learns, more proposals match objects and
# the mask head's share of a step grows, so step times would depend on how far each side got
# rather than on the pipeline. At this rate a step costs the same in every epoch on both sides.
FROZEN_LR = 1e-9


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96, help="generated training images")
    parser.add_argument("--epochs", type=int, default=2, help="epochs; the last one is measured")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both sides")
    parser.add_argument("--rounds", type=int, default=1, help="turns of the two sides; best counts")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast on both sides")
    parser.add_argument("--workers", type=int, default=1, help="training processes of each side")
    return parser


def plain_loops(annotations: str, images: str, args: argparse.Namespace, ddp: bool) -> float:
    """Summed images/s of `args.workers` plain loops running at once, each on its share."""
    if args.workers == 1:
        return plain_loop(annotations, images, args, 0, None)
    address = f"tcp://127.0.0.1:{free_port()}" if ddp else None
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.workers) as pool:
        shares = [(annotations, images, args, rank, address) for rank in range(args.workers)]
        return sum(pool.starmap(plain_loop, shares))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def plain_loop(
    annotations: str, images: str, args: argparse.Namespace, rank: int, ddp_address: str | None
) -> float:
    """Images/s of the last epoch of a single-process training loop over its share of the images.

    With `ddp_address`, one rank of a plain torch DDP job (gloo) of `args.workers` processes.
    """
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dataset = read_coco(annotations, images)
    share = dataset.images[rank :: args.workers]
    model = build_model(args.preset, len(dataset.categories) + 1)
    model.train()
    if ddp_address:
        dist.init_process_group("gloo", init_method=ddp_address, rank=rank, world_size=args.workers)
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=FROZEN_LR, momentum=0.9, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    images_per_second = 0.0
    for _ in range(args.epochs):
        order = rng.permutation(len(share))
        started, seen = time.perf_counter(), 0
        for first in range(0, len(order), args.batch_size):
            batch, targets = [], []
            for index in order[first : first + args.batch_size]:
                record = share[index]
                pixels = decode_image(storage.read_bytes(record.uri))
                target = build_target(
                    record.annotations, record.height, record.width, dataset.category_to_label
                )
                image = torch.from_numpy(pixels.astype(np.float32) / 255).permute(2, 0, 1)
                boxes, masks = torch.from_numpy(target["boxes"]), torch.from_numpy(target["masks"])
                if rng.random() < 0.5:
                    x1, y1, x2, y2 = boxes.unbind(1)
                    image, masks = image.flip(-1), masks.flip(-1)
                    boxes = torch.stack([record.width - x2, y1, record.width - x1, y2], 1)
                batch.append(image)
                targets.append({"boxes": boxes, "labels": torch.from_numpy(target["labels"]), "masks": masks})
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp):
                losses = model(batch, targets)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            seen += len(batch)
        images_per_second = seen / (time.perf_counter() - started)
    if ddp_address:
        dist.destroy_process_group()
    return images_per_second


# Process titles (the 15 characters of `/proc/<pid>/stat`'s comm) by role, first match wins.
ROLES = (
    ("training workers", ("ray::RayTrainWo",)),
    ("Ray Train controller", ("ray::TrainContr",)),
    ("Ray Data coordinators", ("ray::SplitCoord", "ray::DatasetMan", "ray::_StatsActo", "ray::Autoscalin")),
    (
        "Ray daemons",
        ("raylet", "gcs_server", "ray::DashboardA", "ray::RuntimeEnv", "ray::_Relay", "ray-dashboard"),
    ),
    ("Ray Data tasks", ("ray::",)),
)


def role_of(comm: str, pid: int, driver: int) -> str:
    if pid == driver:
        return "driver"
    return next((role for role, prefixes in ROLES if comm.startswith(prefixes)), "rest of the machine")


def ray_train(
    annotations: str, images: str, output: str, args: argparse.Namespace
) -> tuple[float, dict[str, float], float]:
    """Images/s of the last epoch of `jobs.train` (from its metrics.jsonl), the CPU-seconds each
    role spent during that epoch and the epoch's wall seconds (see the module docstring)."""
    workers = ["--num-workers", str(args.workers)]
    if args.workers == 1:
        workers += ["--cpus-per-worker", str(args.threads)]
    command = [
        sys.executable,
        "-m",
        "jobs.train",
        "--train-annotations",
        annotations,
        "--train-images",
        images,
        "--output",
        output,
        "--preset",
        args.preset,
        *workers,
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        str(args.epochs),
        "--lr",
        str(FROZEN_LR),
        "--warmup-iters",
        "0",
        "--num-cpus",
        str(os.cpu_count()),
        *(["--amp"] if args.amp else []),
    ]
    metrics = storage.join(output, "metrics.jsonl")
    with tempfile.TemporaryFile("w+") as err:
        driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, text=True)
        start = end = None  # (time, machine busy seconds, per-process CPU) at the epoch's ends
        while driver.poll() is None:
            done = len(read_history(metrics)) if os.path.exists(metrics) else 0
            if start is None and done == args.epochs - 1:
                start = (time.perf_counter(), machine_busy_seconds(), processes())
            elif start is not None and done < args.epochs:
                end = (time.perf_counter(), machine_busy_seconds(), processes())
            time.sleep(1.0)
        if driver.returncode != 0:
            err.seek(0)
            raise SystemExit(f"jobs.train failed:\n{err.read()[-3000:]}")
    last = read_history(metrics)[-1]
    by_role: dict[str, float] = {}
    if start and end:
        for pid, process in end[2].items():
            before = start[2].get(pid)
            spent = process.seconds - (before.seconds if before else 0.0)
            role = role_of(process.name, pid, driver.pid)
            by_role[role] = by_role.get(role, 0.0) + spent
        by_role["machine busy"] = end[1] - start[1]
    return float(last["images_per_second"]), by_role, (end[0] - start[0]) if start and end else 0.0


def main() -> None:
    args = build_parser().parse_args()
    with tempfile.TemporaryDirectory() as root:
        data = generate_shapes(os.path.join(root, "shapes"), args.images, seed=0, size=128)
        best_plain, best_ddp, best_train, profile = 0.0, 0.0, 0.0, ({}, 0.0)
        for turn in range(args.rounds):
            shapes = (data.annotations_uri, data.images_root)
            plain = plain_loops(*shapes, args, ddp=False)
            ddp = plain_loops(*shapes, args, ddp=True) if args.workers > 1 else plain
            train, by_role, seconds = ray_train(*shapes, os.path.join(root, f"run{turn}"), args)
            print(
                f"round {turn + 1}: plain loop(s) {plain:.2f} images/s, plain DDP {ddp:.2f} images/s, "
                f"jobs.train {train:.2f} images/s"
            )
            best_plain, best_ddp = max(best_plain, plain), max(best_ddp, ddp)
            if train > best_train:
                best_train, profile = train, (by_role, seconds)
    steps = math.ceil(args.images / args.workers / args.batch_size)
    print(
        f"preset {args.preset}, {args.images} images of 128 px, batch {args.batch_size}, "
        f"{steps} steps/epoch, {args.workers} process(es) of {args.threads} torch thread(s), "
        f"last of {args.epochs} epochs, "
        f"best of {args.rounds} round(s), {'bf16 autocast' if args.amp else 'float32'}"
    )
    total_batch = args.workers * args.batch_size
    print(f"plain loop(s): {best_plain:.2f} images/s ({total_batch / best_plain:.3f} s/step)")
    if args.workers > 1:
        print(f"plain DDP: {best_ddp:.2f} images/s ({total_batch / best_ddp:.3f} s/step)")
        print(f"ddp_cost: {best_plain / best_ddp:.3f}")
    print(
        f"jobs.train, {args.workers} worker(s): {best_train:.2f} images/s "
        f"({total_batch / best_train:.3f} s/step)"
    )
    by_role, seconds = profile
    if seconds:
        cores = os.cpu_count() or 1
        print(
            f"jobs.train's last epoch, CPU by role ({seconds:.1f} s of {cores} cores, sampled each second):"
        )
        for role, spent in sorted(by_role.items(), key=lambda item: -item[1]):
            print(f"  {role:24s} {spent:7.1f} CPU-s  {spent / (seconds * cores):6.1%} of the machine")
        workers = by_role.get("training workers", 0.0)
        if workers:
            share = workers / (seconds * cores)
            print(f"cpu_left_to_workers: {share:.3f} (1 / that: {1 / share:.3f})")
    print(f"overhead: {best_ddp / best_train:.3f}")


if __name__ == "__main__":
    main()
