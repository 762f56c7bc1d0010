"""Every job runs unchanged under `ray job submit` against a running cluster.

A real `ray start --head` on 127.0.0.1, with cluster.yaml's flags and environment (token auth
on) and free ports, plays the cluster; the jobs are submitted with the `ray job submit` CLI
exactly as README's cluster section has a user do it, and must join that cluster (RAY_ADDRESS is
set by the job supervisor) instead of starting their own Ray.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from local_head import REPO, generate_token, local_head, ray_cli, submit_job

from mrcnn.shapes import generate_shapes
from pipeline.train.metrics import read_history

# What a user passes with `ray job submit --runtime-env-json` for a cluster in another region.
RUNTIME_ENV = {"env_vars": {"AWS_REGION": "eu-west-1", "MRCNN_S3_MAX_ATTEMPTS": "7"}}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster(free_ports, tmp_path_factory):
    """A one-node Ray cluster started as cluster.yaml starts its head; yields its job API address.

    Its token is the one `ray get-auth-token --generate` wrote under the module's HOME, as README
    has the user generate it before `ray up`.
    """
    home = tmp_path_factory.mktemp("home")
    generate_token(home)
    with local_head(home, free_ports) as address:
        yield address, home


def test_every_job_succeeds_under_ray_job_submit(ray_cluster, tmp_path):
    """make_shapes, train, segment and evaluate, each submitted as README's cluster section shows.

    Training and segmentation also get `--runtime-env-json` with storage settings, as a user sets
    `AWS_REGION` for a cluster: the submitted runtime env must reach the job without clashing with
    what the job forwards to its workers itself (Ray refuses a `ray.init` runtime env that names a
    variable the submitted one names).
    """
    train, val = tmp_path / "train", tmp_path / "val"
    _submit(ray_cluster, f"python -m jobs.make_shapes {train} --num-images 8 --seed 1 --size 64")
    assert len(list((train / "images").iterdir())) == 8
    assert len(json.loads((train / "annotations.json").read_text())["images"]) == 8
    # The validation set as the job above writes it, made here: one submission of it is the test.
    generate_shapes(str(val), 4, seed=2, size=64)

    run = tmp_path / "run"
    _submit(
        ray_cluster,
        "python -m jobs.train"
        f" --train-annotations {train / 'annotations.json'} --train-images {train / 'images'}"
        f" --val-annotations {val / 'annotations.json'} --val-images {val / 'images'}"
        f" --output {run} --preset tiny --num-workers 1 --epochs 1 --batch-size 4",
        runtime_env=RUNTIME_ENV,
    )
    assert (run / "model" / "model.json").exists()
    assert len(read_history(str(run / "metrics.jsonl"))) == 1

    masks = tmp_path / "masks"
    # Default flags on a head with CPUs only: `--gpus-per-actor auto` finds no GPU and no node type
    # with one, and runs CPU actors instead of waiting out --resource-timeout.
    logs = _submit(
        ray_cluster,
        f"python -m jobs.segment --input {val / 'images'} --output {masks} --model {run / 'model'}"
        " --score-threshold 0.05 --batch-size 2",
        runtime_env=RUNTIME_ENV,
    )
    assert "segment: inference actors on CPUs (the cluster has no GPU node" in logs
    rows = pads.dataset(str(masks), format="parquet").to_table().to_pylist()
    assert sorted(row["path"] for row in rows) == sorted(str(p) for p in (val / "images").iterdir())
    assert all(row["error"] is None for row in rows)
    success = json.loads((masks / "_SUCCESS.json").read_text())
    assert success["images"] == 4 and success["errors"] == 0

    scores = tmp_path / "eval.json"
    _submit(
        ray_cluster,
        f"python -m jobs.evaluate --predictions {masks} --annotations {val / 'annotations.json'}"
        f" --json {scores}",
    )
    stats = json.loads(scores.read_text())
    # The same model, threshold (0.05, the model's own), precision and images as the run's
    # validation: jobs.segment + jobs.evaluate give exactly the AP the training reported.
    reported = read_history(str(run / "metrics.jsonl"))[-1]
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AR100"):
            assert stats[iou_type][name] == reported[iou_type][name], (iou_type, name)


def test_gpus_a_cpu_only_cluster_can_never_give_end_each_job_at_once_in_one_line(
    ray_cluster, tmp_path, model_dir
):
    """`--gpus-per-actor 1` and `jobs.train --use-gpu` on a head with CPUs only and no autoscaler:
    Ray reports the request infeasible, and the job says so in one line (exit 2) instead of waiting
    out the default --resource-timeout of 1200 s (the submission is given 600 s in all)."""
    data = tmp_path / "data"
    generate_shapes(str(data), 4, seed=1, size=64)
    segment = _submit(
        ray_cluster,
        f"python -m jobs.segment --input {data / 'images'} --output {tmp_path / 'masks'} "
        f"--model {model_dir} --gpus-per-actor 1",
        expect="failed",
    )
    train = _submit(
        ray_cluster,
        f"python -m jobs.train --train-annotations {data / 'annotations.json'} "
        f"--train-images {data / 'images'} --output {tmp_path / 'run'} --preset tiny "
        "--num-workers 1 --use-gpu",
        expect="failed",
    )
    for logs, prog, what, way_out in (
        (segment, "segment", "an inference actor of 1 CPU and 1 GPU", "--gpus-per-actor 0"),
        (train, "train", "a training worker of 1 CPU and 1 GPU", "leave --use-gpu out"),
    ):
        last = logs.strip().splitlines()[-1]
        assert last.startswith(f"{prog}: error: {what} can never be placed"), logs[-3000:]
        assert way_out in last and "node type" in last
        assert "Traceback" not in logs
    assert not (tmp_path / "masks").exists() or not list((tmp_path / "masks").glob("part-*"))


def test_submitted_env_vars_reach_the_workers_of_a_job(ray_cluster):
    """A variable set with `--runtime-env-json` is what the job's Ray tasks see, not the node's."""
    probe = """
