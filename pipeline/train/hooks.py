"""What a training run does around its steps, as hooks of `pipeline.train.loop.Trainer`.

The shape of Detectron2's `HookBase`: a hook is called at fixed points of the loop, with the
trainer, and the hooks of a run are called in the order of `default_hooks`:
- `before_train`, once;
- `after_optimizer_step`, after each optimizer step, before the learning rate moves on (a hook
  that re-plans the schedule's length does it here, so the next step's rate follows the plan);
- `after_step`, after each step (the time spent in hooks is not training time);
- `on_epoch_end`, at an epoch's end, while its record (`trainer.epoch_record`) is being made: a
  hook adds to it (validation);
- `after_epoch`, once the record is in the history: hooks act on it (checkpoint, metrics file);
- `after_train`, once.
Validation comes before checkpoints, so that an epoch's checkpoint carries its AP; checkpoints
before the metrics file, so that `metrics.jsonl` never gets ahead of the checkpoints a re-run
resumes from. A hook that does a collective (a DDP reduce, a checkpoint report) runs on every
worker at the same steps; what only rank 0 does (files, lines) it guards itself.

A new hook is a subclass of `Hook` added to `pipeline.train.loop.default_hooks`; the tests' fault
injection is one (`pipeline.train.fault_injection`).
"""

from __future__ import annotations

import tempfile
import time

import ray.train
from ray.train import CheckpointConsistencyMode

from pipeline.cluster.job_log import say
from pipeline.train.config import TrainConfig, TrainPlan
from pipeline.train.data import ValidationCollate
from pipeline.train.metrics import (
    LOSS_NAMES,
    TensorBoardLog,
    format_ap,
    format_epoch,
    format_step,
    means,
    reduce_sums,
    write_history,
    zero_sums,
)
from pipeline.train.run_folder import save_state
from pipeline.train.validation import detect, gather_and_score


class Hook:
    """A point of the training loop's life other than the step itself; every method is a no-op."""

    def before_train(self, trainer) -> None:
        pass

    def after_optimizer_step(self, trainer) -> None:
        pass

    def after_step(self, trainer) -> None:
        pass

    def on_epoch_end(self, trainer) -> None:
        pass

    def after_epoch(self, trainer) -> None:
        pass

    def after_train(self, trainer) -> None:
        pass


class BudgetHook(Hook):
    """Re-plans the schedule's length against the time budget at the clock's points
    (`pipeline.train.budget.Schedule.after_step`; a no-op without a budget)."""

    def after_optimizer_step(self, trainer) -> None:
        trainer.schedule.after_step(trainer.step, trainer.device)


class MetricsHook(Hook):
    """Every `log_every` steps, the loss terms and throughput since the last record, over all
    workers (a collective): rank 0 appends a step record to `metrics.jsonl`, writes TensorBoard
    scalars and prints one line. `publish` does the same for the records other hooks make."""

    def __init__(self, config: TrainConfig, rank: int) -> None:
        self.log_every, self.epochs, self.rank = config.log_every, config.epochs, rank
        self.tensorboard: TensorBoardLog | None = None
        self.window = None
        self.window_seconds = 0.0

    def before_train(self, trainer) -> None:
        self.window = zero_sums()
        if self.rank == 0:
            resumed_step = trainer.step if trainer.resumed else None
            self.tensorboard = TensorBoardLog(trainer.folder.tensorboard_uri, resumed_step)

    def after_step(self, trainer) -> None:
        self.window += trainer.last_step
        self.window_seconds += trainer.last_step_seconds
        if not self.log_every or trainer.step % self.log_every:
            return
        sums, seconds, workers = reduce_sums(self.window, self.window_seconds, trainer.device)
        self.window, self.window_seconds = zero_sums(), 0.0
        if self.rank != 0:
            return
        step_means = means(sums, seconds, workers)
        record = {"kind": "step", "step": trainer.step, "epoch": trainer.epoch}
        record["lr"] = trainer.scheduler.get_last_lr()[0]
        record.update(
            {k: step_means[k] for k in ("loss", *LOSS_NAMES, "images_per_second", "data_wait_seconds")}
        )
        scalars = {f"train/{k}": record[k] for k in ("loss", *LOSS_NAMES, "lr", "images_per_second")}
        self.publish(trainer, record, format_step(record, trainer.schedule.steps, self.epochs), scalars)

    def publish(self, trainer, record: dict, line: str, scalars: dict[str, float] | None = None) -> None:
        """Rank 0: append `record` to the history, rewrite `metrics.jsonl`, write `scalars` and
        the record's validation APs to TensorBoard, and print `line`."""
        if self.rank != 0:
            return
        if record is not trainer.epoch_record:
            trainer.history.append(record)
        write_history(trainer.folder.metrics_uri, trainer.history)
        scalars = dict(scalars or {})
        scalars.update(
            {f"val/{t}_{stat}": record[t][stat] for t in ("bbox", "segm") if t in record
             for stat in ("AP", "AP50", "AP75")}
        )  # fmt: skip
        if scalars and self.tensorboard is not None:
            self.tensorboard.scalars(trainer.step, scalars)
            self.tensorboard.flush()
        say(f"train: {line}")

    def after_train(self, trainer) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


