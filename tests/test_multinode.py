"""The cluster path: jobs on a Ray of several nodes, as `ray job submit` runs them.

Each test starts its own cluster (`tests/ray_cluster.py`: `ray.cluster_utils.Cluster`, a raylet per
node) and runs the job as a subprocess with `RAY_ADDRESS` set. Nodes die with
`remove_node(allow_graceful=False)`, as a crashed or preempted machine would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import torch
from ray_cluster import MultiNodeCluster

from mrcnn import build_model
from mrcnn.categories import Category
from mrcnn.model_folder import save_model_folder, spec_for
from mrcnn.shapes import generate_shapes

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
CATEGORIES = (Category(1, "circle"), Category(2, "square"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = build_model("tiny", len(CATEGORIES) + 1)
    uri = str(tmp_path_factory.mktemp("model") / "model")
    save_model_folder(model, spec_for(model, CATEGORIES), uri)
    return uri


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes(str(tmp_path_factory.mktemp("shapes")), 40, seed=3, size=64)


def start_job(cluster: MultiNodeCluster, module: str, *argv: str) -> subprocess.Popen:
    """`python -m <module> argv` as the driver of a job on `cluster`."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *argv],
        cwd=REPO,
        env=cluster.job_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(job: subprocess.Popen, timeout: float = 420) -> tuple[str, str]:
    try:
        return job.communicate(timeout=timeout)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


def wait_for(condition, job: subprocess.Popen, what: str, timeout: float = 300) -> None:
    """Poll `condition()` until it holds; fail if the job ends first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if job.poll() is not None:
            _, stderr = job.communicate()
            pytest.fail(f"the job ended before {what}: {stderr[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.05)


def processes_titled(word: str, marker: str) -> list[int]:
    """PIDs of this cluster's processes (by `marker` in their environment) whose title has `word`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if word in title and f"MRCNN_TEST_CLUSTER={marker}".encode() in environ:
            found.append(int(pid))
    return found


def read_rows(output: Path) -> list[dict]:
    return pads.dataset(str(output), format="parquet").to_table().to_pylist()


def test_segmentation_completes_when_the_node_of_its_inference_actor_dies(tmp_path, model_dir, shapes):
    """The actor's node crashes mid-run; the actor comes back on the other node, every input once."""
    marker = os.urandom(6).hex()
    output = tmp_path / "masks"
    expected = sorted(str(path) for path in Path(shapes.images_root).iterdir())
    with MultiNodeCluster(head_cpus=1, env={"MRCNN_TEST_CLUSTER": marker}) as cluster:
        # The actor needs 2 CPUs: only worker nodes fit it, never the 1-CPU head.
        cluster.add_node("a", num_cpus=2)
        cluster.add_node("b", num_cpus=2)
        job = start_job(
            cluster, "jobs.segment", "--input", shapes.images_root, "--output", str(output),
            "--model", model_dir, "--gpus-per-actor", "0", "--cpus-per-actor", "2",
            "--batch-size", "2", "--rows-per-file", "2", "--score-threshold", "0.05",
        )  # fmt: skip
        wait_for(lambda: any(output.glob("part-*.parquet")), job, "a committed part file")
        actors = processes_titled("Segmenter", marker)
        assert len(actors) == 1
        victim = cluster.node_of(actors[0])
        assert victim in ("a", "b")
        cluster.kill_node(victim)
        committed_at_the_kill = len(read_rows(output))
        stdout, stderr = finish(job)
    assert job.returncode == 0, stderr[-3000:]
    assert committed_at_the_kill < len(expected), "the node must die mid-run"
    assert sorted(row["path"] for row in read_rows(output)) == expected
    assert not [p.name for p in output.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    success = json.loads((output / "_SUCCESS.json").read_text())
    assert (success["images"], success["duplicate_paths"]) == (len(expected), 0)


def test_training_resumes_from_its_checkpoint_once_a_new_node_replaces_a_dead_one(tmp_path, shapes):
    """The node of the only training worker dies after a checkpoint; a new node comes (as an
    autoscaler would bring one) and the run resumes from that checkpoint, each epoch once."""
    run = tmp_path / "run"
    epochs = 4
    with MultiNodeCluster(head_cpus=1) as cluster:
        cluster.add_node("a", num_cpus=2)
        job = start_job(
            cluster, "jobs.train", "--train-annotations", shapes.annotations_uri,
            "--train-images", shapes.images_root, "--output", str(run), "--preset", "tiny",
            "--num-workers", "1", "--cpus-per-worker", "2", "--epochs", str(epochs),
            "--batch-size", "4", "--max-failures", "1",
        )  # fmt: skip
        metrics = run / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and metrics.read_text().strip(), job, "a first checkpoint")
        epochs_at_the_kill = len(metrics.read_text().splitlines())
        cluster.kill_node("a")
        cluster.add_node("b", num_cpus=2)
        stdout, stderr = finish(job)
    assert job.returncode == 0, stderr[-3000:]
    assert epochs_at_the_kill < epochs, "the node must die mid-run"
    history = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [record["epoch"] for record in history] == list(range(1, epochs + 1))
    assert "resuming from checkpoint" in stdout + stderr
    assert (run / "model" / "model.json").exists()
