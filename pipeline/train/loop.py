"""The training function each Ray Train worker runs: DDP Mask R-CNN over its shard of the data.

`Trainer` does one thing per step, as Detectron2's `SimpleTrainer.run_step` does: forward,
backward, optimizer step, learning-rate step. Everything else a run does happens in hooks called
at their points (`pipeline.train.hooks`): re-planning against a time budget, step records and
TensorBoard, validation, checkpoints, and in tests a worker that dies on purpose.

Every worker builds the same model (same seed) and starts it from, in this order of precedence,
`ray.train.get_checkpoint()` (after a worker failure, or when the command is re-run on the same
output), `--init-weights` (`pipeline.train.weight_init`), or the ImageNet backbone (`mrcnn.backbone`);
it then trains with the optimizer and learning-rate schedule of `pipeline.train.optimizer` on the
batches of its own shard of the training dataset (`get_dataset_shard("train")`), under the
project's autocast policy (`mrcnn.precision`; fp16 with a gradient scaler).

A run resumed from a checkpoint taken mid-epoch trains that epoch's remaining steps on a new
pass over the shuffled training set (Ray Data cannot restart a pass at a position): of that one
epoch, at most as many images as the steps done before the checkpoint held (steps x batch size
x workers) are seen twice and as many not at all; every other epoch sees each image once. The
number of optimizer steps, and so the learning-rate schedule, is exactly the plan's.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import ray.train
import ray.train.torch
import torch

from mrcnn import build_model, storage
from mrcnn.backbone import load_imagenet_backbone
from mrcnn.precision import autocast
from pipeline.cluster.gpu import node_description
from pipeline.cluster.job_log import say
from pipeline.train import fault_injection
from pipeline.train.budget import Schedule
from pipeline.train.config import TrainConfig, TrainPlan
from pipeline.train.data import TrainingCollate
from pipeline.train.hooks import (
    BudgetHook,
    CheckpointHook,
    EpochRecordHook,
    Hook,
    MetricsHook,
    ValidationHook,
)
from pipeline.train.metrics import LOSS_NAMES, means, reduce_sums, zero_sums
from pipeline.train.optimizer import lr_factor, make_optimizer
from pipeline.train.run_folder import RunFolder, load_state
from pipeline.train.weight_init import initialise_from, set_training_mode

# Rows each worker keeps in its local shuffle buffer, in batches.
SHUFFLE_BATCHES = 4


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's per-worker function.

    `loop_config`: `config` (a `TrainConfig`), `plan` (a `TrainPlan`) and, with a validation set,
    `val_ground_truth`, the COCO dict the validation AP is computed against.
    """
    config: TrainConfig = loop_config["config"]
    plan: TrainPlan = loop_config["plan"]
    if plan.output_marker is not None:
        # A worker on a node that does not share the driver's local output would write its
        # checkpoints and metrics to a disk of its own.
        plan.output_marker.verify()
    torch.set_num_threads(plan.torch_threads)
    trainer = Trainer(config, plan)
    trainer.train(default_hooks(config, plan, trainer.rank, loop_config.get("val_ground_truth")))


def default_hooks(
    config: TrainConfig, plan: TrainPlan, rank: int, val_ground_truth: dict | None
) -> list[Hook]:
    """The hooks of a run, in the order they are called (`pipeline.train.hooks`)."""
    metrics = MetricsHook(config, rank)
    hooks: list[Hook] = [BudgetHook(), metrics]
    if plan.validate:
        hooks.append(ValidationHook(config, plan, rank, val_ground_truth, metrics))
    hooks.append(CheckpointHook(config.checkpoint_every, rank))
    hooks.append(EpochRecordHook(metrics))
    if plan.fault_injection is not None:
        hooks.append(fault_injection.FaultInjectionHook(*plan.fault_injection, rank=rank))
    return hooks


