"""Stop Ray Data's streaming executor from spinning while it waits on a slow consumer.

Ray Data 2.60's scheduling loop blocks in `ray.wait(..., timeout=0.1)` only while some task is
in flight. When none is (the next task waits for CPUs, or backpressure holds it back), each pass
of the loop returns at once and the next begins: a busy loop. Training is that case for most of
an epoch: Ray Train's workers hold the CPUs, and decoding a batch takes milliseconds where a DDP
step takes most of a second, so the `SplitCoordinator` actor that runs the executor for
`streaming_split` spins on a core the training needs (figures in BENCHMARKS.md, "Training
throughput on 2 cores").

`IdleBackoff` is an execution callback (`DataContext.custom_execution_callback_classes`, called
after every pass of the loop; its base class and the executor's state are private Ray names, kept
in `pipeline.cluster.ray_compat`) that sleeps `IDLE_SLEEP_S` when no operator has a task in flight.
The cost is at most that long a delay in launching the next decode task once the consumer takes
a block; the executor's own pace while tasks run is unchanged.
"""

from __future__ import annotations

import time

from pipeline.cluster.ray_compat import ExecutionCallback, nothing_in_flight

# Ray's own wait while tasks run is 0.1 s; a step of training takes far longer than this.
IDLE_SLEEP_S = 0.02


class IdleBackoff(ExecutionCallback):
    """Sleep between passes of the scheduling loop while no task is in flight."""

    def on_execution_step(self, executor) -> None:
        if nothing_in_flight(executor):
            time.sleep(IDLE_SLEEP_S)


def with_idle_backoff(dataset):
    """`dataset` with `IdleBackoff` added to its own DataContext (not the process's); returned."""
    classes = dataset.context.custom_execution_callback_classes
    if IdleBackoff not in classes:
        dataset.context.custom_execution_callback_classes = [*classes, IdleBackoff]
    return dataset
