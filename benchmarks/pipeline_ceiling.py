"""The pipeline's own ceiling (issue 25, point 1): what everything but the forward (listing, read,
decode, RLE post-process, commit, output check) costs per image, and so how many images/s one
node of N cores can feed at most.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/pipeline_ceiling.py [--images 1000 3000] \\
        [--forward-batches 200] [--workdir /tmp/pipeline-ceiling]

In one run:
(a) The forward alone, in this process: the tiny model's `Segmenter` (one torch thread, as Ray
    runs a one-CPU actor) on decoded batches of the job's default `--batch-size` (4) 32x32
    images; CPU seconds (`time.process_time`) per image of `model(images)`, and of the actor's
    whole `__call__` (tensors, forward, detections to numpy).
(b) The job, `jobs.segment.main` with default flags (its own local Ray; run as (c) says) over
    each `--images` count of 32x32 PNGs with the `tiny` preset at 32 px, random weights
    (`benchmarks/scale.py`'s `tiny_model`, `tiny_images`): seconds in all, and the machine's
    busy CPU-seconds over the run (user + nice + system + irq + softirq + steal of /proc/stat;
    the machine is shared, so other work would count: the load average is printed at both
    ends, and beside it the CPU of the job's own processes, the driver's session, sampled from
    /proc/PID/stat every 0.2 s: a process's last 0.2 s before it ends is missed), split into
    the driver, Ray's workers, raylet, GCS and the rest.
    The difference of the two runs is the steady part, without the start-up: images/s
    (N2 - N1) / (t2 - t1), CPU-seconds per image (c2 - c1) / (N2 - N1), images/s per core its
    inverse; less the forward of (a), the pipeline's own CPU-seconds per image, and N cores feed
    at most N / that many images/s, until the driver, one process, is the limit: 1 / its
    CPU-seconds per image.
(c) Per stage, from Ray Data's own stats of the same runs. The job's session log does not have
    them: Ray 2.60 logs `DatasetStats` only with `DataContext.enable_auto_log_stats` (off by
    default), and then only the last operator's. So each run is the job's own entry point,
    `jobs.segment.main` with default flags, in a process of its own (`--child`), with
    `pipeline.segment.job.build_dataset` wrapped to keep the dataset it builds; after the run,
    its public `Dataset.stats()` gives each operator's remote CPU and wall seconds. Per image:
    each operator's total over the run's image count (the driver keeps the stats of the last
    1,000-2,000 blocks per operator, `pipeline.cluster.ray_compat.BoundedBlockStats`: all of
    them up to 8,000 images at the default 4 per block, hence `--images`' bound), and the steady
    figure from the difference of the two runs, as in (b): the first task of each kind in a
    fresh worker pays its imports. The listing's own read task is operator 1; the driver's
    done-set read and output check are outside these stats, in (b)'s rest.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import scale
from proc_cpu import machine_busy_seconds, processes

from jobs.cli import OneLineParser, bounded

REPO = Path(__file__).resolve().parent.parent
NODE_CORES = (2, 8, 16, 48)
OPERATOR = re.compile(r"Operator (\d+) (\S+?): ")
TIME_TOTAL = re.compile(r"\* Remote (wall|cpu) time: .* mean, ([\d.]+)(us|ms|s) total")
UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="pipeline_ceiling.py", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--images",
        type=bounded(int, 64, 8000),
        nargs=2,
        default=[1000, 3000],
        help="the two runs' image counts",
    )
    parser.add_argument("--forward-batches", type=bounded(int, 10), default=200, help="batches of (a)")
    parser.add_argument("--workdir", default="/tmp/pipeline-ceiling")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def load_average() -> str:
    with open("/proc/loadavg") as file:
        return " ".join(file.read().split()[:3])


def forward_cost(model_uri: str, images: str, batches: int) -> dict:
    """(a): CPU-seconds per image of the forward and of the actor's whole call, one torch thread."""
    import numpy as np
    import torch

    from mrcnn.model_spec import load_spec
    from pipeline.segment.decode import decode_batch
    from pipeline.segment.inference import Segmenter

    spec = load_spec(model_uri)
    paths = sorted(str(path) for path in Path(images).rglob("*.png"))[:4]
    batch = decode_batch(
        {"path": np.array(paths, dtype=object)},
        max_pixels=100_000_000,
        min_size=spec.min_size,
        max_size=spec.max_size,
    )
    segmenter = Segmenter(model_uri, score_threshold=0.5, num_threads=1, use_gpu=False, spec=spec)
    tensors = [torch.tensor(image).permute(2, 0, 1).float().div_(255) for image in batch["image"]]
    with torch.inference_mode():
        for _ in range(5):
            segmenter.model(tensors)
        started = time.process_time()
        for _ in range(batches):
            segmenter.model(tensors)
        forward = (time.process_time() - started) / (batches * len(tensors))
    started = time.process_time()
    for _ in range(batches):
        segmenter(dict(batch))
    call = (time.process_time() - started) / (batches * len(tensors))
    return {"forward": forward, "call": call, "threads": torch.get_num_threads()}