import os, ray
from pipeline.cluster.session import ray_session

with ray_session():
    print("task sees", ray.get(ray.remote(lambda: os.environ.get("AWS_REGION")).remote()))
"""
    logs = _submit(ray_cluster, ["python", "-c", probe], runtime_env=RUNTIME_ENV)
    assert f"task sees {RUNTIME_ENV['env_vars']['AWS_REGION']}" in logs


def test_working_dir_uploads_the_code_but_no_environment_or_outputs(ray_cluster, tmp_path):
    """`--working-dir .` in a checkout where `make setup` and `make demo` ran ships only the code."""
    checkout = tmp_path / "checkout"
    # The checkout's code; its environment and outputs are made below (copying the real .venv would
    # copy gigabytes for nothing: one file in it is as good a test of the exclusion).
    skipped = shutil.ignore_patterns(".git", "__pycache__", ".*_cache", ".venv", "demo-output")
    shutil.copytree(REPO, checkout, ignore=skipped)
    for junk in (
        ".venv/lib/python3.11/site-packages/torch/big.so",
        "demo-output/model/weights.pt",
        "bench-output/table.json",
        "build/lib/jobs/train.py",
        "ray_mask_rcnn.egg-info/PKG-INFO",
    ):
        (checkout / junk).parent.mkdir(parents=True, exist_ok=True)
        (checkout / junk).write_bytes(b"0" * 1024)
    lister = "import pathlib; print(sorted(str(p) for p in pathlib.Path('.').rglob('*') if p.is_file()))"
    logs = _submit(ray_cluster, ["python", "-c", lister], working_dir=checkout)
    uploaded = ast.literal_eval(next(line for line in logs.splitlines() if line.startswith("[")))
    assert "jobs/segment.py" in uploaded and "pyproject.toml" in uploaded
    junk_roots = {".venv", "demo-output", "bench-output", "build", "ray_mask_rcnn.egg-info"}
    assert [path for path in uploaded if path.split("/")[0] in junk_roots] == []


def _submit(
    cluster: tuple[str, Path],
    entrypoint: str | list[str],
    runtime_env: dict | None = None,
    working_dir: Path = REPO,
    expect: str = "succeeded",
) -> str:
    """`ray job submit --working-dir DIR [--runtime-env-json ...]`, waited for by the CLI itself
    (it tails the logs until the job ends: one process, not a `ray job status` every few seconds);
    fail unless the job ends as `expect` says (SUCCEEDED by default).

    Returns the job's logs.
    """
    address, home = cluster
    argv = entrypoint.split() if isinstance(entrypoint, str) else entrypoint
    options = ["--runtime-env-json", json.dumps(runtime_env)] if runtime_env else []
    submitted = submit_job(
        home, "--address", address, "--working-dir", str(working_dir), *options, "--", *argv,
        RAY_AUTH_MODE="token", timeout=600,
    )  # fmt: skip
    # The CLI ends with e.g. "Job 'raysubmit_...' succeeded" (exit 0) or "... failed" (exit 1).
    ended = re.findall(r"Job '(raysubmit_\w+)' (succeeded|failed|was stopped)", submitted.stdout)
    assert ended, f"{entrypoint}\n{submitted.stdout[-3000:]}\n{submitted.stderr[-3000:]}"
    job_id, status = ended[-1]
    logs = ray_cli(home, "job", "logs", "--address", address, job_id, RAY_AUTH_MODE="token").stdout
    assert status == expect, f"{entrypoint}\n{status}\n{logs[-4000:]}"
    return logs
