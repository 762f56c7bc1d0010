"""The whole pipeline on one machine, no cluster, no cloud: data, training, evaluation, segmentation.

    python -m jobs.quickstart --budget-minutes 10            # what `make demo` runs
    python -m jobs.quickstart --use-gpu                      # the same on a GPU

It starts a local Ray (dashboard on 127.0.0.1 only), generates synthetic shapes train and
validation sets, trains a small Mask R-CNN with Ray Train, segments the validation images with Ray
Data into Parquet, scores that output with COCOeval, draws a few overlays, and writes
`WORKDIR/summary.json`. Each step runs the same command a user would run (printed as it starts),
so the quickstart doubles as a tour of the jobs.

The whole run fits `--budget-minutes` (10 by default), whatever the machine: training gets what
is left of the budget after the data and before a reserve for segmentation, evaluation and
overlays, as `jobs.train --max-minutes`, which measures the step time over its first steps and
plans how many steps fit, with the learning-rate schedule set over them. A slower machine trains
fewer steps, on a complete schedule; one too slow for the shortest useful schedule says how long
it would need, and still ends in time. `summary.json` records the budget, the plan, the measured
images/s and the AP, so that two machines' runs compare.

A second run on the same workdir resumes: finished steps are skipped and training continues from
its last checkpoint. `--fresh` starts clean.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable

import torch
from PIL import Image

from jobs import evaluate as evaluate_job
from jobs import segment as segment_job
from jobs import train as train_job
from jobs.cli import OneLineParser, bounded
from mrcnn import storage
from mrcnn.precision import PRECISIONS
from mrcnn.shapes import dataset_uris, generate_shapes
from pipeline.cluster.session import ray_session
from pipeline.results.job_record import read_provenance
from pipeline.results.reading import list_parts
from pipeline.results.render import OverlayNames, draw_rows, pixel_limit
from pipeline.results.selection import InstanceFilter, sample_rows
from pipeline.segment import output
from pipeline.train.metrics import read_history
from pipeline.train.run_folder import RunFolder

STEPS = 6
OVERLAY_MIN_SCORE = 0.5
# Segmentation keeps detections down to this score so that the evaluation follows COCO's protocol
# (AP integrates over the whole precision-recall curve); overlays show only confident ones.
EVALUATION_SCORE_THRESHOLD = 0.05
# Of the budget, what training must leave for segmentation, evaluation, overlays and the summary:
# a fixed part (the segmentation job's Ray Data start-up, its actor's model load) and a part per
# validation image, set well above what these steps took on the 2-core sandbox (BENCHMARKS.md,
# "With the 10-minute budget") so that a machine twice as slow, or busier, still ends in time.
RESERVE_FIXED_S = 20.0
RESERVE_PER_VAL_IMAGE_S = 0.12


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m jobs.quickstart", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir", default="demo-output", help="where everything goes (default demo-output)"
    )
    parser.add_argument("--fresh", action="store_true", help="delete the workdir first instead of resuming")
    parser.add_argument("--use-gpu", action="store_true", help="train and segment on the GPU(s)")
    parser.add_argument(
        "--budget-minutes", type=bounded(float, 0.0, above=True), default=10.0,
        help="wall-clock budget of the whole run; training takes the steps that fit (default 10)",
    )  # fmt: skip
    parser.add_argument(
        "--train-images", type=bounded(int, 8), default=1200, help="synthetic training images (default 1200)"
    )
    parser.add_argument(
        "--val-images", type=bounded(int, 4), default=200, help="synthetic validation images (default 200)"
    )
    parser.add_argument(
        "--epochs", type=bounded(int, 1), default=30,
        help="at most this many training epochs; the budget decides how many steps (default 30)",
    )  # fmt: skip
    parser.add_argument(
        "--num-workers", type=bounded(int, 1), default=2, help="Ray Train workers (default 2)"
    )
    parser.add_argument("--preset", default="small", help="model preset (default small)")
    parser.add_argument(
        "--amp", choices=("auto", *PRECISIONS), default="auto",
        help="training precision; auto is bf16 on a GPU that computes it natively, fp16 on an "
        "older GPU, float32 (off) on CPUs (default auto)",
    )  # fmt: skip
    parser.add_argument(
        "--overlays", type=bounded(int, 0), default=6, help="overlay PNGs to draw (default 6)"
    )
    parser.add_argument(
        "--verbose", action="store_true",
        help="also show what Ray and the workers print (by default it stays in Ray's log files)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    started = _process_start_time()
    args = build_parser().parse_args(argv)
    budget_s = args.budget_minutes * 60
    reserve_s = RESERVE_FIXED_S + RESERVE_PER_VAL_IMAGE_S * args.val_images
    workdir = os.path.abspath(args.workdir)
    if args.fresh and os.path.exists(workdir):
        shutil.rmtree(workdir)
    resuming = os.path.isdir(workdir) and bool(os.listdir(workdir))
    print(
        f"quickstart: {'resuming in' if resuming else 'starting clean in'} {workdir}"
        + (" (finished steps are skipped; --fresh starts over)" if resuming else ""),
        flush=True,
    )
    print(
        f"quickstart: budget {args.budget_minutes:g} min, to end by {_clock(started + budget_s)}; "
        f"training takes what is left after the data, keeping {reserve_s:.0f} s for segmentation, "
        f"evaluation and overlays",
        flush=True,
    )
    paths = _Paths(workdir)

    _step(1, "synthetic shapes: training set", lambda: _shapes(paths.train, args.train_images, seed=1))
    _step(2, "synthetic shapes: validation set", lambda: _shapes(paths.val, args.val_images, seed=2))
    with ray_session(verbose=args.verbose):
        train_until = started + budget_s - reserve_s
        _step(3, "training with Ray Train", lambda: _train(args, paths, train_until))
        _step(
            4, "bulk segmentation with Ray Data", lambda: _run(segment_job.main, _segment_argv(args, paths))
        )
    _step(5, "COCO evaluation of the Parquet output", lambda: _run(evaluate_job.main, _evaluate_argv(paths)))
    _step(6, "overlays", lambda: _draw_overlays(paths, args.overlays))

    summary = _summary(paths, time.time() - started, args)
    storage.write_bytes(paths.summary, json.dumps(summary, indent=2).encode())
    print(_report(summary, paths))
    return 0


def _process_start_time() -> float:
    """Unix time this process started: the budget counts Python's start-up and imports too (3-10 s
    on 2 cores). Where /proc does not say, now."""
    now = time.time()
    try:
        with open("/proc/self/stat") as file:
            ticks = int(file.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/stat") as file:
            boot = next(int(line.split()[1]) for line in file if line.startswith("btime "))
        started = boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return now
    return started if now - 600 < started <= now else now


def _clock(unix: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(unix))


class _Paths:
    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.train = os.path.join(workdir, "data", "train")
        self.val = os.path.join(workdir, "data", "val")
        self.run = os.path.join(workdir, "train")
        self.model = RunFolder(self.run).model_uri
        self.segments = os.path.join(workdir, "segments")
        self.evaluation = os.path.join(workdir, "evaluation.json")
        self.overlays = os.path.join(workdir, "overlays")
        self.summary = os.path.join(workdir, "summary.json")


def _step(number: int, title: str, action: Callable[[], str | None]) -> None:
    print(f"\n[{number}/{STEPS}] {title}", flush=True)
    began = time.monotonic()
    note = action()
    print(f"[{number}/{STEPS}] {note or 'done'} ({time.monotonic() - began:.0f} s)", flush=True)


def _shapes(out: str, count: int, seed: int) -> str:
    if storage.exists(dataset_uris(out)[0]):
        return f"already there: {out}"
    print(f"$ python -m jobs.make_shapes {out} --num-images {count} --seed {seed}", flush=True)
    generated = generate_shapes(out, count, seed=seed)
    return f"{generated.num_images} images, {generated.num_annotations} objects in {out}"


def _run(main: Callable[[list[str]], int], argv: list[str]) -> str:
    module = main.__module__
    print(f"$ python -m {module} {' '.join(argv)}", flush=True)
    code = main(argv)
    if code != 0:
        raise SystemExit(f"quickstart: {module} failed with exit code {code}; see its message above")
    return "done"


def _train(args: argparse.Namespace, paths: _Paths, train_until: float) -> str:
    # At least a few seconds: a model must come out even when the data took the whole budget
    # (the calibration steps are the fewest a budget trains).
    minutes = max(0.01, (train_until - time.time()) / 60)
    _run(train_job.main, _train_argv(args, paths) + ["--max-minutes", f"{minutes:.2f}"])
    plan = _training_plan(paths)
    if plan is not None and plan["short_by_s"] > 0:
        return _too_slow(plan, args.budget_minutes)
    return "done"


def _too_slow(plan: dict, budget_minutes: float) -> str:
    """One line: the budget this machine would need for the shortest useful schedule."""
    needed = math.ceil(budget_minutes + plan["short_by_s"] / 60)
    return (
        f"this machine is too slow for the shortest useful schedule ({plan['min_steps']} steps at "
        f"{plan['seconds_per_step']:.2f} s/step) in {budget_minutes:g} min: it would need "
        f"--budget-minutes {needed}; trained {plan['steps']} steps to end in time (expect a low AP)"
    )


def _training_plan(paths: _Paths) -> dict | None:
    history = read_history(RunFolder(paths.run).metrics_uri)
    return history[-1].get("plan") if history else None


def _train_argv(args: argparse.Namespace, paths: _Paths) -> list[str]:
    argv = [
        "--train-annotations", dataset_uris(paths.train)[0],
        "--train-images", dataset_uris(paths.train)[1],
        # No validation set here: step 5 scores the segmentation output of the same held-out
        # images with the same COCOeval (the two agreed exactly, BENCHMARKS.md "Before the
        # budget"), and a validation pass per epoch would take its share of the budget each time.
        "--output", paths.run,
        "--preset", args.preset,
        "--num-workers", str(args.num_workers),
        "--epochs", str(args.epochs),
        # Calibrated on the shapes from scratch (BENCHMARKS.md, "Training the small preset from
        # scratch"): AdamW learns them several times faster than SGD, and 0.002 per 8 images beat
        # both 0.001 and 0.003. The job's --lr is per 16 images and scaled to the total batch.
        "--optimizer", "adamw",
        "--lr", "0.004",
        "--warmup-iters", "50",
    ]  # fmt: skip
    verbose = ["--verbose"] if args.verbose else []
    return argv + ["--amp", training_precision(args)] + (["--use-gpu"] if args.use_gpu else []) + verbose


def training_precision(args: argparse.Namespace) -> str:
    """`--amp` resolved. "auto": on a GPU bf16 where it is native, else fp16 (with the scaler);
    on a CPU float32, even one with AMX: there the 10-minute demo trained a few more steps in bf16
    but reached no better AP (BENCHMARKS.md, "With the 10-minute budget")."""
    if args.amp != "auto":
        return args.amp
    if not args.use_gpu:
        return "off"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _segment_argv(args: argparse.Namespace, paths: _Paths) -> list[str]:
    argv = [
        "--input", dataset_uris(paths.val)[1],
        "--output", paths.segments,
        "--model", paths.model,
        "--score-threshold", str(EVALUATION_SCORE_THRESHOLD),
        "--batch-size", "8",
    ]  # fmt: skip
    verbose = ["--verbose"] if args.verbose else []
    return argv + (["--gpus-per-actor", "1"] if args.use_gpu else ["--gpus-per-actor", "0"]) + verbose


def _evaluate_argv(paths: _Paths) -> list[str]:
    return [
        "--predictions", paths.segments,
        "--annotations", dataset_uris(paths.val)[0],
        "--images-root", dataset_uris(paths.val)[1],
        "--json", paths.evaluation,
    ]  # fmt: skip


def _draw_overlays(paths: _Paths, count: int) -> str:
    """`count` overlays of a sample of the segmented rows, drawn by `jobs.render`'s code (only the
    confident instances), three times enlarged: the shapes images are small."""
    os.makedirs(paths.overlays, exist_ok=True)
    parts = list_parts(paths.segments)
    refs = sample_rows(parts, count, 0, InstanceFilter()).refs()
    limit = pixel_limit(read_provenance(paths.segments))
    names = OverlayNames("png")
    drawn = 0
    for row, overlay, why in draw_rows(parts, refs, InstanceFilter(min_score=OVERLAY_MIN_SCORE), limit):
        if overlay is None:
            print(f"quickstart: overlay skipped: {why}", flush=True)
            continue
        enlarged = overlay.resize((overlay.width * 3, overlay.height * 3), Image.NEAREST)
        enlarged.save(os.path.join(paths.overlays, names(row["path"])))
        drawn += 1
    return f"{drawn} overlays in {paths.overlays}"


def _summary(paths: _Paths, seconds: float, args: argparse.Namespace) -> dict:
    with open(paths.evaluation) as file:
        evaluation = json.load(file)
    segmentation = output.read_success(paths.segments)
    history = read_history(RunFolder(paths.run).metrics_uri)
    trained_images = sum(epoch["images"] for epoch in history)
    trained_seconds = sum(epoch["seconds"] for epoch in history)
    return {
        "budget_minutes": args.budget_minutes,
        "amp": training_precision(args),
        "plan": history[-1].get("plan") if history else None,
        "steps": history[-1].get("step") if history else None,
        "planned_steps": history[-1].get("planned_steps") if history else None,
        "epochs": len(history),
        "train_images_per_second": trained_images / trained_seconds if trained_seconds else None,
        "segm_AP": evaluation["segm"]["AP"],
        "bbox_AP": evaluation["bbox"]["AP"],
        "segm_AP50": evaluation["segm"]["AP50"],
        "segm_AP75": evaluation["segm"]["AP75"],
        "images_segmented": segmentation["images"] - segmentation["errors"],
        "errors": segmentation["errors"],
        "instances": segmentation["instances"],
        "segment_images_per_second": segmentation.get("images_per_second"),
        # This run's seconds: a resumed run counts only what it did itself.
        "seconds": round(seconds, 1),
        "workdir": paths.workdir,
        "model": paths.model,
        "segments": paths.segments,
    }


def _report(summary: dict, paths: _Paths) -> str:
    plan = summary["plan"]
    trained = (
        f"  trained {summary['steps']} steps of {summary['planned_steps']} planned at "
        f"{summary['train_images_per_second'] or 0:.1f} images/s"
        + (f"; {_too_slow(plan, summary['budget_minutes'])}" if plan and plan["short_by_s"] > 0 else "")
    )
    return f"""
quickstart finished in {summary["seconds"]:.0f} s (budget {summary["budget_minutes"] * 60:.0f} s)
{trained}
  validation AP (COCO, 0..1): segm {summary["segm_AP"]:.3f}  bbox {summary["bbox_AP"]:.3f}  \
segm AP50 {summary["segm_AP50"]:.3f}  AP75 {summary["segm_AP75"]:.3f}
  segmented {summary["images_segmented"]} images ({summary["errors"]} errors, {summary["instances"]} \
instances) at {summary["segment_images_per_second"] or 0:.1f} images/s
  model:     {paths.model}
  masks:     {paths.segments}  (Parquet, one row per image)
  overlays:  {paths.overlays}
  summary:   {paths.summary}
  training metrics: {RunFolder(paths.run).metrics_uri}

Read the masks:
  python -c "import duckdb; print(duckdb.sql(\\"select path, len(scores) as n, categories \
from '{paths.segments}/*.parquet' limit 5\\"))"
"""


if __name__ == "__main__":
    sys.exit(main())
