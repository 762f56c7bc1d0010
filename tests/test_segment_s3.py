"""jobs.segment on S3 as on an EC2 node: a bucket in eu-west-1, no region variables, model on S3 too.

One job runs as `python -m jobs.segment` (its own local Ray, so that no region variable reaches
any of its processes) through a proxy in front of moto that counts TCP connections and answers a
request signed for the wrong region as S3 does (moto itself accepts any region). Every process of
the job appends one line per S3 client it builds to `MRCNN_S3_TRACE`.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from types import SimpleNamespace

import boto3
import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
from PIL import Image
from s3_proxy import FlakyS3Proxy

from mrcnn import storage
from mrcnn.categories import Category
from mrcnn.model import build_model
from mrcnn.model_folder import save_model_folder, spec_for

IMAGES = 40
ROWS_PER_FILE = 8


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def eu_job(s3_server, tmp_path_factory):
    """The job's result, its proxy's counts and its processes' S3 client trace."""
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="eu-west-1").create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
    )
    torch.manual_seed(0)
    model = build_model("tiny", 3)
    model_uri = f"s3://{bucket}/model"
    save_model_folder(model, spec_for(model, (Category(1, "a"), Category(2, "b"))), model_uri)
    for i in range(IMAGES):
        storage.write_bytes(f"s3://{bucket}/photos/{i:02d}.png", png(i))
    trace = tmp_path_factory.mktemp("trace") / "s3-clients.jsonl"
    output = f"s3://{bucket}/masks"
    argv = ["--input", f"s3://{bucket}/photos", "--output", output, "--model", model_uri,
            "--batch-size", "4", "--rows-per-file", str(ROWS_PER_FILE), "--num-cpus", "2"]  # fmt: skip
    with FlakyS3Proxy(s3_server, {}, bucket_regions={bucket: "eu-west-1"}) as proxy:
        env = {**os.environ, "PYTHONPATH": os.getcwd(), "AWS_ENDPOINT_URL": proxy.url}
        env["MRCNN_S3_TRACE"] = str(trace)
        for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "RAY_ADDRESS"):
            env.pop(name, None)
        command = [sys.executable, "-m", "jobs.segment", *argv]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    clients = [json.loads(line) for line in trace.read_text().splitlines()] if trace.exists() else []
    return SimpleNamespace(bucket=bucket, output=output, proxy=proxy, clients=clients)


def test_rows_are_written_and_read_back_in_a_bucket_of_another_region(eu_job):
    filesystem, path = storage.resolve(eu_job.output)
    rows = pads.dataset(path, filesystem=filesystem, format="parquet").to_table().to_pylist()
    expected = [f"s3://{eu_job.bucket}/photos/{i:02d}.png" for i in range(IMAGES)]
    assert sorted(row["path"] for row in rows) == expected
    assert all(row["error"] is None for row in rows)
    assert json.loads(storage.read_bytes(f"{eu_job.output}/_SUCCESS.json"))["images"] == IMAGES


def test_each_process_builds_one_filesystem_for_the_bucket_region(eu_job):
    filesystems = Counter(client["pid"] for client in eu_job.clients if client["kind"] == "pyarrow")
    boto3_clients = Counter(client["pid"] for client in eu_job.clients if client["kind"] == "boto3")
    # The driver, the lister, decode and commit tasks, the inference actor: several processes...
    assert len(set(filesystems) | set(boto3_clients)) >= 3, eu_job.clients
    # ... each with at most one native filesystem (listings, existence checks) for all its work
    # (40 images, 5 parts, the model) ...
    assert max(filesystems.values()) == 1, filesystems
    # ... and at most a boto3 client to ask the bucket's region and one in that region for the
    # whole-object reads and writes and the listing.
    assert max(boto3_clients.values()) <= 2, boto3_clients
    assert {c["region"] for c in eu_job.clients if c["kind"] == "pyarrow"} == {"eu-west-1"}


def test_connections_are_reused_across_objects(eu_job):
    log = eu_job.proxy.log
    objects = {(method, path.split("?")[0]) for method, path, _, _ in log if method in ("GET", "PUT")}
    assert len(objects) >= IMAGES + IMAGES // ROWS_PER_FILE
    # Measured: 10 connections for 54 objects (a filesystem per object made 57).
    assert eu_job.proxy.connections < len(objects) / 2, (eu_job.proxy.connections, len(objects))
