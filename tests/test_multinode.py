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
from ray_cluster import FakeAutoscalingCluster, MultiNodeCluster, processes_of

from mrcnn.shapes import generate_shapes
from pipeline.train.metrics import read_history

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


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


def read_rows(output: Path) -> list[dict]:
    return pads.dataset(str(output), format="parquet").to_table().to_pylist()


def test_segmentation_completes_when_the_node_of_its_inference_actor_dies(tmp_path, model_dir, shapes):
    """The actor's node crashes mid-run; the actor comes back on the other node, every input once."""
    output = tmp_path / "masks"
    expected = sorted(str(path) for path in Path(shapes.images_root).iterdir())
    with MultiNodeCluster(head_cpus=1) as cluster:
        # The actor needs 2 CPUs: only worker nodes fit it, never the 1-CPU head.
        cluster.add_node("a", num_cpus=2)
        cluster.add_node("b", num_cpus=2)
        job = start_job(
            cluster, "jobs.segment", "--input", shapes.images_root, "--output", str(output),
            "--model", model_dir, "--gpus-per-actor", "0", "--cpus-per-actor", "2",
            "--batch-size", "2", "--rows-per-file", "2", "--score-threshold", "0.05",
        )  # fmt: skip
        wait_for(lambda: any(output.glob("part-*.parquet")), job, "a committed part file")
        actors = processes_of(cluster.env, "Segmenter")
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
        wait_for(lambda: read_history(str(metrics)), job, "a first checkpoint")
        epochs_at_the_kill = len(read_history(str(metrics)))
        cluster.kill_node("a")
        cluster.add_node("b", num_cpus=2)
        stdout, stderr = finish(job)
    assert job.returncode == 0, stderr[-3000:]
    assert epochs_at_the_kill < epochs, "the node must die mid-run"
    history = read_history(str(metrics))
    assert [record["epoch"] for record in history] == list(range(1, epochs + 1))
    assert "resuming from checkpoint" in stdout + stderr
    assert (run / "model" / "model.json").exists()


def run_job(env: dict, module: str, *argv: str, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *argv], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def last_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def test_local_paths_that_another_node_does_not_see_are_refused_before_any_work(tmp_path, model_dir, shapes):
    """A node whose filesystem lacks the driver's folder (a tmpfs over it in a mount namespace of
    its own, as a node without the shared mount would be): both jobs exit 2 with one line."""
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("this machine cannot make mount namespaces (unshare --mount)")
    hidden = tmp_path / "only-on-the-driver"
    hidden.mkdir()
    visible = Path(model_dir).parent
    with MultiNodeCluster(head_cpus=1) as cluster:
        cluster.add_isolated_node(num_cpus=1, hidden_folder=str(hidden))
        segment = run_job(
            cluster.job_env, "jobs.segment", "--input", shapes.images_root, "--output",
            str(hidden / "masks"), "--model", model_dir, "--gpus-per-actor", "0",
        )  # fmt: skip
        train_data = hidden / "shapes"
        copy = generate_shapes(str(train_data), 4, seed=3, size=64)
        train = run_job(
            cluster.job_env, "jobs.train", "--train-annotations", copy.annotations_uri,
            "--train-images", copy.images_root, "--output", str(visible / "run"), "--preset", "tiny",
            "--num-workers", "1",
        )  # fmt: skip
    assert segment.returncode == 2, segment.stderr[-3000:]
    assert last_line(segment).startswith(f"segment: error: --output {hidden / 'masks'} ")
    assert "on node" in last_line(segment) and "s3://" in last_line(segment)
    assert not list((hidden / "masks").glob("part-*")) and not (hidden / "masks" / "_JOB.json").exists()
    assert train.returncode == 2, train.stderr[-3000:]
    assert last_line(train).startswith("train: error: --train-")
    assert "differs from the driver's copy" in last_line(train)
    assert not (visible / "run" / "checkpoints").exists()


