"""Fault injection for the resume tests: a training worker that dies on purpose, as if killed.

`MRCNN_TRAIN_FAIL_AFTER_EPOCH=k` in the driver's environment makes the rank-0 worker process exit
right after it has checkpointed epoch k (only in a run that did not start from epoch k or later);
`MRCNN_TRAIN_FAIL_AFTER_STEP=k` does the same after the mid-epoch checkpoint of step k
(`--checkpoint-every` must divide k). The driver reads the variables (`requested`) into the
run's plan, and the workers then add `FaultInjectionHook` to their hooks: the loop itself has no
test-only branch.
"""

from __future__ import annotations

import os

from pipeline.cluster.job_log import say
from pipeline.train.hooks import Hook, wait_for_checkpoints

FAIL_AFTER_EPOCH_ENV = "MRCNN_TRAIN_FAIL_AFTER_EPOCH"
FAIL_AFTER_STEP_ENV = "MRCNN_TRAIN_FAIL_AFTER_STEP"


def requested() -> tuple[int | None, int | None] | None:
    """(epoch, step) after which rank 0 should exit, from the environment; None for never."""
    epoch, step = os.environ.get(FAIL_AFTER_EPOCH_ENV), os.environ.get(FAIL_AFTER_STEP_ENV)
    if not epoch and not step:
        return None
    return (int(epoch) if epoch else None), (int(step) if step else None)


class FaultInjectionHook(Hook):
    """Rank 0 exits after the checkpoint of epoch `after_epoch` or of step `after_step`."""

    def __init__(self, after_epoch: int | None, after_step: int | None, rank: int) -> None:
        self.after_epoch_number, self.after_step_number, self.rank = after_epoch, after_step, rank

    def after_step(self, trainer) -> None:
        every = trainer.config.checkpoint_every
        checkpointed = every and trainer.step % every == 0 and not trainer.at_epoch_end()
        if (
            self.rank == 0
            and checkpointed
            and self.after_step_number == trainer.step
            and trainer.start_step < trainer.step
        ):
            wait_for_checkpoints()
            exit_worker(f"step {trainer.step}")

    def after_epoch(self, trainer) -> None:
        started_before = trainer.start_step <= (trainer.epoch - 1) * trainer.plan.steps_per_epoch
        if self.rank == 0 and self.after_epoch_number == trainer.epoch and started_before:
            exit_worker(f"epoch {trainer.epoch}")


def exit_worker(after: str) -> None:
    """End this worker process at once, without cleanup, as a kill would; `after` says where."""
    say(f"train: worker exits on purpose after {after} (fault injection)")
    os._exit(1)
