"""The training function each Ray Train worker runs: DDP Mask R-CNN over its shard of the data.

Every worker builds the same model (same seed), resumes from `ray.train.get_checkpoint()` when
there is one (after a worker failure, or when the command is re-run on the same output), and
trains on the batches of its own shard of the training dataset (`get_dataset_shard("train")`).
After each epoch the loss terms are averaged over all workers; rank 0 evaluates on the
validation set (if any), saves the training state as a checkpoint, reports it to Ray Train and
rewrites `metrics.jsonl`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointConsistencyMode

from mrcnn import build_model, storage
from mrcnn.categories import Category
from mrcnn.evaluation import detections_from_prediction, evaluate_coco
from mrcnn.rle import masks_to_rle
from mrcnn.weights import read_state_dict
from pipeline.budget import Schedule, TimeBudget
from pipeline.checkpoints import load_state, save_state
from pipeline.metrics import LOSS_NAMES, format_epoch, write_history
from pipeline.shared_storage import StorageMarker
from pipeline.train_data import TrainingCollate, ValidationCollate

# Warm-up starts at this fraction of the learning rate and rises linearly (torchvision's reference).
WARMUP_START = 0.001
# "step" schedule: the learning rate drops 10x at these fractions of the run (torchvision's
# reference drops at epochs 16 and 22 of 26).
STEP_MILESTONES = (16 / 26, 22 / 26)
# Rows each worker keeps in its local shuffle buffer, in batches.
SHUFFLE_BATCHES = 4


@dataclass(frozen=True)
class LoopConfig:
    """Everything the per-worker training function needs; plain values, sent to every worker.

    `lr` is the peak learning rate of the whole (DDP) batch, already scaled; `steps_per_epoch` is
    the number of optimizer steps of one epoch on each worker. The schedule runs over
    `epochs * steps_per_epoch` steps, or `max_steps` if fewer (the last epoch then ends early);
    with a `time_budget`, over the steps planned to fit it (`pipeline.budget`), at most those.
    `categories[i - 1]` is the category of the model's label `i`.
    """

    preset: str
    num_classes: int
    roi_op: str
    mask_loss: str
    categories: tuple[Category, ...]
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    warmup_iters: int
    lr_schedule: str
    steps_per_epoch: int
    amp: bool
    torch_threads: int
    seed: int
    init_weights: str | None
    metrics_uri: str
    validate: bool
    fail_after_epoch: int | None = None
    output_marker: StorageMarker | None = None
    max_steps: int | None = None
    time_budget: TimeBudget | None = None


def schedule_steps(config: LoopConfig) -> int:
    """The most optimizer steps the run may take: its epochs, or `max_steps` if fewer."""
    total = max(1, config.epochs * config.steps_per_epoch)
    return total if config.max_steps is None else min(total, config.max_steps)


def make_optimizer(params: list[torch.nn.Parameter], config: LoopConfig) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's), or AdamW (`momentum` is then its beta1)."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=config.lr, betas=(config.momentum, 0.999), weight_decay=config.weight_decay
        )
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def lr_factor(step: int, config: LoopConfig, total: int | None = None) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based) of `total` steps.

    `total` defaults to `schedule_steps(config)`; a time budget passes the planned steps. The
    warm-up takes at most a quarter of the schedule, so a short plan still decays.
    """
    total = max(1, total or schedule_steps(config))
    progress = min(step, total) / total
    if config.lr_schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 0.1 ** sum(progress >= milestone for milestone in STEP_MILESTONES)
    warmup = min(config.warmup_iters, max(1, total // 4))
    if step < warmup:
        decay *= WARMUP_START + (1.0 - WARMUP_START) * step / warmup
    return decay


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's per-worker function.

    `loop_config["config"]` is a `LoopConfig`; with `config.validate`,
    `loop_config["val_ground_truth"]` is the COCO dict the validation AP is computed against.
    """
    config: LoopConfig = loop_config["config"]
    if config.output_marker is not None:
        # A worker on a node that does not share the driver's local output would write its
        # checkpoints and metrics to a disk of its own.
        config.output_marker.verify()
    torch.set_num_threads(config.torch_threads)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()

    torch.manual_seed(config.seed)
    model = build_model(config.preset, config.num_classes, roi_op=config.roi_op, mask_loss=config.mask_loss)
    state = _resume_state(rank)
    if state is not None:
        model.load_state_dict(state["model"])
    elif config.init_weights:
        initialise_from(model, config.init_weights, log=rank == 0)
    # Before DDP wraps the model: DDP must only see the parameters that will get gradients.
    set_training_mode(model, config)
    # The same weights everywhere (DDP also broadcasts rank 0's), a different RoI sampling each.
    torch.manual_seed(config.seed + 1000 * (rank + 1))
    ddp_model = ray.train.torch.prepare_model(model)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config)
    start_epoch, history = 0, []
    if state is not None:
        start_epoch, history = int(state["epoch"]), list(state["history"])
    schedule = Schedule(
        schedule_steps(config),
        budget=config.time_budget,
        history=history,
        min_steps=4 * config.warmup_iters,
        images_per_step=config.batch_size * context.get_world_size(),
        announce=rank == 0,
    )
    # A closure, not an object: LambdaLR saves an object's fields in its state_dict and would
    # bring back the old schedule when a run resumes with more epochs or a new plan.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config, schedule.steps)
    )
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    schedule.start(first_step=scheduler.last_epoch)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if config.validate else None
    for epoch in range(start_epoch + 1, config.epochs + 1):
        if scheduler.last_epoch >= schedule.steps:
            break
        metrics = _train_one_epoch(ddp_model, optimizer, scheduler, train_shard, device, config, schedule)
        metrics = {"epoch": epoch, **metrics, **schedule.record(scheduler.last_epoch)}
        if val_shard is not None and rank == 0:
            started = time.perf_counter()
            metrics.update(evaluate(model, val_shard, loop_config["val_ground_truth"], device, config))
            metrics["val_seconds"] = time.perf_counter() - started
        history.append(metrics)
        _report(epoch, metrics, history, model, optimizer, scheduler, config, rank)
        if rank == 0:
            # Ray Train registers a report when its controller next polls the workers; until
            # then a worker that dies loses it. Waiting for the registration keeps metrics.jsonl
            # (and the driver's "already complete" check that reads it) behind the checkpoints.
            ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
            write_history(config.metrics_uri, history)
            print(f"train: {format_epoch(metrics, config.epochs)}", flush=True)
            if config.fail_after_epoch == epoch and start_epoch < epoch:
                # Fault injection for the resume tests: this worker process dies as if killed.
                print(f"train: worker exits on purpose after epoch {epoch} (fault injection)", flush=True)
                os._exit(1)


def _resume_state(rank: int) -> dict | None:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        state = load_state(directory)
    if rank == 0:
        uri = storage.to_uri(checkpoint.filesystem, checkpoint.path)
        print(f"train: resuming from checkpoint {uri} (epoch {int(state['epoch'])} done)", flush=True)
    return state


def initialise_from(model: torch.nn.Module, uri: str, *, log: bool) -> tuple[int, int]:
    """Copy into `model` every tensor of the weights at `uri` whose name and shape match.

    Class-specific layers (the box and mask predictors) differ between a COCO checkpoint and a
    model of other categories; they keep their random initialisation. Returns (copied, total
    tensors of the model); raises `mrcnn.weights.WeightsError` when nothing matches.
    """
    from mrcnn.weights import WeightsError

    source = read_state_dict(uri)
    own = model.state_dict()
    matching = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    if not matching:
        raise WeightsError(f"{uri}: no tensor fits the model (names or shapes all differ)")
    model.load_state_dict(matching, strict=False)
    if log:
        print(
            f"train: initialised {len(matching)} of {len(own)} tensors from {uri} "
            f"(the rest, e.g. {sorted(set(own) - set(matching))[:3]}, stay random)",
            flush=True,
        )
    return len(matching), len(own)


def set_training_mode(model: torch.nn.Module, config: LoopConfig) -> None:
    """`model.train()`, except that a backbone initialised from weights keeps its BatchNorm frozen.

    Batch statistics of a few images per worker would overwrite the running statistics the
    weights were trained with, so, as torchvision's reference does for pretrained backbones, the
    ResNet's BatchNorm layers then normalise with their stored statistics and are not trained.
    """
    model.train()
    if config.init_weights:
        for module in model.backbone.body.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()
                module.requires_grad_(False)


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _train_one_epoch(model, optimizer, scheduler, shard, device, config: LoopConfig, schedule) -> dict:
    """One pass over this worker's shard, or up to the schedule's last step; loss means and
    throughput over all workers."""
    set_training_mode(getattr(model, "module", model), config)
    # Per worker, summed over workers below: the loss terms, then steps, images, and the seconds
    # spent waiting for the next batch (the input pipeline's share of the epoch).
    sums = torch.zeros(len(LOSS_NAMES) + 3, dtype=torch.float64)
    started = time.perf_counter()
    batches = shard.iter_torch_batches(
        batch_size=config.batch_size,
        collate_fn=TrainingCollate(),
        local_shuffle_buffer_size=config.batch_size * SHUFFLE_BATCHES,
        prefetch_batches=2,
    )
    for images, targets, waited in _timed(batches):
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        with _autocast(device, config.amp):
            losses = model(images, targets)
        loss = sum(losses[name] for name in LOSS_NAMES)
        values = torch.stack([losses[name].detach().float() for name in LOSS_NAMES]).cpu()
        if not torch.isfinite(values).all():
            raise FloatingPointError(
                f"loss is not finite ({dict(zip(LOSS_NAMES, values.tolist(), strict=True))}) at "
                f"lr {scheduler.get_last_lr()[0]:.5f}; try a lower --lr or more --warmup-iters"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # Before the scheduler steps, so that the next step's learning rate follows a new plan.
        schedule.after_step(scheduler.last_epoch + 1, device)
        scheduler.step()
        sums[: len(LOSS_NAMES)] += values.double()
        sums[-3:] += torch.tensor([1.0, len(images), waited], dtype=torch.float64)
        if scheduler.last_epoch >= schedule.steps:
            break
    seconds = time.perf_counter() - started
    workers = 1
    if dist.is_available() and dist.is_initialized():
        workers = dist.get_world_size()
        reduce_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
        totals = sums.to(reduce_device)
        dist.all_reduce(totals)
        elapsed = torch.tensor([seconds], dtype=torch.float64, device=reduce_device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        sums, seconds = totals.cpu(), float(elapsed.item())
    steps, images = max(1.0, float(sums[-3])), int(sums[-2])
    means = {name: float(sums[i]) / steps for i, name in enumerate(LOSS_NAMES)}
    return {
        "loss": sum(means.values()),
        **means,
        "lr": scheduler.get_last_lr()[0],
        "images": images,
        "seconds": seconds,
        "images_per_second": images / seconds if seconds > 0 else 0.0,
        "data_wait_seconds": float(sums[-1]) / workers,
    }


def _timed(batches):
    """Yield `(images, targets, seconds waited for them)` for each batch of `batches`."""
    iterator = iter(batches)
    while True:
        started = time.perf_counter()
        try:
            images, targets = next(iterator)
        except StopIteration:
            return
        yield images, targets, time.perf_counter() - started


@torch.inference_mode()
def evaluate(model, shard, ground_truth: dict, device: torch.device, config: LoopConfig) -> dict:
    """COCO bbox and segm stats of `model` (not DDP-wrapped) on the images of `shard`.

    Masks are encoded from the per-RoI probabilities (`paste_masks = False` + `masks_to_rle`)
    rather than pasted into full-size images, which is the slow part of inference on a CPU.
    """
    model.eval()
    model.paste_masks = False
    detections = []
    try:
        for image_ids, images in shard.iter_torch_batches(
            batch_size=config.batch_size, collate_fn=ValidationCollate(), prefetch_batches=2
        ):
            with _autocast(device, config.amp):
                outputs = model([image.to(device, non_blocking=True) for image in images])
            for image_id, image, output in zip(image_ids, images, outputs, strict=True):
                height, width = image.shape[-2:]
                boxes = output["boxes"].float()
                counts = masks_to_rle(output["mask_probs"].float(), boxes, height, width)
                category_ids = [config.categories[label - 1].id for label in output["labels"].tolist()]
                detections += detections_from_prediction(
                    image_id, boxes, output["scores"].float(), category_ids, counts, height, width
                )
    finally:
        model.paste_masks = True
        set_training_mode(model, config)
    return evaluate_coco(ground_truth, detections)


def _report(epoch, metrics, history, model, optimizer, scheduler, config: LoopConfig, rank: int) -> None:
    """Report this epoch to Ray Train, with rank 0's training state as the checkpoint.

    Only a few numbers go with the report (Ray logs each report); `metrics.jsonl` has them all.
    """
    summary = {"epoch": epoch, "loss": metrics["loss"], "step": metrics["step"]}
    summary.update(planned_steps=metrics["planned_steps"], budgeted="plan" in metrics)
    summary.update({f"{t}_AP": metrics[t]["AP"] for t in ("bbox", "segm") if t in metrics})
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            save_state(
                directory,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch,
                    "history": history,
                    "config": json.dumps(asdict(config)),
                },
            )
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(summary, checkpoint=checkpoint, checkpoint_dir_name=f"epoch-{epoch:04d}")