class ValidationHook(Hook):
    """Every `validate_every` steps and at each epoch's end: the validation set's COCO stats, each
    worker on its part of the images, rank 0 scoring them all (`pipeline.train.validation`)."""

    def __init__(
        self, config: TrainConfig, plan: TrainPlan, rank: int, ground_truth: dict | None, metrics: MetricsHook
    ) -> None:
        self.every, self.batch_size, self.amp = config.validate_every, config.batch_size, config.amp
        self.categories, self.ground_truth, self.rank = plan.categories, ground_truth, rank
        self.metrics = metrics
        self.shard = ray.train.get_dataset_shard(f"val_{rank}") if rank < plan.val_parts else None

    def after_step(self, trainer) -> None:
        if not self.every or trainer.step % self.every or trainer.at_epoch_end():
            return
        started = time.perf_counter()
        stats = self.validate(trainer)
        if stats is not None:
            record = {"kind": "validation", "step": trainer.step, "epoch": trainer.epoch, **stats}
            record["val_seconds"] = time.perf_counter() - started
            self.metrics.publish(trainer, record, f"step {trainer.step} validation:{format_ap(record)}")

    def on_epoch_end(self, trainer) -> None:
        started = time.perf_counter()
        stats = self.validate(trainer)
        if stats is not None:
            trainer.epoch_record.update(stats)
            trainer.epoch_record["val_seconds"] = time.perf_counter() - started

    def validate(self, trainer) -> dict | None:
        """COCO stats of the model on the validation set, on rank 0 (None elsewhere); a collective."""
        trainer.model.eval()
        images = 0

        def counted(batches):
            nonlocal images
            for image_ids, pixels in batches:
                images += len(image_ids)
                yield image_ids, pixels

        try:
            batches = []
            if self.shard is not None:
                batches = self.shard.iter_torch_batches(
                    batch_size=self.batch_size, collate_fn=ValidationCollate(), prefetch_batches=2
                )
            detections = detect(trainer.model, counted(batches), self.categories, trainer.device, self.amp)
        finally:
            trainer.set_training_mode()
        return gather_and_score(detections, images, self.ground_truth, self.rank)


class CheckpointHook(Hook):
    """Every `every` steps (0: never) and at each epoch's end, report a checkpoint of rank 0's
    training state to Ray Train (a collective), the epoch's then registered before any file says
    the epoch is done.

    Only a few numbers go with a report (Ray logs each report); `metrics.jsonl` has them all.
    """

    def __init__(self, every: int, rank: int) -> None:
        self.every, self.rank = every, rank

    def after_step(self, trainer) -> None:
        if self.every and trainer.step % self.every == 0 and not trainer.at_epoch_end():
            report(trainer, f"step-{trainer.step:09d}", {}, self.rank)

    def after_epoch(self, trainer) -> None:
        record = trainer.epoch_record
        summary = {"loss": record["loss"]}
        summary.update({f"{t}_AP": record[t]["AP"] for t in ("bbox", "segm") if t in record})
        report(trainer, f"epoch-{trainer.epoch:04d}", summary, self.rank)
        if self.rank == 0:
            # Ray Train registers a report when its controller next polls the workers; until then
            # a worker that dies loses it. Waiting for the registration keeps the epoch records of
            # metrics.jsonl (and the driver's "already complete" check that reads them) behind
            # the checkpoints.
            wait_for_checkpoints()


class EpochRecordHook(Hook):
    """At each epoch's end, rank 0 writes the history with the epoch's record and prints its line."""

    def __init__(self, metrics: MetricsHook) -> None:
        self.metrics = metrics

    def after_epoch(self, trainer) -> None:
        record = trainer.epoch_record
        self.metrics.publish(trainer, record, format_epoch(record, trainer.config.epochs))


def report(trainer, name: str, summary: dict, rank: int) -> None:
    """Report rank 0's training state to Ray Train as the checkpoint `name` (a collective)."""
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            save_state(directory, trainer.training_state())
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        metrics = {
            "epoch": trainer.epochs_done,
            "step": trainer.step,
            "planned_steps": trainer.schedule.steps,
            "budgeted": trainer.schedule.plan is not None,
            **summary,
        }
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


def wait_for_checkpoints() -> None:
    """Until Ray Train has registered every checkpoint this worker reported."""
    ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