class Trainer:
    """One worker's share of a run: the model, optimizer and schedule, and where the run stands.

    `step` counts optimizer steps of the whole run, `epoch_step` those of the epoch in progress;
    `history` (rank 0) is what `metrics.jsonl` holds; `schedule` is the learning-rate schedule's
    length, planned against the time budget if there is one (`pipeline.train.budget`). All four
    travel in every checkpoint. The run ends at the schedule's last step, within an epoch if need
    be. `last_step` is the step just taken, for the hooks: its loss terms, steps, images and
    seconds waited for data as one row of sums (`zero_sums`), and its seconds.
    """

    def __init__(self, config: TrainConfig, plan: TrainPlan) -> None:
        self.config, self.plan = config, plan
        self.folder = RunFolder(config.output)
        self.rank = ray.train.get_context().get_world_rank()
        self.world_size = ray.train.get_context().get_world_size()
        self.device = ray.train.torch.get_device()
        state = _resume_state(self.rank)
        self.model = self._build_model(state)
        self.ddp_model = ray.train.torch.prepare_model(self.model)
        if self.rank == 0:
            say(f"train: {self.world_size} worker(s) started; rank 0 on {node_description()}, {self.device}")
        self._build_optimizer(state)
        self.train_shard = ray.train.get_dataset_shard("train")
        self.epoch = self.epochs_done + 1
        self.last_step, self.last_step_seconds = zero_sums(), 0.0
        self.epoch_record: dict = {}
        self.hooks: list[Hook] = []

    def _build_model(self, state: dict | None) -> torch.nn.Module:
        config = self.config
        torch.manual_seed(config.seed)
        model = build_model(
            config.preset, self.plan.num_classes, roi_op=config.roi_op, mask_loss=config.mask_loss
        )
        if state is not None:
            model.load_state_dict(state["model"])
        elif config.init_weights:
            initialise_from(model, config.init_weights, log=self.rank == 0, categories=self.plan.categories)
        elif config.backbone_start == "imagenet":
            # Here, on the worker's node: that is where the model lives (the hub cache or network).
            load_imagenet_backbone(model, config.preset)
        # Before DDP wraps the model: DDP must only see the parameters that will get gradients.
        self.set_training_mode(model)
        # The same weights everywhere (DDP also broadcasts rank 0's), a different RoI sampling each.
        torch.manual_seed(config.seed + 1000 * (self.rank + 1))
        return model

    def _build_optimizer(self, state: dict | None) -> None:
        config, plan = self.config, self.plan
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(
            parameters, config.optimizer, config.peak_lr, config.momentum, config.weight_decay
        )
        self.schedule = Schedule(
            plan.total_steps,
            budget=plan.time_budget,
            resumed=None if state is None else state.get("schedule"),
            min_steps=4 * config.warmup_iters,
            images_per_step=config.batch_size * self.world_size,
            announce=self.rank == 0,
        )
        # A closure, not an object: LambdaLR saves an object's fields in its state_dict and would
        # bring back the old schedule when a run resumes with more epochs or a new plan.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(step, self.schedule.steps, config.lr_schedule, config.warmup_iters),
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
            self.step = int(state.get("step", self.epochs_done * plan.steps_per_epoch))
            self.epoch_step = int(state.get("epoch_step", 0))
            self.history = list(state["history"])
        self.start_step = self.step
        self.resumed = state is not None
        self.schedule.start(first_step=self.step)

    def set_training_mode(self, model: torch.nn.Module | None = None) -> None:
        """Train mode, a pretrained backbone frozen (`pipeline.train.weight_init.set_training_mode`)."""
        set_training_mode(model or self.model, self.config.pretrained, self.config.trainable_layers)

    def at_epoch_end(self) -> bool:
        """Whether the step just taken ends the epoch or the schedule (the epoch's end then
        validates and checkpoints, not the periodic hooks)."""
        return self.epoch_step >= self.plan.steps_per_epoch or self.step >= self.schedule.steps

    def train(self, hooks: list[Hook]) -> None:
        """Train the epochs and steps that remain, calling `hooks` in their order at each point."""
        self.hooks = hooks
        self._call("before_train")
        for epoch in range(self.epochs_done + 1, self.config.epochs + 1):
            if self.step >= self.schedule.steps:
                break
            self.epoch = epoch
            self.epoch_record = {"kind": "epoch", "epoch": epoch, **self._train_epoch()}
            self.epoch_record.update(self.schedule.record(self.step))
            self._call("on_epoch_end")
            self.epochs_done, self.epoch_step = epoch, 0
            if self.rank == 0:
                self.history.append(self.epoch_record)
            self._call("after_epoch")
        self._call("after_train")

    def _train_epoch(self) -> dict:
        """The epoch's remaining steps on this worker's shard; loss means and throughput over all."""
        self.set_training_mode()
        # A resumed epoch trains only its remaining steps (see the module docstring).
        limit = self.plan.steps_per_epoch - self.epoch_step if self.epoch_step else None
        sums, seconds = zero_sums(), 0.0
        batches = self.train_shard.iter_torch_batches(
            batch_size=self.config.batch_size,
            collate_fn=TrainingCollate(),
            local_shuffle_buffer_size=self.config.batch_size * SHUFFLE_BATCHES,
            prefetch_batches=2,
        )
        for taken, (images, targets, waited) in enumerate(_timed(batches), start=1):
            self.run_step(images, targets, waited)
            sums += self.last_step
            seconds += self.last_step_seconds
            self._call("after_step")
            if (limit is not None and taken >= limit) or self.step >= self.schedule.steps:
                break
        sums, seconds, workers = reduce_sums(sums, seconds, self.device)
        return means(sums, seconds, workers) | {"lr": self.scheduler.get_last_lr()[0]}

    def run_step(self, images, targets, waited: float) -> None:
        """One optimizer step: forward, backward, step; then the learning rate's step."""
        started = time.perf_counter()
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
        self.step += 1
        self.epoch_step += 1
        # Before the learning rate moves on: a hook that re-plans the schedule does it here.
        self._call("after_optimizer_step")
        self.scheduler.step()
        extra = torch.tensor([1.0, len(images), waited], dtype=torch.float64)
        self.last_step = torch.cat([values.double(), extra])
        self.last_step_seconds = time.perf_counter() - started + waited

    def training_state(self) -> dict:
        """What a checkpoint holds (see `pipeline.train.run_folder`): plain data only."""
        return {
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
        }

    def _call(self, point: str) -> None:
        for hook in self.hooks:
            getattr(hook, point)(self)


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
