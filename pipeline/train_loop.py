"""The training function each Ray Train worker runs: DDP Mask R-CNN over its shard of the data.

Every worker builds the same model (same seed) and starts it from, in this order of precedence,
`ray.train.get_checkpoint()` (after a worker failure, or when the command is re-run on the same
output), `--init-weights` (`pipeline.weight_init`), or the ImageNet backbone (`mrcnn.backbone`);
it then trains with the optimizer and learning-rate schedule of `pipeline.optimizer` on the
batches of its own shard of the training dataset (`get_dataset_shard("train")`), under the
project's autocast policy (`mrcnn.precision`; fp16 with a gradient scaler). Along the way, all
workers together:
- every `log_every` steps average the loss terms and throughput since the last log; rank 0
  appends a step record to `metrics.jsonl`, writes TensorBoard scalars and prints one line;
- every `validate_every` steps and at each epoch's end validate, each worker on its own part of
  the validation images, rank 0 scoring them all (`pipeline.validation`);
- every `checkpoint_every` steps and at each epoch's end report a checkpoint of rank 0's training
  state to Ray Train (after which a test may have rank 0 exit, `pipeline.fault_injection`).

A run resumed from a checkpoint taken mid-epoch trains that epoch's remaining steps on a new
pass over the shuffled training set (Ray Data cannot restart a pass at a position): of that one
epoch, at most as many images as the steps done before the checkpoint held (steps x batch size
x workers) are seen twice and as many not at all; every other epoch sees each image once. The
number of optimizer steps, and so the learning-rate schedule, is exactly the plan's.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointConsistencyMode

from mrcnn import build_model, storage
from mrcnn.backbone import load_imagenet_backbone
from mrcnn.precision import autocast
from pipeline import fault_injection
from pipeline.budget import Schedule
from pipeline.checkpoints import load_state, save_state
from pipeline.gpu import node_description
from pipeline.job_log import say
from pipeline.loop_config import LoopConfig
from pipeline.metrics import LOSS_NAMES, format_ap, format_epoch, format_step, write_history
from pipeline.optimizer import lr_factor, make_optimizer
from pipeline.tensorboard_log import TensorBoardLog
from pipeline.train_data import TrainingCollate, ValidationCollate
from pipeline.validation import detect, gather_and_score
from pipeline.weight_init import initialise_from, set_training_mode

# Rows each worker keeps in its local shuffle buffer, in batches.
SHUFFLE_BATCHES = 4


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
    _Run(config, loop_config.get("val_ground_truth")).train()


class _Run:
    """One worker's share of a run: the model, optimizer and schedule, and where the run stands.

    `step` counts optimizer steps of the whole run, `epoch_step` those of the epoch in progress;
    `history` (rank 0) is what `metrics.jsonl` holds; `schedule` is the learning-rate schedule's
    length, planned against the time budget if there is one (`pipeline.budget`). All four travel
    in every checkpoint. The run ends at the schedule's last step, within an epoch if need be.
    """

    def __init__(self, config: LoopConfig, ground_truth: dict | None) -> None:
        self.config = config
        self.ground_truth = ground_truth
        self.rank = ray.train.get_context().get_world_rank()
        self.device = ray.train.torch.get_device()

        torch.manual_seed(config.seed)
        model = build_model(
            config.preset, config.num_classes, roi_op=config.roi_op, mask_loss=config.mask_loss
        )
        state = _resume_state(self.rank)
        if state is not None:
            model.load_state_dict(state["model"])
        elif config.init_weights:
            initialise_from(model, config.init_weights, log=self.rank == 0, categories=config.categories)
        elif config.backbone_weights == "imagenet":
            # Here, on the worker's node: that is where the model lives (the hub cache or network).
            load_imagenet_backbone(model, config.preset)
        # Before DDP wraps the model: DDP must only see the parameters that will get gradients.
        set_training_mode(model, config)
        # The same weights everywhere (DDP also broadcasts rank 0's), a different RoI sampling each.
        torch.manual_seed(config.seed + 1000 * (self.rank + 1))
        self.model = model
        self.ddp_model = ray.train.torch.prepare_model(model)
        if self.rank == 0:
            world = ray.train.get_context().get_world_size()
            say(f"train: {world} worker(s) started; rank 0 on {node_description()}, {self.device}")

        self.optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], config)
        self.schedule = Schedule(
            config.total_steps,
            budget=config.time_budget,
            resumed=None if state is None else state.get("schedule"),
            min_steps=4 * config.warmup_iters,
            images_per_step=config.batch_size * ray.train.get_context().get_world_size(),
            announce=self.rank == 0,
        )
        # A closure, not an object: LambdaLR saves an object's fields in its state_dict and would
        # bring back the old schedule when a run resumes with more epochs or a new plan.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, config, self.schedule.steps)
        )
        # fp16 needs loss scaling (torchvision's reference); disabled, the scaler passes through.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        self.epochs_done, self.step, self.epoch_step, self.history = 0, 0, 0, []
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.epochs_done = int(state["epoch"])
            self.step = int(state.get("step", self.epochs_done * config.steps_per_epoch))
            self.epoch_step = int(state.get("epoch_step", 0))
            self.history = list(state["history"])
        self.start_step = self.step
        self.schedule.start(first_step=self.step)

        self.train_shard = ray.train.get_dataset_shard("train")
        self.val_shard = None
        if config.validate and self.rank < config.val_parts:
            self.val_shard = ray.train.get_dataset_shard(f"val_{self.rank}")
        self.tensorboard = None
        if self.rank == 0 and config.tensorboard_uri:
            resumed_step = self.step if state is not None else None
            self.tensorboard = TensorBoardLog(config.tensorboard_uri, resumed_step)
        # Loss terms, steps, images and seconds waited for data since the last step record.
        self.window = _zero_sums()
        self.window_started = time.perf_counter()

    def train(self) -> None:
        config = self.config
        for epoch in range(self.epochs_done + 1, config.epochs + 1):
            if self.step >= self.schedule.steps:
                break
            metrics = self._train_epoch(epoch)
            record = {"kind": "epoch", "epoch": epoch, **metrics, **self.schedule.record(self.step)}
            if config.validate:
                started = time.perf_counter()
                stats = self._validate()
                if stats is not None:
                    record.update(stats)
                    record["val_seconds"] = time.perf_counter() - started
            self.epochs_done, self.epoch_step = epoch, 0
            if self.rank == 0:
                self.history.append(record)
            summary = {"loss": metrics["loss"]}
            summary.update({f"{t}_AP": record[t]["AP"] for t in ("bbox", "segm") if t in record})
            self._checkpoint(f"epoch-{epoch:04d}", summary)
            if self.rank == 0:
                # Ray Train registers a report when its controller next polls the workers; until
                # then a worker that dies loses it. Waiting for the registration keeps the epoch
                # records of metrics.jsonl (and the driver's "already complete" check that reads
                # them) behind the checkpoints.
                ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
                write_history(config.metrics_uri, self.history)
                self._tensorboard_validation(record)
                say(f"train: {format_epoch(record, config.epochs)}")
                started_before = self.start_step <= (epoch - 1) * config.steps_per_epoch
                if config.fail_after_epoch == epoch and started_before:
                    fault_injection.exit_worker(f"epoch {epoch}")
        if self.tensorboard is not None:
            self.tensorboard.close()

    def _train_epoch(self, epoch: int) -> dict:
        """The epoch's remaining steps on this worker's shard; loss means and throughput over all."""
        config = self.config
        set_training_mode(self.model, config)
        # A resumed epoch trains only its remaining steps (see the module docstring).
        limit = config.steps_per_epoch - self.epoch_step if self.epoch_step else None
        sums = _zero_sums()
        started, paused = time.perf_counter(), 0.0
        batches = self.train_shard.iter_torch_batches(
            batch_size=config.batch_size,
            collate_fn=TrainingCollate(),
            local_shuffle_buffer_size=config.batch_size * SHUFFLE_BATCHES,
            prefetch_batches=2,
        )
        for taken, (images, targets, waited) in enumerate(_timed(batches), start=1):
            row = self._train_step(images, targets, waited)
            sums += row
            self.window += row
            paused += self._after_step(epoch)
            if (limit is not None and taken >= limit) or self.step >= self.schedule.steps:
                break
        sums, seconds, workers = _reduce(sums, time.perf_counter() - started - paused, self.device)
        return _means(sums, seconds, workers) | {"lr": self.scheduler.get_last_lr()[0]}

    def _train_step(self, images, targets, waited: float) -> torch.Tensor:
        """One optimizer step; returns its row of the sums (loss terms, 1 step, images, wait)."""
        images = [image.to(self.device, non_blocking=True) for image in images]
        targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in targets]
        with autocast(self.device, self.config.amp):
            losses = self.ddp_model(images, targets)
        loss = sum(losses[name] for name in LOSS_NAMES)
        values = torch.stack([losses[name].detach().float() for name in LOSS_NAMES]).cpu()
        if not torch.isfinite(values).all():
            raise FloatingPointError(
                f"loss is not finite ({dict(zip(LOSS_NAMES, values.tolist(), strict=True))}) at "
                f"lr {self.scheduler.get_last_lr()[0]:.5f}; try a lower --lr or more --warmup-iters"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # Before the scheduler steps, so that the next step's learning rate follows a new plan.
        self.schedule.after_step(self.step + 1, self.device)
        self.scheduler.step()
        self.step += 1
        self.epoch_step += 1
        extra = torch.tensor([1.0, len(images), waited], dtype=torch.float64)
        return torch.cat([values.double(), extra])

    def _after_step(self, epoch: int) -> float:
        """Log, validate and checkpoint as the step count says; returns the seconds spent on the
        last two (not training time). At an epoch's last step, and the schedule's, the epoch's end
        does those."""
        config = self.config
        if config.log_every and self.step % config.log_every == 0:
            self._log_step(epoch)
        if self.epoch_step >= config.steps_per_epoch or self.step >= self.schedule.steps:
            return 0.0
        started = time.perf_counter()
        if config.validate and config.validate_every and self.step % config.validate_every == 0:
            stats = self._validate()
            if stats is not None:
                record = {"kind": "validation", "step": self.step, "epoch": epoch, **stats}
                record["val_seconds"] = time.perf_counter() - started
                self.history.append(record)
                write_history(config.metrics_uri, self.history)
                self._tensorboard_validation(record)
                say(f"train: step {self.step} validation:{format_ap(record)}")
        if config.checkpoint_every and self.step % config.checkpoint_every == 0:
            self._checkpoint(f"step-{self.step:09d}", {})
            if self.rank == 0 and config.fail_after_step == self.step and self.start_step < self.step:
                ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
                fault_injection.exit_worker(f"step {self.step}")
        paused = time.perf_counter() - started
        self.window_started += paused
        return paused

    def _log_step(self, epoch: int) -> None:
        """A step record from the sums since the last one, over all workers (a collective)."""
        sums, seconds, workers = _reduce(self.window, time.perf_counter() - self.window_started, self.device)
        self.window, self.window_started = _zero_sums(), time.perf_counter()
        if self.rank != 0:
            return
        means = _means(sums, seconds, workers)
        record = {"kind": "step", "step": self.step, "epoch": epoch, "lr": self.scheduler.get_last_lr()[0]}
        record.update({k: means[k] for k in ("loss", *LOSS_NAMES, "images_per_second", "data_wait_seconds")})
        self.history.append(record)
        write_history(self.config.metrics_uri, self.history)
        if self.tensorboard is not None:
            scalars = {f"train/{k}": record[k] for k in ("loss", *LOSS_NAMES, "lr", "images_per_second")}
            self.tensorboard.scalars(self.step, scalars)
            self.tensorboard.flush()
        say(f"train: {format_step(record, self.schedule.steps, self.config.epochs)}")

    def _validate(self) -> dict | None:
        """COCO stats of the model on the validation set, on rank 0 (None elsewhere); a collective."""
        self.model.eval()
        images = 0

        def counted(batches):
            nonlocal images
            for image_ids, pixels in batches:
                images += len(image_ids)
                yield image_ids, pixels

        try:
            batches = []
            if self.val_shard is not None:
                batches = self.val_shard.iter_torch_batches(
                    batch_size=self.config.batch_size, collate_fn=ValidationCollate(), prefetch_batches=2
                )
            config = self.config
            detections = detect(self.model, counted(batches), config.categories, self.device, config.amp)
        finally:
            set_training_mode(self.model, self.config)
        return gather_and_score(detections, images, self.ground_truth, self.rank)

    def _tensorboard_validation(self, record: dict) -> None:
        if self.tensorboard is None:
            return
        scalars = {f"val/{t}_{stat}": record[t][stat] for t in ("bbox", "segm") if t in record
                   for stat in ("AP", "AP50", "AP75")}
        if scalars:
            self.tensorboard.scalars(self.step, scalars)
            self.tensorboard.flush()

    def _checkpoint(self, name: str, summary: dict) -> None:
        """Report rank 0's training state to Ray Train as the checkpoint `name` (a collective).

        Only a few numbers go with the report (Ray logs each report); `metrics.jsonl` has them all.
        """
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if self.rank == 0:
                save_state(
                    directory,
                    {
                        "model": self.model.state_dict(),
                        "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(),
                        "scaler": self.scaler.state_dict(),
                        "epoch": self.epochs_done,
                        "step": self.step,
                        "epoch_step": self.epoch_step,
                        "history": self.history,
                        "schedule": self.schedule.record(self.step),
                        "config": json.dumps(asdict(self.config)),
                    },
                )
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            metrics = {
                "epoch": self.epochs_done,
                "step": self.step,
                "planned_steps": self.schedule.steps,
                "budgeted": self.schedule.plan is not None,
                **summary,
            }
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


def _zero_sums() -> torch.Tensor:
    """Per-worker sums: the loss terms, then steps, images and seconds waited for batches."""
    return torch.zeros(len(LOSS_NAMES) + 3, dtype=torch.float64)


def _reduce(sums: torch.Tensor, seconds: float, device: torch.device) -> tuple[torch.Tensor, float, int]:
    """`sums` added over all workers, the longest `seconds`, and the number of workers."""
    if not (dist.is_available() and dist.is_initialized()):
        return sums, seconds, 1
    reduce_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    totals = sums.to(reduce_device)
    dist.all_reduce(totals)
    elapsed = torch.tensor([seconds], dtype=torch.float64, device=reduce_device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return totals.cpu(), float(elapsed.item()), dist.get_world_size()


def _means(sums: torch.Tensor, seconds: float, workers: int) -> dict:
    steps, images = max(1.0, float(sums[-3])), int(sums[-2])
    means = {name: float(sums[i]) / steps for i, name in enumerate(LOSS_NAMES)}
    return {
        "loss": sum(means.values()),
        **means,
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


def _resume_state(rank: int) -> dict | None:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        state = load_state(directory)
    if rank == 0:
        uri = storage.to_uri(checkpoint.filesystem, checkpoint.path)
        say(
            f"train: resuming from checkpoint {uri} (epoch {int(state['epoch'])} done) "
            f"at step {int(state.get('step', 0))}"
        )
    return state
