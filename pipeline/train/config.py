"""A training run's configuration: `TrainConfig`, the flags of `jobs.train` and what follows from
them (where the backbone starts, which stages train, the peak learning rate), and `TrainPlan`,
what the run decides once at its start from its data and its cluster (categories, steps of an
epoch and in all, CPUs per worker, validation parts, time budget).

Both are built once, in the driver, and travel unchanged to every Ray Train worker: no layer
copies their fields into a config of its own, and a value derived from them is a property here,
so that every part of the run decides it the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mrcnn.backbone import default_backbone_weights, trainable_layers
from mrcnn.categories import Category
from pipeline.cluster.shared_storage import StorageMarker
from pipeline.train.budget import TimeBudget

# `--lr` is the learning rate for a total batch of this many images (torchvision's reference:
# 0.02 for 8 GPUs x 2 images); the run scales it linearly to num_workers x batch_size.
REFERENCE_BATCH = 16
# Learning rates for a total batch of `REFERENCE_BATCH` images when `--lr` is not given.
DEFAULT_LR = {"sgd": 0.02, "adamw": 0.001}
DEFAULT_RESOURCE_TIMEOUT_S = 1200.0


@dataclass(frozen=True)
class TrainConfig:
    """A training run as the command line describes it (see `jobs.train` for each flag).

    `lr_per_16_images` is `--lr`: the peak learning rate for a total batch of `REFERENCE_BATCH`
    images (None for the optimizer's `DEFAULT_LR`); the run trains at `peak_lr`. `momentum` is
    SGD's momentum or AdamW's beta1 (`--momentum`). `checkpoint_every`, `validate_every` and
    `log_every` count optimizer steps, 0 for never (checkpoints and validation still happen at
    each epoch's end). `cpus_per_worker` None: sized from the cluster (`pipeline.train.workers`).
    """

    train_annotations: str
    train_images: str
    output: str
    val_annotations: str | None = None
    val_images: str | None = None
    preset: str = "small"
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float | None = None
    epochs: int = 12
    batch_size: int = 4
    optimizer: str = "sgd"
    lr_per_16_images: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    lr_schedule: str = "cosine"
    amp: str = "off"
    roi_op: str = "align"
    mask_loss: str = "sigmoid"
    init_weights: str | None = None
    backbone_weights: str | None = None
    trainable_backbone_layers: int | None = None
    checkpoint_every: int = 1000
    validate_every: int = 0
    log_every: int = 20
    exif_orientation: str = "stored"
    max_failures: int = 0
    seed: int = 0
    resource_timeout_s: float = DEFAULT_RESOURCE_TIMEOUT_S
    max_steps: int | None = None
    max_minutes: float | None = None

    @property
    def backbone_start(self) -> str:
        """Where the ResNet starts: "imagenet" or "none" (the preset's default when not given);
        "none" with `init_weights`, which hold a backbone of their own."""
        if self.init_weights:
            return "none"
        return self.backbone_weights or default_backbone_weights(self.preset)

    @property
    def pretrained(self) -> bool:
        """Whether the backbone starts from trained weights (ImageNet or `init_weights`)."""
        return self.backbone_start == "imagenet" or bool(self.init_weights)

    @property
    def trainable_layers(self) -> int:
        """ResNet stages that train (`mrcnn.backbone.trainable_layers`: all 5 from scratch)."""
        return trainable_layers(self.pretrained, self.trainable_backbone_layers)

    @property
    def peak_lr(self) -> float:
        """The peak learning rate of the whole DDP batch (`num_workers` x `batch_size` images):
        `lr_per_16_images` (or the optimizer's default) scaled linearly from `REFERENCE_BATCH`."""
        per_reference_batch = (
            self.lr_per_16_images if self.lr_per_16_images is not None else DEFAULT_LR[self.optimizer]
        )
        return per_reference_batch * self.num_workers * self.batch_size / REFERENCE_BATCH

    def steps_per_epoch(self, num_images: int) -> int:
        """Optimizer steps of one epoch over `num_images`: Ray Data splits the rows equally (each
        worker must run as many DDP steps as the others), and a worker's last batch may be short."""
        return max(1, math.ceil(num_images // self.num_workers / self.batch_size))

    def total_steps(self, steps_per_epoch: int) -> int:
        """The most optimizer steps the run may take: its epochs', or `max_steps` if fewer."""
        total = max(1, self.epochs * steps_per_epoch)
        return total if self.max_steps is None else min(total, self.max_steps)


@dataclass(frozen=True)
class TrainPlan:
    """What a run decides at its start, once, from its data and its cluster.

    `categories[i - 1]` is the category of the model's label `i`. `steps_per_epoch` is the number
    of optimizer steps of one epoch on each worker; `total_steps` the most the run may take (the
    learning-rate schedule's length without a time budget). `cpus_per_worker` is also each
    worker's torch threads. `val_parts` is the number of validation datasets, `val_0` ... (one per
    worker, fewer with fewer images; 0 without a validation set). `output_marker`: the marker a
    worker must see before it writes to a local output on a cluster (`pipeline.cluster.
    shared_storage`). `fault_injection`: the test hook's settings, None in every real run
    (`pipeline.train.fault_injection`).
    """

    categories: tuple[Category, ...]
    steps_per_epoch: int
    total_steps: int
    cpus_per_worker: float
    val_parts: int = 0
    output_marker: StorageMarker | None = None
    time_budget: TimeBudget | None = None
    fault_injection: tuple[int | None, int | None] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.categories) + 1

    @property
    def validate(self) -> bool:
        return self.val_parts > 0

    @property
    def torch_threads(self) -> int:
        return max(1, round(self.cpus_per_worker))
