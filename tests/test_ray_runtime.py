"""How the jobs run on Ray: the local Ray they start, and Ray Data's executor while it waits.

Both tests start their own Ray in a subprocess (the session's shared Ray is the test fixture's,
not one that `ray_session` configured).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_script(script: str) -> str:
    """Run `script` in a fresh Python with this checkout importable and no RAY_ADDRESS; its stdout."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_a_local_ray_keeps_idle_task_workers_while_actors_hold_its_cpus():
    """Short tasks spaced by idle gaps reuse their worker process instead of starting new ones.

    With Ray's default, a task worker idle for a moment is killed while actors hold the node's
    CPUs, as Ray Train's workers do during training: every decode task then paid a new Python
    process. Two actors of 0.75 CPUs on a 2-CPU Ray (the training job's layout) recreate that.
    """
    script = """
import os, time, ray
from pipeline.ray_runtime import ray_session

with ray_session(num_cpus=2):
    @ray.remote(num_cpus=0.75)
    class Holder:
        def pid(self):
            return os.getpid()

    holders = [Holder.remote() for _ in range(2)]
    ray.get([holder.pid.remote() for holder in holders])

    @ray.remote(num_cpus=0.25)
    def task_pid():
        return os.getpid()

    pids = []
    for _ in range(3):
        pids.append(ray.get(task_pid.remote()))
        time.sleep(4)
    alive = [pid for pid in pids if os.path.exists(f"/proc/{pid}")]
    print(len(pids), len(alive))
"""
    ran, alive = run_script(script).split()[-2:]
    assert (ran, alive) == ("3", "3"), "task workers were killed while idle"


@pytest.mark.slow
def test_a_training_dataset_waiting_for_cpus_leaves_them_to_training():
    """While decode tasks wait for CPUs, Ray Data's executor sleeps instead of spinning.

    During training the workers hold the CPUs, so the decode stage mostly cannot start a task and
    the executor has nothing in flight. Here a CPU limit below one decode task's needs stands for
    that, and the consumer sleeps between batches (standing for a training step). A callback of
    the test, run after `IdleBackoff` on every pass of the executor's scheduling loop, counts the
    passes made with nothing in flight: with the backoff each costs `IDLE_SLEEP_S`, so a pause of
    PAUSE_S holds a few of them (3 per batch measured); without it the loop passed ~100 times per
    pause, busy (4,336 passes over the 40 batches, about 70 % of a core on the 2-core machine).
    """
    script = """
import tempfile, time
from ray.data import ExecutionResources
from ray.data._internal.execution.execution_callback import ExecutionCallback
from mrcnn.coco import read_coco
from mrcnn.shapes import generate_shapes
from pipeline.ray_compat import nothing_in_flight
from pipeline.ray_runtime import ray_session
from pipeline.train_data import training_dataset

PAUSE_S = 0.1


class CountIdlePasses(ExecutionCallback):
    passes = 0

    def on_execution_step(self, executor):
        if nothing_in_flight(executor):
            CountIdlePasses.passes += 1


shapes = generate_shapes(tempfile.mkdtemp(), 160, seed=3)
data = read_coco(shapes.annotations_uri, shapes.images_root)
with ray_session(num_cpus=2):
    dataset = training_dataset(data)
    dataset.context.execution_options.resource_limits = ExecutionResources(cpu=0.1)
    dataset.context.custom_execution_callback_classes.append(CountIdlePasses)
    batches = 0
    for _ in dataset.iter_batches(batch_size=4, prefetch_batches=1):
        time.sleep(PAUSE_S)
        batches += 1
    print(batches, CountIdlePasses.passes)
"""
    batches, idle_passes = map(int, run_script(script).split()[-2:])
    assert batches == 40
    # PAUSE_S / IDLE_SLEEP_S = 5 sleeping passes per pause; 4x that leaves room for a slow machine.
    assert idle_passes <= 20 * batches, f"{idle_passes} scheduling passes with nothing in flight"
