"""Fault injection for the resume tests: a training worker that dies on purpose, as if killed.

`MRCNN_TRAIN_FAIL_AFTER_EPOCH=k` in the driver's environment makes the rank-0 worker process exit
right after it has checkpointed epoch k (only in a run that did not start from epoch k or later);
`MRCNN_TRAIN_FAIL_AFTER_STEP=k` does the same after the mid-epoch checkpoint of step k
(`--checkpoint-every` must divide k). The driver reads the variables (`requested`) and the
workers get them in their `LoopConfig`.
"""

from __future__ import annotations

import os

from pipeline.job_log import say

FAIL_AFTER_EPOCH_ENV = "MRCNN_TRAIN_FAIL_AFTER_EPOCH"
FAIL_AFTER_STEP_ENV = "MRCNN_TRAIN_FAIL_AFTER_STEP"


def requested() -> tuple[int | None, int | None]:
    """(epoch, step) after which rank 0 should exit, from the environment; None for never."""
    epoch, step = os.environ.get(FAIL_AFTER_EPOCH_ENV), os.environ.get(FAIL_AFTER_STEP_ENV)
    return (int(epoch) if epoch else None), (int(step) if step else None)


def exit_worker(after: str) -> None:
    """End this worker process at once, without cleanup, as a kill would; `after` says where."""
    say(f"train: worker exits on purpose after {after} (fault injection)")
    os._exit(1)
