"""The quickstart's shapes training with each `--amp` mode: AP, and box error against float32.

    .venv/bin/python benchmarks/amp_modes.py [--train-images 400] [--val-images 60] [--epochs 2]
        [--modes off,bf16] [--error-modes bf16,fp16] [--error-images 20] [--num-workers 2]

Generates 128 px shapes (train and validation), then trains the quickstart's model (`small`
preset, AdamW at lr 0.004, 2 workers x 4 images) with `jobs.train` once per `--modes` mode, same
data, seed and schedule, and reads the last epoch's validation AP (validation runs in the run's
own mode). fp16 is left out of training by default: CPUs without AMX-FP16 emulate it, and on the
2-core sandbox 40 fp16 steps had not finished after 6 minutes (fp32: 45 s). Then, on the
float32-trained model and the validation images, it measures how far the boxes of each
`--error-modes` mode's inference are from float32's: for every float32 detection scoring >= 0.05,
the distance (max over the 4 coordinates, pixels of the image) to the closest same-label box of
the other mode, over the first `--error-images` validation images. Once at the preset's 128 px
input and once at 800 px (torchvision's input size, where bf16 spaces representable coordinates
4 px apart), and for comparison with whole-model autocast as the project did before
`mrcnn.precision` (torchvision's components put back).
Prints one table; the headline is bf16's 90th-percentile box error at 800 px.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator

from jobs import train as train_job
from mrcnn import storage
from mrcnn.coco import read_coco
from mrcnn.images import decode_image
from mrcnn.model_folder import load_model
from mrcnn.precision import autocast
from mrcnn.shapes import generate_shapes
from pipeline.cluster.session import ray_session
from pipeline.train.metrics import read_history

CPU = torch.device("cpu")
# COCO evaluation's score threshold (the quickstart segments with it): a short run's model has
# few detections above 0.5.
MIN_SCORE = 0.05


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=400)
    parser.add_argument("--val-images", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--modes", default="off,bf16", help="--amp modes to train with, off first")
    parser.add_argument(
        "--error-modes", default="bf16,fp16", help="modes whose inference box error is measured"
    )
    parser.add_argument("--error-images", type=int, default=20, help="validation images for the box error")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--output", default=None, help="keep the runs here (default: a temporary folder)")
    return parser


def whole_model_autocast(model: torch.nn.Module) -> torch.nn.Module:
    """The model with torchvision's own coordinate components, as before `mrcnn.precision`."""
    model.rpn.box_coder = BoxCoder(model.rpn.box_coder.weights)
    model.roi_heads.box_coder = BoxCoder(model.roi_heads.box_coder.weights)
    model.rpn.anchor_generator.__class__ = AnchorGenerator
    model.rpn.head.bbox_pred.__class__ = torch.nn.Conv2d
    model.roi_heads.box_predictor.bbox_pred.__class__ = torch.nn.Linear
    return model


def box_errors(model, images, precision: str) -> np.ndarray:
    """Per float32 detection (score >= `MIN_SCORE`), px to the closest same-label box in `precision`."""
    errors = []
    with torch.inference_mode():
        for image in images:
            (reference,) = model([image])
            with autocast(CPU, precision):
                (other,) = model([image])
            keep = reference["scores"] >= MIN_SCORE
            for box, label in zip(reference["boxes"][keep], reference["labels"][keep], strict=True):
                same = other["boxes"].float()[other["labels"] == label]
                if len(same):
                    errors.append(float((same - box).abs().amax(1).min()))
    return np.asarray(errors)


def main() -> None:
    args = build_parser().parse_args()
    modes, error_modes = args.modes.split(","), args.error_modes.split(",")
    if modes[0] != "off":
        raise SystemExit("--modes must start with off: box errors are measured against its model")
    with tempfile.TemporaryDirectory() as scratch:
        root = args.output or scratch
        # The same data, seeds and flags as benchmarks/roi_ablation.py, so that their figures
        # compare; each benchmark stays one file a reader can run and follow on its own.
        train = generate_shapes(os.path.join(root, "train"), args.train_images, seed=1, size=128)
        val = generate_shapes(os.path.join(root, "val"), args.val_images, seed=2, size=128)
        common = [
            "--train-annotations", train.annotations_uri, "--train-images", train.images_root,
            "--val-annotations", val.annotations_uri, "--val-images", val.images_root,
            "--preset", "small", "--num-workers", str(args.num_workers),
            "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
            "--optimizer", "adamw", "--lr", "0.004", "--warmup-iters", "50", "--log-every", "0",
        ]  # fmt: skip
        results, seconds = {}, {}
        with ray_session():
            for mode in modes:
                output = os.path.join(root, "runs", mode)
                if train_job.main([*common, "--amp", mode, "--output", output]) != 0:
                    raise SystemExit(f"--amp {mode}: jobs.train failed")
                history = read_history(storage.join(output, "metrics.jsonl"))
                results[mode] = history[-1]
                seconds[mode] = sum(epoch["seconds"] for epoch in history)

        model, _ = load_model(os.path.join(root, "runs", modes[0], "model"))
        dataset = read_coco(val.annotations_uri, val.images_root)
        pixels = [decode_image(storage.read_bytes(r.uri)) for r in dataset.images[: args.error_images]]
        images = [torch.from_numpy(p.astype(np.float32) / 255).permute(2, 0, 1) for p in pixels]
        errors = {}
        old = whole_model_autocast(load_model(os.path.join(root, "runs", modes[0], "model"))[0])
        for size, max_size in ((128, 128), (800, 1333)):
            for each in (model, old):
                each.transform.min_size, each.transform.max_size = (size,), max_size
            for mode in error_modes:
                errors[(size, mode, "policy")] = box_errors(model, images, mode)
            for mode in error_modes:
                errors[(size, mode, "whole model")] = box_errors(old, images, mode)

    steps = int(results[modes[0]]["step"])
    print(
        f"\nsmall preset, {args.train_images} training / {args.val_images} validation shapes (128 px), "
        f"{args.epochs} epochs = {steps} steps of {args.num_workers} x {args.batch_size} images, CPU"
    )
    print(f"{'--amp':<6} {'mask AP':>8} {'AP75':>7} {'box AP':>7} {'AP75':>7} {'train s':>8}")
    for mode in modes:
        segm, bbox = results[mode]["segm"], results[mode]["bbox"]
        print(
            f"{mode:<6} {segm['AP']:8.3f} {segm['AP75']:7.3f} {bbox['AP']:7.3f} {bbox['AP75']:7.3f} "
            f"{seconds[mode]:8.1f}"
        )
    print(f"\nbox error vs float32 inference of the float32-trained model (px; detections >= {MIN_SCORE})")
    print(f"{'input':<6} {'mode':<5} {'coordinates':<12} {'n':>5} {'median':>7} {'p90':>7} {'max':>7}")
    for (size, mode, kind), values in errors.items():
        if len(values) == 0:
            print(f"{size:<6} {mode:<5} {kind:<12} {0:>5}")
            continue
        median, p90, top = np.percentile(values, [50, 90, 100])
        print(f"{size:<6} {mode:<5} {kind:<12} {len(values):>5} {median:7.3f} {p90:7.3f} {top:7.3f}")
    if len(errors.get((800, "bf16", "policy"), [])):
        print(f"bf16_box_error_p90_800px: {np.percentile(errors[(800, 'bf16', 'policy')], 90):.3f}")


if __name__ == "__main__":
    main()
