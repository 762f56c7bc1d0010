"""The rules behind the cluster path, on one node: what is requested, what is checked, what is said.

The multi-node behaviour itself (nodes dying, an autoscaler launching GPU nodes, a node without
the shared mount) is in `tests/test_multinode.py`.
"""

from __future__ import annotations

import socket
import time

import pytest
import torch

from mrcnn import storage
from pipeline.cluster.gpu import GpuUnavailableError, gpus_to_request, require_cuda
from pipeline.cluster.ray_compat import check_ray_version, worker_group_start_retries
from pipeline.cluster.ray_errors import cause_line, root_cause
from pipeline.cluster.shared_storage import (
    MARKER_NAME,
    SharedStorageError,
    check_local_paths,
    fingerprint,
    is_local_path,
)
from pipeline.train.workers import default_worker_cpus


@pytest.mark.parametrize(
    ("flag", "joined", "cluster_gpus", "requested"),
    [
        (1.0, True, 0, 1.0),  # a cluster whose GPU nodes scale from zero: ask anyway
        (0.5, True, 8, 0.5),
        (1.0, False, 0, 0.0),  # the job's own Ray on a machine without GPUs: CPU actors
        (1.0, False, 2, 1.0),  # ... and with GPUs: use them
        (0.0, True, 8, 0.0),  # --gpus-per-actor 0: CPU actors everywhere
    ],
)
def test_gpus_requested_follow_the_flag_on_a_cluster_and_the_machine_on_a_local_ray(
    flag, joined, cluster_gpus, requested
):
    assert gpus_to_request(flag, joined, cluster_gpus) == requested


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_require_cuda_names_the_host_and_the_cause_in_one_line():
    with pytest.raises(GpuUnavailableError) as raised:
        require_cuda()
    message = str(raised.value)
    assert "\n" not in message
    # "host <name>" in a plain process, "node <ip> (<name>, Ray node <id>)" once Ray is up in it
    # (an earlier test's Ray, depending on the order tests run in).
    assert message.startswith(("host ", "node ")) and socket.gethostname() in message
    assert "was given a GPU by Ray but torch" in message
    cause = "CPU-only build" if torch.version.cuda is None else "finds no usable CUDA device"
    assert cause in message


def test_errors_wrapped_by_ray_give_the_original_one_line(ray_local):
    @ray_local.remote
    def fail():
        raise GpuUnavailableError("node 10.0.0.7 was given a GPU by Ray but torch sees none")

    with pytest.raises(ray_local.exceptions.RayTaskError) as raised:
        ray_local.get(fail.remote())
    assert isinstance(root_cause(raised.value), GpuUnavailableError)
    assert cause_line(raised.value) == (
        "GpuUnavailableError: node 10.0.0.7 was given a GPU by Ray but torch sees none"
    )


def test_resource_timeout_becomes_ray_trains_number_of_placement_tries(monkeypatch):
    monkeypatch.delenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", raising=False)
    # Ray Train waits 60 s per try; the first try is not a retry.
    assert [worker_group_start_retries(s) for s in (30, 60, 61, 1200)] == [0, 0, 1, 19]
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "5")
    assert worker_group_start_retries(10) == 1


def test_the_private_ray_names_the_project_uses_exist_in_this_ray():
    check_ray_version()


@pytest.mark.parametrize(
    ("uri", "local"),
    [
        ("/data/out", True),
        ("runs/out", True),
        ("file:///data/out", True),
        ("s3://bucket/out", False),
        ("torchvision:maskrcnn_resnet50_fpn_v2", False),
        (None, False),
    ],
)
def test_only_local_paths_are_checked(uri, local):
    assert is_local_path(uri) is local


def test_on_one_node_markers_are_written_and_verified_by_writers(ray_local, tmp_path):
    output = tmp_path / "out"
    markers = check_local_paths({"--output": str(output)}, {"--input": str(tmp_path)})
    marker = markers["--output"]
    assert (output / MARKER_NAME).read_text() == marker.token
    marker.verify()
    (output / MARKER_NAME).write_text("another run's token")
    stale = type(marker)(marker.flag, marker.folder, "a token this process never verified")
    with pytest.raises(SharedStorageError) as raised:
        stale.verify()
    assert str(raised.value).startswith(f"--output {output} is a local path that ")
    assert "s3://" in str(raised.value)


