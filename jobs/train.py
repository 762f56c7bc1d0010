"""Train Mask R-CNN with Ray Train on a COCO dataset (local or s3://) and export the model.

    python -m jobs.train --train-annotations s3://bucket/shapes/train/annotations.json \\
        --train-images s3://bucket/shapes/train/images \\
        --val-annotations s3://bucket/shapes/val/annotations.json \\
        --val-images s3://bucket/shapes/val/images \\
        --output s3://bucket/runs/shapes-small --preset small --num-workers 2 --epochs 12

Writes `OUTPUT/checkpoints/` (every `--checkpoint-every` steps and every epoch),
`OUTPUT/metrics.jsonl` (a record every `--log-every` steps and one per epoch: losses, lr,
images/s, validation COCO AP; see `pipeline.train.metrics`), TensorBoard event files under
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

import argparse
import sys
import time

from jobs.cli import OneLineParser, bounded, run_job
from mrcnn import storage
from mrcnn.backbone import BACKBONE_WEIGHTS, MAX_TRAINABLE_LAYERS
from mrcnn.coco import CocoError, read_coco
from mrcnn.images import ORIENTATIONS
from mrcnn.model import ROI_OPS
from mrcnn.precision import PRECISIONS
from mrcnn.presets import PRESETS
from pipeline.cluster.ray_compat import check_ray_version
from pipeline.train.config import DEFAULT_LR, REFERENCE_BATCH, TrainConfig
from pipeline.train.job import check_weights, is_finished
from pipeline.train.run_folder import RunFolder, RunIdentity

DEFAULTS = TrainConfig(train_annotations="", train_images="", output="")
# What the job only reads, checked on every node of a cluster when it is a local path.
READ_PATHS = ("train_annotations", "train_images", "val_annotations", "val_images", "init_weights")
# The flags that are `TrainConfig` fields of the same name.
FLAG_FIELDS = (
    "preset", "num_workers", "use_gpu", "cpus_per_worker", "epochs", "batch_size", "optimizer",
    "momentum", "weight_decay", "warmup_iters", "lr_schedule", "amp", "roi_op", "mask_loss",
    "init_weights", "backbone_weights", "trainable_backbone_layers", "checkpoint_every",
    "validate_every", "log_every", "exif_orientation", "max_failures", "seed", "max_steps",
    "max_minutes",
)


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m jobs.train", description=__doc__.splitlines()[0])
    _data_flags(parser.add_argument_group("data"))
    _model_flags(parser.add_argument_group("model"))
    _worker_flags(parser.add_argument_group("workers"))
    _optimisation_flags(parser.add_argument_group("optimisation"))
    _long_run_flags(parser.add_argument_group("long runs"))
    return parser


def _data_flags(data) -> None:
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


def _model_flags(model) -> None:
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


def _worker_flags(scale) -> None:
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


def _optimisation_flags(optim) -> None:
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


def _long_run_flags(watch) -> None:
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
        "files; the progress lines show either way); MRCNN_VERBOSE=1 in the environment does the same",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    started = time.time()  # --max-minutes counts from here, start-up included
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.val_annotations is None) != (args.val_images is None):
        parser.error("--val-annotations and --val-images go together")
    return run_job("train", lambda: train(config_from(args), args, started))


def config_from(args: argparse.Namespace) -> TrainConfig:
    """The run's `TrainConfig`, from the flags; every URI absolute (Ray Train workers run in a
    folder of their own, not in ours)."""
    uris = {
        name: _absolute(getattr(args, name)) if getattr(args, name) else None
        for name in ("train_annotations", "train_images", "output", "val_annotations", "val_images")
    }
    flags = {name: getattr(args, name) for name in FLAG_FIELDS}
    return TrainConfig(**uris, **flags, lr_per_16_images=args.lr, resource_timeout_s=args.resource_timeout)


def train(config: TrainConfig, args: argparse.Namespace, started: float) -> int:
    """Check everything the driver can before Ray starts, then train on a Ray session."""
    if config.trainable_backbone_layers is not None and not config.pretrained:
        # torchvision's builders warn the same way and train every stage.
        print(
            "train: warning: --trainable-backbone-layers has no effect without pretrained weights; "
            "all 5 stages train",
            file=sys.stderr,
        )
    check_ray_version()
    train_data, val_data = _read_datasets(config)
    num_classes = len(train_data.categories) + 1
    if config.init_weights:
        check_weights(config, num_classes)
    folder = RunFolder(config.output)
    identity = RunIdentity(config.preset, config.roi_op, config.mask_loss, train_data.categories)
    resumed = folder.claim(identity)
    num_images = len(train_data.images)
    if resumed and folder.is_complete(lambda last: is_finished(config, last, num_images)):
        print(
            f"train: {config.output} is already complete ({folder.completed_epochs()} epochs, "
            f"model in {folder.model_uri}); nothing to do"
        )
        return 0
    if not resumed and not config.init_weights:
        check_weights(config, num_classes)

    from pipeline.cluster.session import ray_session
    from pipeline.cluster.shared_storage import check_local_paths
    from pipeline.train.job import run_training

    with ray_session(num_cpus=args.num_cpus, verbose=args.verbose) as session:
        marker = None
        if session.joined_cluster:
            readable = {f"--{name.replace('_', '-')}": getattr(config, name) for name in READ_PATHS}
            marker = check_local_paths({"--output": config.output}, readable).get("--output")
        outcome = run_training(
            config, train_data, val_data, joined_cluster=session.joined_cluster, output_marker=marker,
            started=started,
        )  # fmt: skip
    print(f"train: {outcome.epochs} epochs; model exported to {outcome.model_uri}")
    return 0


def _read_datasets(config: TrainConfig):
    """Read and check the annotations (and that the image folders exist) before any Ray work."""
    # Folders first: a missing one is the error to report, not the reader's warnings before it.
    for images_root in (config.train_images, config.val_images):
        if images_root and not storage.exists(images_root):
            raise CocoError(f"{images_root}: images folder not found")
    train_data = read_coco(config.train_annotations, config.train_images)
    if len(train_data.images) < config.num_workers:
        raise CocoError(
            f"{config.train_annotations}: {len(train_data.images)} images for {config.num_workers} workers"
        )
    val_data = None
    if config.val_annotations:
        val_data = read_coco(config.val_annotations, config.val_images)
        if val_data.categories != train_data.categories:
            raise CocoError(
                f"{config.val_annotations}: categories differ from those of {config.train_annotations}"
            )
    return train_data, val_data


def _absolute(uri: str) -> str:
    return storage.to_uri(*storage.resolve(uri))


if __name__ == "__main__":
    raise SystemExit(main())
