"""Shared fixtures: a real S3 (moto server on 127.0.0.1) and a real local Ray.

Nothing here is mocked: the S3 fixture is an HTTP server that boto3 and pyarrow reach through the
standard `AWS_ENDPOINT_URL` variable, and the Ray fixture is `ray.init` on this machine.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest

# Tests never reach real AWS: dummy credentials unless a test sets its own endpoint.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
# Ray workers inherit the environment of `ray.init`; keep their start-up quiet and local.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def free_ports():
    """A function returning a free TCP port on 127.0.0.1 at each call."""
    return free_port


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 for the whole session; yields its endpoint URL.

    `AWS_ENDPOINT_URL` is set for this process and for every process started after it (Ray
    workers included), so pyarrow and boto3 both talk to it.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    previous = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        yield endpoint
    finally:
        if previous is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = previous
        server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the moto server; yields `s3://<bucket>`."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A real local Ray (2 CPUs) shared by the session, as a job's own Ray is: its dashboard on a
    port of 127.0.0.1, whose address its processes get for Ray's state API
    (`pipeline.cluster.session`).

    It depends on `s3_server` so that Ray's worker processes start with `AWS_ENDPOINT_URL` already
    in their environment.
    """
    import ray

    from pipeline.cluster.session import API_SERVER_ENV, LOCALHOST, free_local_port

    if not ray.is_initialized():
        port = free_local_port()
        api_server = os.environ[API_SERVER_ENV] = f"http://{LOCALHOST}:{port}"
        ray.init(
            # A new Ray of this process, never a cluster that another test (or anyone) started on
            # this machine, which `ray.init()` would otherwise find and join.
            address="local",
            num_cpus=2,
            dashboard_host=LOCALHOST,
            dashboard_port=port,
            configure_logging=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"AWS_ENDPOINT_URL": s3_server, API_SERVER_ENV: api_server}},
        )
    yield ray
    ray.shutdown()
    os.environ.pop(API_SERVER_ENV, None)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """A tiny random Mask R-CNN folder whose categories have gapped ids (3, 7, 8)."""
    import torch

    from mrcnn.categories import Category
    from mrcnn.model import build_model
    from mrcnn.model_folder import save_model_folder, spec_for

    categories = (Category(3, "circle"), Category(7, "square"), Category(8, "triangle"))
    torch.manual_seed(0)
    model = build_model("tiny", len(categories) + 1)
    uri = str(tmp_path_factory.mktemp("model") / "model")
    save_model_folder(model, spec_for(model, categories), uri)
    return uri