def test_s3_uris_get_no_marker(ray_local, s3_bucket):
    assert check_local_paths({"--output": f"{s3_bucket}/out"}, {"--model": f"{s3_bucket}/m"}) == {}
    assert not storage.exists(f"{s3_bucket}/out/{MARKER_NAME}")


def test_fingerprints_tell_copies_apart_by_content(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"1234")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.png").write_bytes(b"1234")
    assert fingerprint(str(tmp_path / "a" / "x.png")) == fingerprint(str(tmp_path / "b" / "x.png"))
    (tmp_path / "b" / "x.png").write_bytes(b"12345")
    assert fingerprint(str(tmp_path / "a" / "x.png")) != fingerprint(str(tmp_path / "b" / "x.png"))
    assert fingerprint(str(tmp_path / "missing")) == {"missing": True}


def test_gpu_workers_are_not_sized_by_the_head_when_no_gpu_node_is_up(ray_local):
    """The tests' Ray has 2 CPUs and no GPU: CPU workers share 3/4 of its CPUs, GPU workers (whose
    nodes an autoscaler will launch) get 1 CPU each rather than a slice of this node."""
    assert default_worker_cpus(2, use_gpu=False) == pytest.approx(0.75)
    assert default_worker_cpus(2, use_gpu=True) == 1.0


@pytest.mark.parametrize("job", ["segment", "train"])
def test_a_ray_without_a_private_name_the_project_needs_stops_each_job_in_one_line(
    job, monkeypatch, capsys, tmp_path, model_dir
):
    """As after a Ray upgrade that renamed one of the names `pipeline.cluster.ray_compat` relies on: a Ray
    Data name for segmentation (which checks no Ray Train name: that would import torch in its
    driver), a Ray Train name for training."""
    from ray.train.v2._internal import constants

    from jobs import segment as segment_job
    from jobs import train as train_job
    from pipeline.cluster import ray_compat

    (tmp_path / "images").mkdir()
    if job == "segment":
        monkeypatch.setattr(ray_compat, "ExecutionCallback", object)
        missing = "ray.data._internal.execution.execution_callback.ExecutionCallback"
        argv = ["--input", str(tmp_path / "images"), "--output", str(tmp_path / "out"), "--model", model_dir]
        assert segment_job.main(argv) == 2
    else:
        monkeypatch.delattr(constants, "ENABLE_PRINT_PATCH_ENV_VAR")
        missing = "ray.train.v2._internal.constants.ENABLE_PRINT_PATCH_ENV_VAR"
        argv = [
            "--train-annotations", str(tmp_path / "a.json"), "--train-images", str(tmp_path / "images"),
            "--output", str(tmp_path / "out"),
        ]  # fmt: skip
        assert train_job.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"{job}: error: Ray {ray_version()} has no {missing}")
    assert "pipeline/cluster/ray_compat.py" in lines[0]
    assert not (tmp_path / "out").exists()


def ray_version() -> str:
    import ray

    return ray.__version__


def test_a_wait_for_resources_says_each_minute_what_it_waits_for(ray_local):
    """The line a job prints every minute (here every 0.2 s) until the wait is over."""
    from pipeline.cluster.placement import WaitReport

    lines: list[str] = []
    with WaitReport(lines.append, "1 inference actor(s)", {"CPU": 1, "GPU": 1}, 1200, every_s=0.2) as report:
        deadline = time.monotonic() + 30
        while len(lines) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        report.stop()
        count = len(lines)
    time.sleep(0.5)
    assert count >= 2 and len(lines) == count  # nothing after stop()
    assert lines[0].startswith("still waiting for 1 inference actor(s) of 1 CPU and 1 GPU after 0 s")
    assert "gives up after 1200 s, --resource-timeout" in lines[0]
    assert lines[-1].endswith("no node of the cluster can hold one yet")


def test_a_request_a_node_holds_is_placeable_without_asking_an_autoscaler(ray_local):
    from pipeline.cluster.placement import check_placement, describe_bundle

    assert check_placement({"CPU": 1, "GPU": 0}).where == "node"
    assert describe_bundle({"CPU": 2.0, "GPU": 1.0, "memory": 1.5 * (1 << 30)}) == (
        "2 CPU and 1 GPU and 1.5 GiB of memory"
    )
