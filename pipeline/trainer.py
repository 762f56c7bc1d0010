"""Run a Mask R-CNN training on Ray Train: datasets, workers, storage, failures, resume and export.

`TorchTrainer` runs `pipeline.train_loop.train_loop_per_worker` on `num_workers` workers (DDP),
each reading its shard of the Ray Data training set (`pipeline.train_data`). Checkpoints go to
`RunConfig(storage_path=<output>, name="checkpoints")` on local disk or S3 (through
`mrcnn.storage`, so `AWS_ENDPOINT_URL` and the retry settings apply). A worker that dies is
replaced and training resumes from the latest checkpoint, up to `max_failures` times
(`FailureConfig`); a new run of the same command on the same output resumes the same way, since
a new `TorchTrainer` on the same storage path and name finds Ray's record of the checkpoints.
When training is done, the model of the latest checkpoint is exported to `<output>/model/`
(`pipeline.train_output`).

Resources follow the flags, not the cluster as it is at the start (a cluster whose GPU nodes
scale from zero holds only its head then):
- `--use-gpu` requests one GPU per worker on a cluster the job joined, whatever it holds now, so
  that its autoscaler launches GPU nodes; a worker whose torch then sees no CUDA device fails
  before training with one line naming its node (`pipeline.ray_compat.cuda_checked_torch_config`).
  On the job's own local Ray, `--use-gpu` on a machine without GPUs is an error at once.
- CPUs per worker (also its torch threads, since Ray sets `OMP_NUM_THREADS=1` in its workers):
  `--cpus-per-worker`, else sized from the cluster (`pipeline.worker_sizing`).
- Ray Train retries a worker group that cannot be placed every 60 s and, by default, forever; the
  run gives up after `resource_timeout_s` with one line instead.

Time and step budgets: `max_steps` ends the run (and its learning-rate schedule) after that many
steps, mid-epoch if need be; `max_minutes` plans the steps that fit in that many minutes from the
job's start at the step time the workers measure (`pipeline.budget`), the final checkpoint and the
export included. Either way the schedule is complete: warm-up, then decay to zero at the last
step. The plan travels in the checkpoints, so a re-run resumes it; a run is finished when its
schedule is.

Tests make a worker die on purpose through environment variables (`pipeline.fault_injection`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from mrcnn import build_model, storage
from mrcnn.backbone import ensure_imagenet_weights, trainable_layers
from mrcnn.coco import CocoDataset
from pipeline import fault_injection, job_log
from pipeline.budget import CALIBRATION_STEPS, TimeBudget
from pipeline.checkpoints import CHECKPOINTS_NAME
from pipeline.job_log import say
from pipeline.loop_config import LoopConfig
from pipeline.metrics import METRICS_FILE
from pipeline.placement import WaitReport, require_placement
from pipeline.ray_compat import (
    TRAIN_PRINT_PATCH_ENV,
    cuda_checked_torch_config,
    is_worker_group_start_timeout,
    worker_group_start_retries,
)
from pipeline.ray_errors import one_line, root_cause
from pipeline.shared_storage import StorageMarker
from pipeline.tensorboard_log import TENSORBOARD_DIR
from pipeline.train_job import TrainJob, steps_per_epoch
from pipeline.train_loop import train_loop_per_worker
from pipeline.train_output import export_model, latest_checkpoint, schedule_finished
from pipeline.weight_init import initialise_from
from pipeline.worker_sizing import default_worker_cpus, warn_if_too_small

# Checkpoints kept in storage; older ones are deleted by Ray Train as new ones are reported.
KEEP_CHECKPOINTS = 2
# Of a `max_minutes` budget, the seconds left after the last step for the final checkpoint, Ray
# Train stopping its workers and the export of the model.
FINISH_RESERVE_S = 10.0
# Ray Train routes `print` in its workers to a logger and also tees it when stdout is redirected,
# which prints our epoch lines twice and lets pycocotools' output through `evaluate_coco`'s
# `redirect_stdout`. Plain prints reach the driver through Ray's log forwarding anyway.
WORKER_ENV = {TRAIN_PRINT_PATCH_ENV: "0"}


class TrainingError(Exception):
    """Training could not run or did not finish; the message is one line."""


@dataclass(frozen=True)
class TrainOutcome:
    """What a run did: epochs trained in total, whether this invocation trained any, the export."""

    epochs: int
    trained: bool
    model_uri: str
    final_metrics: dict | None


def check_init_weights(job: TrainJob, num_classes: int) -> None:
    """Raise `mrcnn.weights.WeightsError` unless `job.init_weights` can initialise the model."""
    model = build_model(job.preset, num_classes, roi_op=job.roi_op, mask_loss=job.mask_loss)
    initialise_from(model, job.init_weights, log=False)


def check_backbone_weights(job: TrainJob) -> None:
    """Raise `mrcnn.weights.WeightsError` (one line) when the job starts from ImageNet weights
    that are neither in this node's torch hub cache nor downloadable from it.

    The workers load the file where they run; a node without network must find it in its cache.
    """
    if job.backbone_start == "imagenet":
        ensure_imagenet_weights(job.preset)


def run_training(
    job: TrainJob,
    train_data: CocoDataset,
    val_data: CocoDataset | None,
    *,
    joined_cluster: bool = False,
    output_marker: StorageMarker | None = None,
    started: float | None = None,
) -> TrainOutcome:
    """Train (or resume) with Ray Train, then export the model. Ray must be initialised.

    `joined_cluster`: the Ray is a cluster the job joined (see `pipeline.ray_runtime.RaySession`);
    `output_marker`: for a local output on a cluster, the marker each worker must see
    (`pipeline.shared_storage`); `started`: the Unix time `job.max_minutes` counts from (default:
    now).
    """
    import ray
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    from pipeline.train_data import training_dataset, validation_dataset

    started = time.time() if started is None else started
    filesystem, path = storage.resolve(job.output)
    epoch_steps = steps_per_epoch(job, len(train_data.images))
    previous = latest_checkpoint(filesystem, path)
    if previous is not None and schedule_finished(job, previous[2], epoch_steps):
        say(f"train: {job.output} already holds {previous[1]} trained epochs; exporting its model")
        return _finish(job, train_data, previous[0], previous[1], trained=False, metrics=None)
    if previous is not None:
        say(
            f"train: resuming from checkpoint {storage.to_uri(filesystem, previous[0].path)} "
            f"(epoch {previous[1]} of {job.epochs} done)"
        )
    pretrained = job.backbone_start == "imagenet" or bool(job.init_weights)

    if job.use_gpu and not joined_cluster and ray.cluster_resources().get("GPU", 0) < 1:
        raise TrainingError(
            "--use-gpu: the local Ray of this machine has no GPU (torch sees no CUDA device here); "
            "leave --use-gpu out to train on the CPU, or set RAY_ADDRESS to a cluster with GPU nodes"
        )
    cpus_per_worker = job.cpus_per_worker or default_worker_cpus(job.num_workers, job.use_gpu)
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if job.use_gpu else {})}
    if joined_cluster:
        way_out = (
            "leave --use-gpu out to train on CPUs, or give the cluster a node type with a GPU"
            if job.use_gpu
            else "lower --cpus-per-worker, or give the cluster a node type that holds it"
        )
        require_placement(resources, "a training worker", way_out)
    warn_if_too_small(job, cpus_per_worker)
    fail_after_epoch, fail_after_step = fault_injection.requested()
    val_parts = min(job.num_workers, len(val_data.images)) if val_data is not None else 1
    config = LoopConfig(
        preset=job.preset,
        num_classes=len(train_data.categories) + 1,
        roi_op=job.roi_op,
        mask_loss=job.mask_loss,
        categories=train_data.categories,
        epochs=job.epochs,
        batch_size=job.batch_size,
        optimizer=job.optimizer,
        peak_lr=job.peak_lr,
        momentum=job.momentum,
        weight_decay=job.weight_decay,
        warmup_iters=job.warmup_iters,
        lr_schedule=job.lr_schedule,
        steps_per_epoch=epoch_steps,
        amp=job.amp,
        torch_threads=max(1, round(cpus_per_worker)),
        seed=job.seed,
        init_weights=job.init_weights,
        metrics_uri=storage.join(job.output, METRICS_FILE),
        validate=val_data is not None,
        backbone_weights=job.backbone_start,
        trainable_backbone_layers=trainable_layers(pretrained, job.trainable_backbone_layers),
        checkpoint_every=job.checkpoint_every,
        validate_every=job.validate_every,
        log_every=job.log_every,
        val_parts=val_parts,
        tensorboard_uri=storage.join(job.output, TENSORBOARD_DIR),
        fail_after_epoch=fail_after_epoch,
        fail_after_step=fail_after_step,
        output_marker=output_marker,
        max_steps=job.max_steps,
        time_budget=None
        if job.max_minutes is None
        else TimeBudget(started=started, seconds=job.max_minutes * 60, reserve_s=FINISH_RESERVE_S),
    )
    datasets = {"train": training_dataset(train_data, exif_orientation=job.exif_orientation)}
    if val_data is not None:
        # One part of the validation images per worker (`pipeline.validation`).
        for part in range(val_parts):
            datasets[f"val_{part}"] = validation_dataset(
                val_data, part=part, parts=val_parts, exif_orientation=job.exif_orientation
            )
    val_ground_truth = val_data.evaluation_ground_truth() if val_data is not None else None
    trainer = TorchTrainer(
        train_loop_per_worker,
        torch_config=cuda_checked_torch_config() if job.use_gpu else None,
        train_loop_config={"config": config, "val_ground_truth": val_ground_truth},
        scaling_config=ScalingConfig(
            num_workers=job.num_workers, use_gpu=job.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=CHECKPOINTS_NAME,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(
                max_failures=job.max_failures,
                controller_failure_limit=worker_group_start_retries(job.resource_timeout_s),
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
            # Ray Train's INFO lines (device moves, DDP wrapping, report bookkeeping) would bury the
            # one line per epoch we print. Ray 2.60 still prints "Reporting training result" for
            # each report: that logger is named after its file, outside "ray.train".
            logging_config=LoggingConfig(log_level="WARNING"),
            worker_runtime_env={"env_vars": WORKER_ENV},
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    say(
        f"train: {job.num_workers} workers x {job.batch_size} images, {cpus_per_worker:g} CPUs"
        f"{' + 1 GPU' if job.use_gpu else ''} each, peak lr {config.peak_lr:g}, {epoch_steps} steps/epoch, "
        f"{len(train_data.images)} training images; the Ray cluster has "
        f"{ray.cluster_resources().get('CPU', 0):g} CPUs"
    )
    if job.max_minutes is not None:
        say(
            f"train: budget {job.max_minutes:g} min: the step time measured over the first "
            f"{CALIBRATION_STEPS} steps plans how many of at most {config.total_steps} fit"
        )
    # On a cluster, a line a minute until a worker speaks: the workers were placed.
    waiting = WaitReport(
        say, f"{job.num_workers} training worker(s)", resources, job.resource_timeout_s,
        done=lambda: job_log.relayed_lines() > 0,
    )  # fmt: skip
    try:
        if joined_cluster:
            waiting.start()
        result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        if is_worker_group_start_timeout(root_cause(error)):
            raise TrainingError(
                f"the cluster gave no room for {job.num_workers} workers of {cpus_per_worker:g} CPUs"
                f"{' and 1 GPU' if job.use_gpu else ''} within {job.resource_timeout_s:g} s: no node "
                f"has them free and none was added (an autoscaler without a node type that fits, or "
                f"at its max_workers); lower --num-workers/--cpus-per-worker or add such nodes"
            ) from error
        raise TrainingError(f"training failed: {one_line(error)}") from error
    finally:
        waiting.stop()
    if result.checkpoint is None:
        raise TrainingError("training reported no checkpoint")
    epochs = int(result.metrics["epoch"])
    return _finish(job, train_data, result.checkpoint, epochs, trained=True, metrics=result.metrics)


def _finish(job, train_data, checkpoint, epochs, *, trained, metrics) -> TrainOutcome:
    model_uri = export_model(checkpoint, job, train_data)
    return TrainOutcome(epochs=epochs, trained=trained, model_uri=model_uri, final_metrics=metrics)