def operator_stats(text: str) -> dict[str, dict]:
    """(c): remote wall and CPU seconds of each operator in a `Dataset.stats()` text."""
    stats: dict[str, dict] = {}
    name = None
    for line in text.splitlines():
        if match := OPERATOR.match(line):
            name = match.group(2)
            stats[name] = {"wall": 0.0, "cpu": 0.0}
        elif name and (match := TIME_TOTAL.match(line)):
            stats[name][match.group(1)] = float(match.group(2)) * UNIT[match.group(3)]
    return stats


def child(stats_path: str, job_args: list[str]) -> int:
    """`jobs.segment.main(job_args)`, then the `Dataset.stats()` of the dataset it ran."""
    from jobs import segment
    from pipeline.segment import job

    built = []
    build = job.build_dataset

    def keep(*args, **kwargs):
        built.append(build(*args, **kwargs))
        return built[-1]

    job.build_dataset = keep
    code = segment.main(job_args)
    Path(stats_path).write_text(built[-1].stats())
    return code


def run_job(images: str, out: str, model: str) -> dict:
    """`jobs.segment`'s `main` with default flags in a process (and a local Ray) of its own
    (`child`): seconds to its first commit and in all, and its dataset's stats."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    stats_path = out + ".stats.txt"
    job_args = ["--input", images, "--output", out, "--model", model]
    command = [sys.executable, os.path.abspath(__file__), "--child", stats_path, *job_args]
    started = time.perf_counter()
    driver = subprocess.Popen(
        command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    first, seen = None, {}
    while driver.poll() is None:
        if first is None and os.path.isdir(out) and scale.new_parts(out, set()):
            first = time.perf_counter() - started
        seen.update(session_cpu(driver.pid))
        time.sleep(0.2)
    if driver.returncode != 0:
        raise SystemExit(f"jobs.segment failed:\n{driver.stderr.read().decode()[-3000:]}")
    seconds = time.perf_counter() - started
    return {
        "first_commit_s": first,
        "seconds": seconds,
        "stages": operator_stats(Path(stats_path).read_text()),
        "processes": by_kind(seen, driver.pid),
    }


def session_cpu(session: int) -> dict[int, tuple[str, float]]:
    """User + system CPU-seconds so far of each live process of `session` (the job's driver and
    the Ray it started), with its name."""
    return {pid: (p.name, p.seconds) for pid, p in processes().items() if p.session == session}


def by_kind(seen: dict[int, tuple[str, float]], driver: int) -> dict[str, float]:
    """CPU-seconds of the driver, Ray's workers (`ray::` names), raylet, GCS and the rest."""
    kinds = {"driver": 0.0, "workers": 0.0, "raylet": 0.0, "gcs_server": 0.0, "other Ray": 0.0}
    for pid, (name, seconds) in seen.items():
        if pid == driver:
            kind = "driver"
        elif name.startswith("ray::"):
            kind = "workers"
        else:
            kind = name if name in kinds else "other Ray"
        kinds[kind] += seconds
    return kinds


