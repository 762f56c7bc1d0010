"""mrcnn.storage against a real S3 (moto): one client per process, reused connections, bucket regions.

The proxy of `s3_proxy` sits between the client and moto to count TCP connections and, for a bucket
in another region, to answer as S3 does a request signed for the wrong region (moto accepts any).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import uuid
from collections import Counter
from pathlib import Path

import boto3
import pytest
from s3_proxy import FlakyS3Proxy

from mrcnn import s3_clients, storage


def new_bucket(endpoint: str, region: str) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name=region)
    if region == "us-east-1":
        client.create_bucket(Bucket=name)
    else:
        client.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": region})
    return name


def clients_built(trace: Path, pid: int) -> dict[str, int]:
    """How many S3 clients of each kind process `pid` built, from its `MRCNN_S3_TRACE` lines."""
    lines = [json.loads(line) for line in trace.read_text().splitlines()] if trace.exists() else []
    return dict(Counter(line["kind"] for line in lines if line["pid"] == pid and line["kind"] != "retry"))


def test_threads_share_one_filesystem_and_its_connections(s3_server, monkeypatch, tmp_path):
    bucket = new_bucket(s3_server, "us-east-1")
    trace = tmp_path / "clients.jsonl"
    monkeypatch.setenv(s3_clients.S3_TRACE_ENV, str(trace))
    with FlakyS3Proxy(s3_server, {}) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # a new endpoint: new clients
        filesystems = []

        def work(thread: int) -> None:
            for i in range(10):
                uri = f"s3://{bucket}/t{thread}/{i}.bin"
                storage.write_bytes(uri, f"{thread}-{i}".encode())
                assert storage.read_bytes(uri) == f"{thread}-{i}".encode()
                assert storage.exists(uri)
                filesystems.append(storage.resolve(uri)[0])

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(filesystems) == 40 and len({id(fs) for fs in filesystems}) == 1
    # One native filesystem (the existence checks) and one boto3 client (whole-object GETs and
    # PUTs) for the 40 objects and 4 threads.
    assert clients_built(trace, os.getpid()) == {"pyarrow": 1, "boto3": 1}
    # 120 requests (a PUT, a GET and a HEAD per object) over a handful of connections.
    assert proxy.requests >= 120 and proxy.connections <= 12, (proxy.requests, proxy.connections)


def test_another_endpoint_gets_its_own_filesystem_and_the_first_is_kept(s3_bucket, s3_server, monkeypatch):
    uri = f"{s3_bucket}/a.txt"
    storage.write_bytes(uri, b"hello")
    direct = storage.resolve(uri)[0]
    with FlakyS3Proxy(s3_server, {}) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        proxied = storage.resolve(uri)[0]
        assert proxied is not direct
        assert storage.read_bytes(uri) == b"hello" and proxy.requests > 0
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    assert storage.resolve(uri)[0] is direct


def _child(uri: str, queue) -> None:
    queue.put((os.getpid(), storage.read_bytes(uri)))


def test_a_forked_child_builds_its_own_filesystem(s3_bucket, monkeypatch, tmp_path):
    """The child must not use its parent's client: the two would share its open connections."""
    uri = f"{s3_bucket}/fork.txt"
    storage.write_bytes(uri, b"parent")  # the parent's client exists before the fork
    trace = tmp_path / "clients.jsonl"
    monkeypatch.setenv(s3_clients.S3_TRACE_ENV, str(trace))
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=(uri, queue))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    pid, data = queue.get(timeout=5)
    assert data == b"parent" and clients_built(trace, pid) == {"boto3": 1}  # its own, not inherited
    assert storage.read_bytes(uri) == b"parent"  # and the parent's client still works
    assert clients_built(trace, os.getpid()) == {}  # which it did not build again


@pytest.fixture
def no_region(monkeypatch):
    """No AWS_REGION / AWS_DEFAULT_REGION, as on an EC2 node."""
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)


def test_a_bucket_in_another_region_is_read_and_written_with_no_region_set(s3_server, no_region, monkeypatch):
    bucket = new_bucket(s3_server, "eu-west-1")
    with FlakyS3Proxy(s3_server, {}, bucket_regions={bucket: "eu-west-1"}) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        storage.write_bytes(f"s3://{bucket}/dir/a.txt", b"bonjour")
        assert storage.read_bytes(f"s3://{bucket}/dir/a.txt") == b"bonjour"
        assert list(storage.read_chunks(f"s3://{bucket}/dir/a.txt", chunk_bytes=3)) == [b"bon", b"jou", b"r"]
        assert storage.exists(f"s3://{bucket}/dir/a.txt")
        assert list(storage.iter_files(f"s3://{bucket}/dir")) == [f"s3://{bucket}/dir/a.txt"]
        assert s3_clients.bucket_region(bucket) == "eu-west-1"
        storage.delete(f"s3://{bucket}/dir/a.txt")
        assert not storage.exists(f"s3://{bucket}/dir/a.txt")


def test_with_a_custom_endpoint_a_configured_region_is_taken_as_it_is(s3_server, monkeypatch):
    """An S3-compatible store whose region the user set: no lookup, the setting wins."""
    bucket = new_bucket(s3_server, "eu-west-1")
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    assert s3_clients.bucket_region(bucket) == "us-west-2"
