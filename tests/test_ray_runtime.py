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
from pipeline.cluster.session import ray_session

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
        # The idle gap under test, not a wait for an event: longer than the moment after which
        # Ray's default kills an idle task worker while actors hold the CPUs.
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
    that, and the consumer sleeps between batches (standing for a training step). The effect is
    measured without the backoff's own code or Ray's callback hook: the CPU time of the thread
    that runs the executor's scheduling loop (`StreamingExecutor-*`), per batch, for the training
    dataset as built and for the same dataset with `IdleBackoff` taken off, side by side. Spinning,
    the loop burns most of a core through each pause; with the backoff it sleeps through most of
    it. If the callback stops running (a Ray upgrade renaming the hook or the executor's state),
    both runs spin alike and the test fails (checked with the backoff's sleep set to 0).
    """
    script = """
import tempfile, threading, time
from ray.data import ExecutionResources
from mrcnn.coco import read_coco
from mrcnn.shapes import generate_shapes
from pipeline.cluster.idle_backoff import IdleBackoff
from pipeline.cluster.session import ray_session
from pipeline.train.data import training_dataset

PAUSE_S = 0.2


def executor_cpu_seconds():
    \"\"\"CPU time of the thread running the streaming executor's loop, None if there is none.\"\"\"
    for thread in threading.enumerate():
        if thread.name.startswith("StreamingExecutor-") and thread.is_alive():
            try:
                return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
            except (OSError, ProcessLookupError):
                return None
    return None


def executor_cpu_per_batch(dataset):
    \"\"\"(batches, executor CPU seconds per batch between the first and the last sample).\"\"\"
    dataset.context.execution_options.resource_limits = ExecutionResources(cpu=0.1)
    samples = []
    batches = 0
    for _ in dataset.iter_batches(batch_size=4, prefetch_batches=1):
        time.sleep(PAUSE_S)
        batches += 1
        cpu = executor_cpu_seconds()
        if cpu is not None:
            samples.append((batches, cpu))
    (first_batch, first), (last_batch, last) = samples[0], samples[-1]
    return batches, (last - first) / max(1, last_batch - first_batch)


shapes = generate_shapes(tempfile.mkdtemp(), 160, seed=3)
data = read_coco(shapes.annotations_uri, shapes.images_root)
with ray_session(num_cpus=2):
    spinning = training_dataset(data)
    spinning.context.custom_execution_callback_classes = [
        c for c in spinning.context.custom_execution_callback_classes if c is not IdleBackoff
    ]
    spin_batches, spin_cpu = executor_cpu_per_batch(spinning)
    batches, cpu = executor_cpu_per_batch(training_dataset(data))
    print(spin_batches, batches, spin_cpu, cpu)
"""
    spin_batches, batches, spin_cpu, cpu = run_script(script).split()[-4:]
    assert (int(spin_batches), int(batches)) == (40, 40)
    # The executor's own work (launching tasks, taking their output) is the same in both runs; the
    # half leaves room for a loaded machine, where the spinning loop gets less of a core.
    assert float(cpu) < 0.5 * float(spin_cpu), (
        f"executor thread CPU per batch: {float(cpu) * 1000:.1f} ms with IdleBackoff, "
        f"{float(spin_cpu) * 1000:.1f} ms without"
    )
