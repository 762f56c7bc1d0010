"""Train Mask R-CNN with Ray Train on a COCO dataset (local or s3://) and export the model.

    python -m jobs.train --train-annotations s3://bucket/shapes/train/annotations.json \\
        --train-images s3://bucket/shapes/train/images \\
        --val-annotations s3://bucket/shapes/val/annotations.json \\
        --val-images s3://bucket/shapes/val/images \\
        --output s3://bucket/runs/shapes-small --preset small --num-workers 2 --epochs 12

Writes `OUTPUT/checkpoints/` (every `--checkpoint-every` steps and every epoch),
`OUTPUT/metrics.jsonl` (a record every `--log-every` steps and one per epoch: losses, lr,
images/s, validation COCO AP; see `pipeline.metrics`), TensorBoard event files under
`OUTPUT/tensorboard/` and at the end `OUTPUT/model/` (`weights.pt` and `model.json`), which
`jobs.segment` and `jobs.evaluate` load. Re-running the same command on the
same OUTPUT resumes from the latest checkpoint, or with a larger `--epochs` trains on from it; a
finished run is not trained again. `--max-minutes 30` plans, from the step time measured over the
first steps, how many steps fit in 30 minutes and runs a complete learning-rate schedule over
them (for preemptible nodes, or a promise of time); `--max-steps N` stops the run and its
schedule at step N. With `RAY_ADDRESS` set the job runs on that cluster; otherwise
on a local Ray of `--num-cpus` CPUs.
"""

from __future__ import annotations

import sys
import time

from jobs.cli import OneLineParser, bounded
from mrcnn import storage
from mrcnn.backbone import BACKBONE_WEIGHTS, MAX_TRAINABLE_LAYERS
from mrcnn.coco import CocoError, read_coco
from mrcnn.images import ORIENTATIONS
from mrcnn.model import ROI_OPS
from mrcnn.precision import PRECISIONS
from mrcnn.presets import PRESETS
from mrcnn.weights import WeightsError
from pipeline.checkpoints import OutputMismatch, RunIdentity, claim_output
from pipeline.ray_compat import RayCompatError, check_ray_version
from pipeline.train_job import DEFAULT_LR, REFERENCE_BATCH, TrainJob
from pipeline.train_output import completed_epochs, is_complete
from pipeline.trainer import TrainingError, check_backbone_weights, check_init_weights

