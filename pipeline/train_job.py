"""`TrainJob`: a training run as the command line describes it, and the sizes that follow from it
(the peak learning rate, the steps of an epoch)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mrcnn.backbone import default_backbone_weights

# `--lr` is the learning rate for a total batch of this many images (torchvision's reference:
# 0.02 for 8 GPUs x 2 images); the run scales it linearly to num_workers x batch_size.
REFERENCE_BATCH = 16
# Learning rates for a total batch of `REFERENCE_BATCH` images when `--lr` is not given.
DEFAULT_LR = {"sgd": 0.02, "adamw": 0.001}
DEFAULT_RESOURCE_TIMEOUT_S = 1200.0


@dataclass(frozen=True)
class TrainJob:
    """A training run as the command line describes it (see `jobs.train` for each field).

    `lr_per_16_images` is `--lr`: the peak learning rate for a total batch of `REFERENCE_BATCH`
    images (None for the optimizer's `DEFAULT_LR`); the run trains at `peak_lr`. `momentum` is
    SGD's momentum or AdamW's beta1 (`--momentum`).
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
    def peak_lr(self) -> float:
        """The peak learning rate of the whole DDP batch (`num_workers` x `batch_size` images):
        `lr_per_16_images` (or the optimizer's default) scaled linearly from `REFERENCE_BATCH`."""
        per_reference_batch = (
            self.lr_per_16_images if self.lr_per_16_images is not None else DEFAULT_LR[self.optimizer]
        )
        return per_reference_batch * self.num_workers * self.batch_size / REFERENCE_BATCH


def steps_per_epoch(job: TrainJob, num_images: int) -> int:
    """Optimizer steps of one epoch: Ray Data splits the rows equally (each worker must run as
    many DDP steps as the others), and the last batch of a worker's share may be short."""
    return max(1, math.ceil(num_images // job.num_workers / job.batch_size))