def test_gpu_actors_on_a_cluster_with_no_gpu_and_nothing_to_add_one_end_at_once_in_one_line(
    tmp_path, model_dir, shapes
):
    """`--gpus-per-actor 1` on a cluster of `ray.cluster_utils` with CPUs only: reported infeasible
    in one line (exit 2) at once, not after the default --resource-timeout of 1200 s (the job is
    given 420 s in all). The same on a head started as cluster.yaml starts it, and the default
    `auto` running CPU actors there, are in tests/test_ray_job_submit.py."""
    with MultiNodeCluster(head_cpus=2) as cluster:
        segment = run_job(
            cluster.job_env, "jobs.segment", "--input", shapes.images_root, "--output",
            str(tmp_path / "gpu-masks"), "--model", model_dir, "--gpus-per-actor", "1",
        )  # fmt: skip
    assert segment.returncode == 2, segment.stderr[-3000:]
    assert last_line(segment).startswith(
        "segment: error: an inference actor of 1 CPU and 1 GPU can never be placed: no node of the "
        "cluster and no node type of its autoscaler holds it; use --gpus-per-actor 0"
    ), segment.stderr[-3000:]
    assert "Traceback" not in segment.stderr
    assert not list((tmp_path / "gpu-masks").glob("part-*"))


@pytest.fixture(scope="module")
def gpu_autoscaling_cluster(free_ports):
    """A CPU head and a `gpu` node type ({CPU: 1, GPU: 1}) that Ray's fake autoscaler launches."""
    with FakeAutoscalingCluster(2, {"gpu": {"CPU": 1, "GPU": 1}}, free_ports) as cluster:
        yield cluster


def test_gpu_actors_are_requested_from_a_cluster_with_no_gpu_yet_and_a_gpu_without_cuda_is_one_line(
    gpu_autoscaling_cluster, tmp_path, model_dir, shapes
):
    """The cluster holds no GPU when the job starts; `--gpus-per-actor auto` (the default) finds the
    autoscaler's GPU node type and asks for one, the autoscaler launches a GPU node, and the actor
    there, whose torch sees no CUDA device on this machine, stops the job with one line naming
    that node: no CPU fallback, and none of Ray's tracebacks before the line."""
    segment = run_job(
        gpu_autoscaling_cluster.job_env, "jobs.segment", "--input", shapes.images_root,
        "--output", str(tmp_path / "masks"), "--model", model_dir, "--resource-timeout", "300",
    )  # fmt: skip
    assert segment.returncode == 1, segment.stderr[-3000:]
    assert "segment: inference actors on GPUs (" in segment.stdout
    assert "Traceback" not in segment.stderr and "file an issue" not in segment.stderr
    line = last_line(segment)
    assert line.startswith("segment: error: GpuUnavailableError: node "), segment.stderr[-3000:]
    # The fake provider's node ids: ffff...f00001 and on are the nodes it launched.
    assert "Ray node ffffffffffff" in line and "was given a GPU by Ray but torch" in line
    assert not list((tmp_path / "masks").glob("part-*"))


def test_gpu_training_workers_without_cuda_fail_before_training_with_one_line(
    gpu_autoscaling_cluster, tmp_path, shapes
):
    train = run_job(
        gpu_autoscaling_cluster.job_env, "jobs.train", "--train-annotations", shapes.annotations_uri,
        "--train-images", shapes.images_root, "--output", str(tmp_path / "run"), "--preset", "tiny",
        "--num-workers", "1", "--use-gpu", "--resource-timeout", "300",
    )  # fmt: skip
    assert train.returncode == 1, train.stderr[-3000:]
    assert "Traceback" not in train.stderr
    line = last_line(train)
    assert line.startswith("train: error: training failed: GpuUnavailableError: node "), train.stderr[-3000:]
    assert "Ray node ffffffffffff" in line and "was given a GPU by Ray but torch" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
