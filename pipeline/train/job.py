"""Run a Mask R-CNN training on Ray Train: plan, workers, storage, failures, resume and export.

`run_training` is a short sequence of named steps:
1. `_finished_already`: a run whose schedule is done only exports its model again.
2. `plan_run`: what the run decides once from its data and its cluster (`TrainPlan`): CPUs per
   worker, steps, validation parts, the time budget, and, on a cluster the job joined, that
   something can ever hold a worker (`pipeline.cluster.placement`).
3. `_trainer`: a `TorchTrainer` running `pipeline.train.loop.train_loop_per_worker` on
   `num_workers` workers (DDP), each reading its shard of the Ray Data training set
   (`pipeline.train.data`), with checkpoints in the run folder (`pipeline.train.run_folder`) on
   local disk or S3 through `mrcnn.storage`'s filesystem (so the S3 retries apply).
4. `_fit`: Ray Train's run, with a line a minute while the workers wait for room, and its failures
   as one line.
5. the export of the latest checkpoint's model to `<output>/model/`.

A worker that dies is replaced and training resumes from the latest checkpoint, up to
`max_failures` times (`FailureConfig`); a new run of the same command on the same output resumes
the same way, since a new `TorchTrainer` on the same storage path and name finds Ray's record of
the checkpoints.

Resources follow the flags, not the cluster as it is at the start (a cluster whose GPU nodes
scale from zero holds only its head then):
- `--use-gpu` requests one GPU per worker on a cluster the job joined, whatever it holds now, so
  that its autoscaler launches GPU nodes; a worker whose torch then sees no CUDA device fails
  before training with one line naming its node (`pipeline.cluster.ray_compat.
  cuda_checked_torch_config`). On the job's own local Ray, `--use-gpu` on a machine without GPUs
  is an error at once.
- CPUs per worker (also its torch threads, since Ray sets `OMP_NUM_THREADS=1` in its workers):
  `--cpus-per-worker`, else sized from the cluster (`pipeline.train.workers`).
- Ray Train retries a worker group that cannot be placed every 60 s and, by default, forever; the
  run gives up after `resource_timeout_s` with one line instead.

Time and step budgets: `max_steps` ends the run (and its learning-rate schedule) after that many
steps, mid-epoch if need be; `max_minutes` plans the steps that fit in that many minutes from the
job's start at the step time the workers measure (`pipeline.train.budget`), the final checkpoint
and the export included. The plan travels in the checkpoints, so a re-run resumes it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from mrcnn import storage
from mrcnn.backbone import ensure_imagenet_weights
from mrcnn.coco import CocoDataset
from mrcnn.errors import RunError
from pipeline.cluster import job_log
from pipeline.cluster.job_log import say
from pipeline.cluster.placement import WaitReport, require_placement
from pipeline.cluster.ray_compat import (
    TRAIN_PRINT_PATCH_ENV,
    cuda_checked_torch_config,
    is_worker_group_start_timeout,
    worker_group_start_retries,
)
from pipeline.cluster.ray_errors import cause_line, root_cause
from pipeline.cluster.shared_storage import StorageMarker
from pipeline.train import fault_injection
from pipeline.train.budget import CALIBRATION_STEPS, TimeBudget
from pipeline.train.config import TrainConfig, TrainPlan
from pipeline.train.run_folder import CHECKPOINTS_NAME, RunFolder, export_model, schedule_finished
from pipeline.train.workers import default_worker_cpus, warn_if_too_small

# Checkpoints kept in storage; older ones are deleted by Ray Train as new ones are reported.
KEEP_CHECKPOINTS = 2
# Of a `max_minutes` budget, the seconds left after the last step for the final checkpoint, Ray
# Train stopping its workers and the export of the model.
FINISH_RESERVE_S = 10.0
# Ray Train routes `print` in its workers to a logger and also tees it when stdout is redirected,
# which prints our epoch lines twice and lets pycocotools' output through `evaluate_coco`'s
# `redirect_stdout`.
WORKER_ENV = {TRAIN_PRINT_PATCH_ENV: "0"}


class TrainingError(RunError):
    """Training could not run or did not finish; the message is one line."""


@dataclass(frozen=True)
class TrainOutcome:
    """What a run did: epochs trained in total, whether this invocation trained any, the export."""

    epochs: int
    trained: bool
    model_uri: str
    final_metrics: dict | None


def check_weights(config: TrainConfig, num_classes: int) -> None:
    """Raise `mrcnn.weights.WeightsError` (one line) unless the weights the run starts from can be
    read here: `--init-weights` must fit the model; ImageNet weights must be in this node's torch
    hub cache or downloadable into it (the workers load the file where they run)."""
    if config.init_weights:
        from mrcnn.model import build_model
        from pipeline.train.weight_init import initialise_from

        model = build_model(config.preset, num_classes, roi_op=config.roi_op, mask_loss=config.mask_loss)
        initialise_from(model, config.init_weights, log=False)
    elif config.backbone_start == "imagenet":
        ensure_imagenet_weights(config.preset)


def is_finished(config: TrainConfig, last: dict, num_images: int) -> bool:
    """Whether a run of `config` whose last epoch record or checkpoint report is `last` is done."""
    steps, budgeted = config.steps_per_epoch(num_images), config.max_minutes is not None
    return schedule_finished(last, steps, config.epochs, config.max_steps, budgeted)


def run_training(
    config: TrainConfig,
    train_data: CocoDataset,
    val_data: CocoDataset | None,
    *,
    joined_cluster: bool = False,
    output_marker: StorageMarker | None = None,
    started: float | None = None,
) -> TrainOutcome:
    """Train (or resume) with Ray Train, then export the model. Ray must be initialised.

    `joined_cluster`: the Ray is a cluster the job joined (`pipeline.cluster.session.RaySession`);
    `output_marker`: for a local output on a cluster, the marker each worker must see
    (`pipeline.cluster.shared_storage`); `started`: the Unix time `config.max_minutes` counts from
    (default: now).
    """
    folder = RunFolder(config.output)
    finished = _finished_already(config, folder, len(train_data.images))
    if finished is not None:
        return _export(config, folder, train_data, *finished, trained=False, metrics=None)
    plan = plan_run(config, train_data, val_data, joined_cluster, output_marker, started)
    trainer = _trainer(config, plan, folder, train_data, val_data)
    result = _fit(trainer, config, plan, joined_cluster, len(train_data.images))
    if result.checkpoint is None:
        raise TrainingError("training reported no checkpoint")
    epochs, metrics = int(result.metrics["epoch"]), result.metrics
    return _export(config, folder, train_data, result.checkpoint, epochs, trained=True, metrics=metrics)


def _finished_already(config: TrainConfig, folder: RunFolder, num_images: int):
    """(checkpoint, epochs) of a run whose schedule is done, else None (saying it resumes)."""
    previous = folder.latest_checkpoint()
    if previous is None:
        return None
    checkpoint, epochs, metrics = previous
    if is_finished(config, metrics, num_images):
        say(f"train: {config.output} already holds {epochs} trained epochs; exporting its model")
        return checkpoint, epochs
    filesystem, _ = storage.resolve(config.output)
    say(
        f"train: resuming from checkpoint {storage.to_uri(filesystem, checkpoint.path)} "
        f"(epoch {epochs} of {config.epochs} done)"
    )
    return None


def plan_run(
    config: TrainConfig,
    train_data: CocoDataset,
    val_data: CocoDataset | None,
    joined_cluster: bool,
    output_marker: StorageMarker | None,
    started: float | None,
) -> TrainPlan:
    """The run's `TrainPlan`, decided once on the driver from the data and the cluster."""
    import ray

    if config.use_gpu and not joined_cluster and ray.cluster_resources().get("GPU", 0) < 1:
        raise TrainingError(
            "--use-gpu: the local Ray of this machine has no GPU (torch sees no CUDA device here); "
            "leave --use-gpu out to train on the CPU, or set RAY_ADDRESS to a cluster with GPU nodes"
        )
    cpus = config.cpus_per_worker or default_worker_cpus(config.num_workers, config.use_gpu)
    if joined_cluster:
        way_out = (
            "leave --use-gpu out to train on CPUs, or give the cluster a node type with a GPU"
            if config.use_gpu
            else "lower --cpus-per-worker, or give the cluster a node type that holds it"
        )
        require_placement(_worker_bundle(config, cpus), "a training worker", way_out)
    warn_if_too_small(config.num_workers, cpus, config.use_gpu, config.resource_timeout_s)
    steps = config.steps_per_epoch(len(train_data.images))
    budget = None
    if config.max_minutes is not None:
        since = time.time() if started is None else started
        budget = TimeBudget(started=since, seconds=config.max_minutes * 60, reserve_s=FINISH_RESERVE_S)
    return TrainPlan(
        categories=train_data.categories,
        steps_per_epoch=steps,
        total_steps=config.total_steps(steps),
        cpus_per_worker=cpus,
        val_parts=min(config.num_workers, len(val_data.images)) if val_data is not None else 0,
        output_marker=output_marker,
        time_budget=budget,
        fault_injection=fault_injection.requested(),
    )


