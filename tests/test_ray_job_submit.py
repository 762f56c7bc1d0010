"""Every job runs unchanged under `ray job submit` against a running cluster.

A real `ray start --head` on 127.0.0.1 with free ports plays the cluster; the jobs are submitted
with the `ray job submit` CLI exactly as a user would, and must join that cluster (RAY_ADDRESS is
set by the job supervisor) instead of starting their own Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from mrcnn.shapes import generate_shapes

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TERMINAL = ("succeeded", "failed", "stopped")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster(free_ports):
    """A one-node Ray cluster started with `ray start --head --block`; yields the job API address."""
    env = _environment()
    dashboard_port = free_ports()
    # A short temp dir: Ray's Unix socket paths must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="rjs-", dir="/tmp")
    head = subprocess.Popen(
        [
            str(BIN / "ray"), "start", "--head", "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={free_ports()}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={free_ports()}",
            f"--dashboard-agent-listen-port={free_ports()}",
            f"--metrics-export-port={free_ports()}",
            f"--runtime-env-agent-port={free_ports()}",
            "--num-cpus=2",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        ],  # fmt: skip
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_for_job_api(address, head)
        yield address
    finally:
        # Only this cluster's processes: `ray stop` would also stop the tests' own local Ray.
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_training_then_segmentation_jobs_succeed_on_the_cluster(ray_cluster, tmp_path):
    train = generate_shapes(str(tmp_path / "train"), 8, seed=1, size=64)
    val = generate_shapes(str(tmp_path / "val"), 4, seed=2, size=64)
    run = tmp_path / "run"

    _submit(
        ray_cluster,
        "python -m jobs.train"
        f" --train-annotations {train.annotations_uri} --train-images {train.images_root}"
        f" --val-annotations {val.annotations_uri} --val-images {val.images_root}"
        f" --output {run} --preset tiny --num-workers 1 --epochs 1 --batch-size 4",
    )
    assert (run / "model" / "model.json").exists()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1

    masks = tmp_path / "masks"
    _submit(
        ray_cluster,
        f"python -m jobs.segment --input {val.images_root} --output {masks} --model {run / 'model'}"
        " --score-threshold 0.05 --gpus-per-actor 0 --batch-size 2",
    )
    rows = pads.dataset(str(masks), format="parquet").to_table().to_pylist()
    assert sorted(row["path"] for row in rows) == sorted(str(p) for p in Path(val.images_root).iterdir())
    assert all(row["error"] is None for row in rows)
    success = json.loads((masks / "_SUCCESS.json").read_text())
    assert success["images"] == 4 and success["errors"] == 0


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    # A new cluster requires a token (Ray >= 2.52); the CLI must be told to send it.
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def _ray(*args: str) -> subprocess.CompletedProcess:
    """Run the `ray` CLI of this environment, as a user on the cluster's machine would."""
    return subprocess.run([str(BIN / "ray"), *args], env=_environment(), capture_output=True, text=True)


def _wait_for_job_api(address: str, head: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}")
        if _ray("job", "list", "--address", address).returncode == 0:
            return
        time.sleep(2)
    raise RuntimeError("the Ray job API did not come up within 120 s")


def _submit(address: str, entrypoint: str) -> None:
    """`ray job submit --working-dir <repo>` and wait for a terminal state; fail unless SUCCEEDED."""
    submitted = _ray(
        "job", "submit", "--address", address, "--working-dir", str(REPO), "--no-wait", "--",
        *entrypoint.split(),
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job_id = next(
        word.strip("'\"") for word in submitted.stdout.split() if word.strip("'\"").startswith("raysubmit_")
    )
    deadline = time.monotonic() + 600
    status = ""
    while time.monotonic() < deadline and status not in TERMINAL:
        time.sleep(3)
        # The CLI says e.g. "Job 'raysubmit_...' succeeded".
        reported = _ray("job", "status", "--address", address, job_id).stdout.lower()
        status = next((state for state in TERMINAL if f"' {state}" in reported), reported)
    logs = _ray("job", "logs", "--address", address, job_id).stdout
    assert status == "succeeded", f"{entrypoint}\n{status}\n{logs[-4000:]}"