def timed_run(workdir: str, model: str, count: int) -> dict:
    """(b) and (c) for one run of `jobs.segment` over `count` images."""
    images = scale.tiny_images(workdir, count)
    out = os.path.join(workdir, f"out-{count}")
    shutil.rmtree(out, ignore_errors=True)
    busy = machine_busy_seconds()
    result = run_job(images, out, model)
    result["cpu"] = machine_busy_seconds() - busy
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        return child(args.child[0], args.child[1:])
    small, large = sorted(args.images)
    if small == large:
        raise SystemExit("pipeline_ceiling.py: error: --images needs two different counts")
    os.makedirs(args.workdir, exist_ok=True)
    print(f"machine: {os.cpu_count()} cores, load average {load_average()} at the start", flush=True)
    model = scale.tiny_model(args.workdir)
    forward = forward_cost(model, scale.tiny_images(args.workdir, small), args.forward_batches)
    print(
        f"(a) forward of the tiny model at 32 px, batch 4, {forward['threads']} torch thread: "
        f"{forward['forward'] * 1e3:.2f} ms CPU per image; the actor's whole call "
        f"{forward['call'] * 1e3:.2f} ms",
        flush=True,
    )
    runs = {}
    for count in (small, large):
        run = runs[count] = timed_run(args.workdir, model, count)
        print(
            f"(b) jobs.segment, {count:,} images: {run['seconds']:.1f} s in all (first commit after "
            f"{run['first_commit_s']:.1f} s, {count / run['seconds']:.1f} images/s), {run['cpu']:.1f} "
            f"busy CPU-s ({run['cpu'] / count * 1e3:.1f} ms per image); the job's own processes "
            f"{sum(run['processes'].values()):.1f} CPU-s",
            flush=True,
        )
    report(runs[small], runs[large], large - small, large, forward)
    print(f"load average {load_average()} at the end", flush=True)
    return 0


def report(first: dict, second: dict, images: int, large: int, forward: dict) -> None:
    """The steady part of (b), (c) per stage, and what N cores feed."""
    seconds, cpu = second["seconds"] - first["seconds"], second["cpu"] - first["cpu"]
    per_image = cpu / images
    rest = per_image - forward["forward"]
    print(
        f"steady part ({images:,} images more): {images / seconds:.1f} images/s, "
        f"{per_image * 1e3:.2f} CPU-ms per image = {1 / per_image:.0f} images/s per core; the forward "
        f"{forward['forward'] * 1e3:.2f} ms of it ({forward['forward'] / per_image:.0%}); the pipeline "
        f"without it {rest * 1e3:.2f} CPU-ms per image = {1 / rest:.0f} images/s per core",
        flush=True,
    )
    kinds = {
        kind: (second["processes"][kind] - first["processes"][kind]) / images for kind in first["processes"]
    }
    print(
        f"steady part by process, CPU-ms per image: {sum(kinds.values()) * 1e3:.2f} in the job's own "
        "processes: " + ", ".join(f"{kind} {value * 1e3:.2f}" for kind, value in kinds.items()),
        flush=True,
    )
    remote = 0.0
    for name, stage in second["stages"].items():
        steady = {kind: (stage[kind] - first["stages"][name][kind]) / images for kind in ("cpu", "wall")}
        remote += steady["cpu"]
        print(
            f"(c) {name}: remote CPU {steady['cpu'] * 1e3:.3f} ms, wall {steady['wall'] * 1e3:.3f} ms per "
            f"image steady ({steady['cpu'] / per_image:.0%} of the whole CPU per image); over the "
            f"{large:,}-image run {stage['cpu'] / large * 1e3:.3f} ms CPU, "
            f"{stage['wall'] / large * 1e3:.3f} ms wall",
            flush=True,
        )
    print(
        f"(c) all operators {remote * 1e3:.2f} CPU-ms per image steady, the forward's "
        f"{forward['forward'] * 1e3:.2f} included; the rest of the machine's busy CPU (the driver: "
        f"scheduling, progress, the listing's cut, the output check; Ray's GCS, raylet and workers "
        f"outside the tasks) {(per_image - remote) * 1e3:.2f} ms",
        flush=True,
    )
    feeds = ", ".join(f"{cores} cores {cores / rest:,.0f}" for cores in NODE_CORES)
    print(f"images/s one node can feed at most (N / {rest * 1e3:.2f} CPU-ms): {feeds}", flush=True)
    driver = kinds["driver"]
    print(
        f"but the driver is one process: its {driver * 1e3:.2f} CPU-ms per image cap one job at "
        f"{1 / driver:,.0f} images/s whatever the cores, reached from {rest / driver:.0f} cores on",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
