"""How far a job's datasets are: Ray Data's progress bars where a terminal shows them, one line of
ours every `PROGRESS_EVERY_S` where it does not.

Where the job's stdout is a terminal (`bars_on_terminal`, the test Ray Data itself makes), Ray
Data draws its bars (tqdm) for every dataset: the segmentation's, which the driver executes, and
those of training, which Ray Train's dataset coordinator actor executes, whose bars (Ray's
distributed tqdm, `ray.experimental.tqdm_ray`) reach the driver inside the worker output Ray
forwards; of that output the driver keeps only the bars (`pipeline.cluster.job_log`).

Where it is not (a file, a pipe, `ray job submit`'s log, CI), a bar would be a carriage-return
line per refresh, and Ray Data instead logs a report of every operator every 10 s (15 lines for the
segmentation's five): 105 of the 185 lines of a 3-minute quickstart. A log reads better with one
line per half minute that says how many rows each stage has put out (`ProgressLines`: "segment:
progress ReadPath 200/200, StreamingRepartition 200/200, decode_batch 200/200, Segmenter 184/200,
finish_batch 0/? (30 s)"); Ray Data's report goes to its `ray-data.log`. Training shows its own
progress line every `--log-every` steps either way (`pipeline.train.metrics`); its datasets' bars
then stay in the coordinator's log file.

With `--verbose` (or `MRCNN_VERBOSE=1`) Ray's console is as Ray makes it, its report included,
and `ProgressLines` prints nothing.
"""

from __future__ import annotations

import re
import sys
import time

from pipeline.cluster.job_log import console_quiet, say
from pipeline.cluster.ray_compat import ExecutionCallback, operator_progress

PROGRESS_EVERY_S = 30.0


def bars_on_terminal() -> bool:
    """Whether Ray Data draws progress bars here rather than logging reports (its own test)."""
    return sys.stdout.isatty()


def short_name(operator: str) -> str:
    """"MapBatches(decode_batch)" -> "decode_batch", "StreamingRepartition[...]" -> "StreamingRepartition";
    fused operators keep their "->"."""
    return "->".join(
        re.sub(r"\[.*\]$", "", re.sub(r"^\w+\((.*)\)$", r"\1", part)) for part in operator.split("->")
    )


class ProgressLines(ExecutionCallback):
    """A Ray Data execution callback: every `PROGRESS_EVERY_S` of a dataset's execution, one line
    (`say`) with the rows each operator has put out, while the job's console is quiet and its
    stdout no terminal. `prefix` starts the line (the job's name)."""

    prefix = "progress"

    def before_execution_starts(self, executor) -> None:
        self._started = self._last = time.monotonic()
        self._on = console_quiet() and not bars_on_terminal()

    def on_execution_step(self, executor) -> None:
        now = time.monotonic()
        if not self._on or now - self._last < PROGRESS_EVERY_S:
            return
        self._last = now
        stages = ", ".join(
            f"{short_name(name)} {done}/{'?' if total is None else total}"
            for name, done, total in operator_progress(executor)
        )
        say(f"{self.prefix}: progress {stages} ({now - self._started:.0f} s)")


def with_progress_lines(dataset, callback: type[ProgressLines]):
    """`dataset` with `callback` added to its own DataContext (not the process's); returned."""
    classes = dataset.context.custom_execution_callback_classes
    if callback not in classes:
        dataset.context.custom_execution_callback_classes = [*classes, callback]
    return dataset