DEFAULTS = TrainJob(train_annotations="", train_images="", output="")


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m jobs.train", description=__doc__.splitlines()[0])
    data = parser.add_argument_group("data")
    data.add_argument("--train-annotations", required=True, metavar="URI", help="COCO instances JSON")
    data.add_argument("--train-images", required=True, metavar="URI", help="folder of the training images")
    data.add_argument("--val-annotations", metavar="URI", help="validation COCO JSON (default: none)")
    data.add_argument("--val-images", metavar="URI", help="folder of the validation images")
    data.add_argument("--output", required=True, metavar="URI", help="run folder (local or s3://)")
    data.add_argument(
        "--exif-orientation", choices=ORIENTATIONS, default=DEFAULTS.exif_orientation,
        help="images as stored, EXIF orientation ignored, as COCO was annotated and torchvision's "
        "CocoDetection reads it; or 'apply' for annotations made on the displayed images "
        f"(default {DEFAULTS.exif_orientation})",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--preset", choices=sorted(PRESETS), default=DEFAULTS.preset,
        help=f"architecture and input size (default {DEFAULTS.preset})",
    )
    model.add_argument(
        "--roi-op", choices=ROI_OPS, default=DEFAULTS.roi_op,
        help=f"RoIAlign or the quantized RoIPool, for the ablation (default {DEFAULTS.roi_op})",
    )
    model.add_argument(
        "--mask-loss", choices=("sigmoid", "softmax"), default=DEFAULTS.mask_loss,
        help=f"per-class sigmoid masks or competing softmax masks (default {DEFAULTS.mask_loss})",
    )
    model.add_argument(
        "--init-weights", metavar="URI",
        help="start from these weights (file, s3:// or torchvision:<name>); tensors whose name and "
        "shape differ stay random, except the predictor rows of categories named as a COCO class "
        "of torchvision:<name> weights (default: random init)",
    )
    model.add_argument(
        "--backbone-weights", choices=BACKBONE_WEIGHTS, default=None,
        help="start the ResNet from torchvision's ImageNet weights (torch hub cache, downloaded where "
        "there is network) or from random (default: imagenet for r50-fpn*, none for small and tiny; "
        "ignored with --init-weights)",
    )
    model.add_argument(
        "--trainable-backbone-layers", type=bounded(int, 0, MAX_TRAINABLE_LAYERS), default=None,
        metavar="K",
        help="with pretrained weights, train the top K of the ResNet's 5 stages and keep its "
        "BatchNorm frozen, as torchvision (default 3; all 5 train without pretrained weights)",
    )

    scale = parser.add_argument_group("workers")
    scale.add_argument(
        "--num-workers", type=bounded(int, 1), default=DEFAULTS.num_workers,
        help=f"Ray Train workers, one DDP process each (default {DEFAULTS.num_workers})",
    )
    scale.add_argument(
        "--use-gpu", action="store_true",
        help="one GPU per worker, requested even when no GPU node is up yet so that the autoscaler "
        "launches them (default: CPU)",
    )
    scale.add_argument(
        "--cpus-per-worker", type=bounded(float, 0.0, above=True), default=None,
        help="CPUs per worker, also its torch threads (default with --use-gpu: 3/4 of the CPUs per "
        "GPU of the GPU nodes that are up, else 1; on CPUs: 3/4 of the cluster's CPUs shared by the "
        "workers; the rest decodes images)",
    )
    scale.add_argument(
        "--max-failures", type=bounded(int, -1), default=DEFAULTS.max_failures,
        help="worker failures to recover from by resuming from the latest checkpoint, -1 for no "
        f"limit (default {DEFAULTS.max_failures})",
    )
    scale.add_argument(
        "--resource-timeout", type=bounded(float, 0.0, above=True), default=DEFAULTS.resource_timeout_s,
        metavar="SECONDS",
        help="how long to wait for the cluster (its autoscaler) to place every worker before stopping "
        f"with an error (default {DEFAULTS.resource_timeout_s:g})",
    )
    scale.add_argument(
        "--num-cpus", type=bounded(int, 1), default=None,
        help="CPUs of the local Ray started when RAY_ADDRESS is not set (default: all)",
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument(
        "--epochs", type=bounded(int, 1), default=DEFAULTS.epochs,
        help=f"passes over the training set (default {DEFAULTS.epochs})",
    )
    optim.add_argument(
        "--max-steps", type=bounded(int, 1), default=None,
        help="end the run, and its learning-rate schedule, after this many optimizer steps, within "
        "an epoch if need be (default: all epochs)",
    )
    optim.add_argument(
        "--max-minutes", type=bounded(float, 0.0, above=True), default=None,
        help="time budget from the job's start: the step time measured over the first steps plans "
        "how many steps (at most the epochs' and --max-steps) end in time, and the schedule is set "
        "over them; a re-run resumes the plan and re-plans the rest against its own budget "
        "(default: no budget)",
    )
    optim.add_argument(
        "--batch-size", type=bounded(int, 1), default=DEFAULTS.batch_size,
        help=f"images per worker and step (default {DEFAULTS.batch_size})",
    )
    optim.add_argument(
        "--optimizer", choices=("sgd", "adamw"), default=DEFAULTS.optimizer,
        help=f"SGD with momentum, as in the paper, or AdamW (default {DEFAULTS.optimizer})",
    )
    optim.add_argument(
        "--lr", type=bounded(float, 0.0, above=True), default=None,
        help=f"peak learning rate for a total batch of {REFERENCE_BATCH} images, scaled linearly to "
        f"num-workers x batch-size (default {DEFAULT_LR['sgd']} with sgd, {DEFAULT_LR['adamw']} with adamw)",
    )
    optim.add_argument(
        "--momentum", type=bounded(float, 0.0, 1.0), default=DEFAULTS.momentum,
        help=f"SGD momentum; with --optimizer adamw, AdamW's beta1 (default {DEFAULTS.momentum})",
    )
    optim.add_argument(
        "--weight-decay", type=bounded(float, 0.0), default=DEFAULTS.weight_decay,
        help=f"weight decay (default {DEFAULTS.weight_decay})",
    )
    optim.add_argument(
        "--warmup-iters", type=bounded(int, 0), default=DEFAULTS.warmup_iters,
        help=f"steps of linear warm-up from lr/1000, at most a quarter of all steps "
        f"(default {DEFAULTS.warmup_iters})",
    )
    optim.add_argument(
        "--lr-schedule", choices=("cosine", "step"), default=DEFAULTS.lr_schedule,
        help="after warm-up: cosine decay to 0, or 10x drops at 16/26 and 22/26 of the run "
        f"(default {DEFAULTS.lr_schedule})",
    )
    optim.add_argument(
        "--amp", nargs="?", const="bf16", choices=PRECISIONS, default=DEFAULTS.amp,
        help="mixed precision: bf16 (also --amp alone; GPU, or CPUs with bf16 support) or fp16 "
        "with loss scaling; box coordinates stay float32 either way (default off)",
    )
    optim.add_argument(
        "--seed", type=int, default=DEFAULTS.seed,
        help=f"seed of the model's initialisation and RoI sampling (default {DEFAULTS.seed})",
    )

    watch = parser.add_argument_group("long runs")
    watch.add_argument(
        "--checkpoint-every", type=bounded(int, 0), default=DEFAULTS.checkpoint_every, metavar="N",
        help="also checkpoint every N optimizer steps, so that a failure mid-epoch loses at most N "
        f"steps; 0 for epoch ends only (default {DEFAULTS.checkpoint_every})",
    )
    watch.add_argument(
        "--validate-every", type=bounded(int, 0), default=DEFAULTS.validate_every, metavar="N",
        help="also validate every N steps, sharded over all workers; 0 for epoch ends only "
        f"(default {DEFAULTS.validate_every})",
    )
    watch.add_argument(
        "--log-every", type=bounded(int, 0), default=DEFAULTS.log_every, metavar="N",
        help="every N steps: loss, lr and images/s to metrics.jsonl and TensorBoard, and a progress "
        f"line; 0 for epochs only (default {DEFAULTS.log_every})",
    )
    watch.add_argument(
        "--verbose", action="store_true",
        help="also show what Ray and the training workers print (by default it stays in Ray's log "
        "files; the progress lines show either way)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    started = time.time()  # --max-minutes counts from here, start-up included
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.val_annotations is None) != (args.val_images is None):
        parser.error("--val-annotations and --val-images go together")
    try:
        # Absolute URIs: Ray Train workers run in a folder of their own, not in ours.
        uris = {
            name: _absolute(getattr(args, name)) if getattr(args, name) else None
            for name in ("train_annotations", "train_images", "output", "val_annotations", "val_images")
        }
    except storage.StorageError as error:
        print(f"train: error: {error}", file=sys.stderr)
        return 2
    job = TrainJob(
        **uris,
        preset=args.preset,
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        cpus_per_worker=args.cpus_per_worker,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr_per_16_images=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        warmup_iters=args.warmup_iters,
        lr_schedule=args.lr_schedule,
        amp=args.amp,
        roi_op=args.roi_op,
        mask_loss=args.mask_loss,
        init_weights=args.init_weights,
        backbone_weights=args.backbone_weights,
        trainable_backbone_layers=args.trainable_backbone_layers,
        checkpoint_every=args.checkpoint_every,
        validate_every=args.validate_every,
        log_every=args.log_every,
        exif_orientation=args.exif_orientation,
        max_failures=args.max_failures,
        seed=args.seed,
        resource_timeout_s=args.resource_timeout,
        max_steps=args.max_steps,
        max_minutes=args.max_minutes,
    )
    if args.trainable_backbone_layers is not None and job.backbone_start == "none" and not job.init_weights:
        # torchvision's builders warn the same way and train every stage.
        print(
            "train: warning: --trainable-backbone-layers has no effect without pretrained weights; "
            "all 5 stages train",
            file=sys.stderr,
        )
    try:
        check_ray_version()
        train_data, val_data = _read_datasets(job)
        if job.init_weights:
            check_init_weights(job, len(train_data.categories) + 1)
        identity = RunIdentity(job.preset, job.roi_op, job.mask_loss, train_data.categories)
        resumed = claim_output(job.output, identity)
        if resumed and is_complete(job, len(train_data.images)):
            print(
                f"train: {job.output} is already complete ({completed_epochs(job)} epochs, "
                f"model in {storage.join(job.output, 'model')}); nothing to do"
            )
            return 0
        if not resumed:
            check_backbone_weights(job)
    except (RayCompatError, CocoError, WeightsError, OutputMismatch, storage.StorageError) as error:
        print(f"train: error: {error}", file=sys.stderr)
        return 2

    from pipeline.placement import InfeasibleRequest
    from pipeline.ray_runtime import ray_session
    from pipeline.shared_storage import SharedStorageError, check_local_paths
    from pipeline.trainer import run_training

    try:
        with ray_session(num_cpus=args.num_cpus, verbose=args.verbose) as session:
            marker = None
            if session.joined_cluster:
                readable = {
                    f"--{name.replace('_', '-')}": getattr(job, name)
                    for name in (
                        "train_annotations", "train_images", "val_annotations", "val_images", "init_weights"
                    )
                }
                marker = check_local_paths({"--output": job.output}, readable).get("--output")
            outcome = run_training(
                job,
                train_data,
                val_data,
                joined_cluster=session.joined_cluster,
                output_marker=marker,
                started=started,
            )
    except (SharedStorageError, InfeasibleRequest) as error:
        print(f"train: error: {error}", file=sys.stderr)
        return 2
    except (TrainingError, storage.StorageError) as error:
        print(f"train: error: {error}", file=sys.stderr)
        return 1
    print(f"train: {outcome.epochs} epochs; model exported to {outcome.model_uri}")
    return 0


def _read_datasets(job: TrainJob):
    """Read and check the annotations (and that the image folders exist) before any Ray work."""
    # Folders first: a missing one is the error to report, not the reader's warnings before it.
    for images_root in (job.train_images, job.val_images):
        if images_root and not storage.exists(images_root):
            raise CocoError(f"{images_root}: images folder not found")
    train_data = read_coco(job.train_annotations, job.train_images)
    if len(train_data.images) < job.num_workers:
        raise CocoError(
            f"{job.train_annotations}: {len(train_data.images)} images for {job.num_workers} workers"
        )
    val_data = None
    if job.val_annotations:
        val_data = read_coco(job.val_annotations, job.val_images)
        if val_data.categories != train_data.categories:
            raise CocoError(
                f"{job.val_annotations}: categories differ from those of {job.train_annotations}"
            )
    return train_data, val_data


def _absolute(uri: str) -> str:
    return storage.to_uri(*storage.resolve(uri))


if __name__ == "__main__":
    raise SystemExit(main())