def _worker_bundle(config: TrainConfig, cpus: float) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": 1.0} if config.use_gpu else {})}


def _trainer(config: TrainConfig, plan: TrainPlan, folder: RunFolder, train_data, val_data):
    """The `TorchTrainer` of the run: its datasets, workers, storage and failure policy."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.train.data import training_dataset, validation_dataset
    from pipeline.train.loop import train_loop_per_worker

    datasets = {"train": training_dataset(train_data, exif_orientation=config.exif_orientation)}
    for part in range(plan.val_parts):  # one part of the validation images per worker
        datasets[f"val_{part}"] = validation_dataset(
            val_data, part=part, parts=plan.val_parts, exif_orientation=config.exif_orientation
        )
    filesystem, path = storage.resolve(folder.uri)
    return TorchTrainer(
        train_loop_per_worker,
        torch_config=cuda_checked_torch_config() if config.use_gpu else None,
        train_loop_config={
            "config": config,
            "plan": plan,
            "val_ground_truth": val_data.evaluation_ground_truth() if val_data is not None else None,
        },
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker=_worker_bundle(config, plan.cpus_per_worker),
        ),
        run_config=RunConfig(
            name=CHECKPOINTS_NAME,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(
                max_failures=config.max_failures,
                controller_failure_limit=worker_group_start_retries(config.resource_timeout_s),
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
            # Ray Train's INFO lines (device moves, DDP wrapping, report bookkeeping) would bury
            # the one line per epoch we print.
            logging_config=LoggingConfig(log_level="WARNING"),
            worker_runtime_env={"env_vars": WORKER_ENV},
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )


def _fit(trainer, config: TrainConfig, plan: TrainPlan, joined_cluster: bool, num_images: int):
    """`trainer.fit()`, announced, with a line a minute on a cluster until a worker speaks, and
    Ray Train's failures as `TrainingError`."""
    import ray

    gpu = " + 1 GPU" if config.use_gpu else ""
    say(
        f"train: {config.num_workers} workers x {config.batch_size} images, {plan.cpus_per_worker:g} CPUs"
        f"{gpu} each, peak lr {config.peak_lr:g}, {plan.steps_per_epoch} steps/epoch, "
        f"{num_images} training images; the Ray cluster has {ray.cluster_resources().get('CPU', 0):g} CPUs"
    )
    if config.max_minutes is not None:
        say(
            f"train: budget {config.max_minutes:g} min: the step time measured over the first "
            f"{CALIBRATION_STEPS} steps plans how many of at most {plan.total_steps} fit"
        )
    waiting = WaitReport(
        say, f"{config.num_workers} training worker(s)", _worker_bundle(config, plan.cpus_per_worker),
        config.resource_timeout_s, done=lambda: job_log.relayed_lines() > 0,
    )  # fmt: skip
    try:
        if joined_cluster:
            waiting.start()
        return trainer.fit()
    except ray.train.TrainingFailedError as error:
        if is_worker_group_start_timeout(root_cause(error)):
            raise TrainingError(
                f"the cluster gave no room for {config.num_workers} workers of {plan.cpus_per_worker:g} "
                f"CPUs{gpu.replace(' + ', ' and ')} within {config.resource_timeout_s:g} s: no node has "
                f"them free and none was added (an autoscaler without a node type that fits, or at "
                f"its max_workers); lower --num-workers/--cpus-per-worker or add such nodes"
            ) from error
        raise TrainingError(f"training failed: {cause_line(error)}") from error
    finally:
        waiting.stop()


def _export(config, folder, train_data, checkpoint, epochs, *, trained, metrics) -> TrainOutcome:
    model_uri = export_model(
        checkpoint, folder, config.preset, config.roi_op, config.mask_loss, train_data.categories
    )
    return TrainOutcome(epochs=epochs, trained=trained, model_uri=model_uri, final_metrics=metrics)
