"""The optimizer of a training run and its learning-rate schedule (warm-up, then cosine or steps)."""

from __future__ import annotations

import math

import torch

# Warm-up starts at this fraction of the learning rate and rises linearly (torchvision's reference).
WARMUP_START = 0.001
# "step" schedule: the learning rate drops 10x at these fractions of the run (torchvision's
# reference drops at epochs 16 and 22 of 26).
STEP_MILESTONES = (16 / 26, 22 / 26)
# AdamW's second-moment decay: torch's default; no flag sets it.
ADAMW_BETA2 = 0.999


def make_optimizer(
    params: list[torch.nn.Parameter], optimizer: str, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's), or AdamW ("adamw"), at learning rate `lr`.

    For AdamW, `momentum` (`--momentum`) is its beta1: both are the decay of the running mean of
    the gradients, so one flag sets either.
    """
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(momentum, ADAMW_BETA2), weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def lr_factor(step: int, total: int, schedule: str, warmup_iters: int) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based) of `total` steps.

    `schedule`: "cosine" or "step" (`--lr-schedule`). `total` is the schedule's length (a time
    budget's planned steps). The warm-up takes at most a quarter of it, so a short plan still
    decays.
    """
    total = max(1, total)
    progress = min(step, total) / total
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 0.1 ** sum(progress >= milestone for milestone in STEP_MILESTONES)
    warmup = min(warmup_iters, max(1, total // 4))
    if step < warmup:
        decay *= WARMUP_START + (1.0 - WARMUP_START) * step / warmup
    return decay
