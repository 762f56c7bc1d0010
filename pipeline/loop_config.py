"""`LoopConfig`: the plain values every Ray Train worker's training function is started with."""

from __future__ import annotations

from dataclasses import dataclass

from mrcnn.categories import Category
from pipeline.budget import TimeBudget
from pipeline.shared_storage import StorageMarker


@dataclass(frozen=True)
class LoopConfig:
    """Everything the per-worker training function needs; plain values, sent to every worker.

    `peak_lr` is the peak learning rate of the whole (DDP) batch, already scaled from the job's
    per-16-images `--lr` (`pipeline.train_job.TrainJob.peak_lr`); `momentum` is SGD's momentum,
    or AdamW's beta1 (`pipeline.optimizer.make_optimizer`). `steps_per_epoch` is the number of
    optimizer steps of one epoch on each worker, for the learning-rate schedule.
    `categories[i - 1]` is the category of the model's label `i`. `amp` is "bf16", "fp16" or
    "off"; `trainable_backbone_layers` is already resolved (`mrcnn.backbone.trainable_layers`).
    `checkpoint_every`, `validate_every` and `log_every` count optimizer steps, 0 for never
    (checkpoints and validation still happen at each epoch's end). `val_parts` is the number of
    validation datasets, `val_0` ... (one per worker, fewer with fewer images).
    `fail_after_epoch` and `fail_after_step` are for tests (`pipeline.fault_injection`).
    """

    preset: str
    num_classes: int
    roi_op: str
    mask_loss: str
    categories: tuple[Category, ...]
    epochs: int
    batch_size: int
    optimizer: str
    peak_lr: float
    momentum: float
    weight_decay: float
    warmup_iters: int
    lr_schedule: str
    steps_per_epoch: int
    amp: str
    torch_threads: int
    seed: int
    init_weights: str | None
    metrics_uri: str
    validate: bool
    backbone_weights: str = "none"
    trainable_backbone_layers: int = 3
    checkpoint_every: int = 0
    validate_every: int = 0
    log_every: int = 0
    val_parts: int = 1
    tensorboard_uri: str | None = None
    fail_after_epoch: int | None = None
    fail_after_step: int | None = None
    output_marker: StorageMarker | None = None
    max_steps: int | None = None
    time_budget: TimeBudget | None = None

    @property
    def pretrained(self) -> bool:
        """Whether the backbone starts from trained weights (ImageNet or `init_weights`)."""
        return self.backbone_weights == "imagenet" or bool(self.init_weights)

    @property
    def total_steps(self) -> int:
        """The most optimizer steps the run may take: its epochs', or `max_steps` if fewer."""
        total = max(1, self.epochs * self.steps_per_epoch)
        return total if self.max_steps is None else min(total, self.max_steps)
