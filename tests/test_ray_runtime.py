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
    that. The executor runs in a thread of this process and the consumer sleeps between batches
    (standing for a training step), so this process's CPU time is the executor's: without
    `IdleBackoff` its scheduling loop spun at about 70 % of a core on the 2-core machine.
    """
    script = """
import tempfile, time
from ray.data import ExecutionResources
from mrcnn.coco import read_coco
from mrcnn.shapes import generate_shapes
from pipeline.ray_runtime import ray_session
from pipeline.train_data import training_dataset

shapes = generate_shapes(tempfile.mkdtemp(), 160, seed=3)
data = read_coco(shapes.annotations_uri, shapes.images_root)
with ray_session(num_cpus=2):
    dataset = training_dataset(data)
    dataset.context.execution_options.resource_limits = ExecutionResources(cpu=0.1)
    batches = iter(dataset.iter_batches(batch_size=4, prefetch_batches=1))
    next(batches)  # start-up (workers, imports) is not what this measures
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in batches:
        time.sleep(0.1)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{cpu / wall:.3f}")
"""
    share = float(run_script(script).split()[-1])
    assert share < 0.3, f"the executor used {share:.0%} of a core while decode waited for CPUs"
