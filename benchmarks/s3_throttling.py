"""S3 under throttling: what the retrying reads and writes cost on a clean store, and what
`jobs.segment` keeps of its throughput when S3 throttles 5 % and 20 % of every kind of request.

    PYTHONPATH=. .venv/bin/python benchmarks/s3_throttling.py [--objects 400] [--images 240]
        [--rounds 2]

Everything runs against a moto server on 127.0.0.1 that this script starts, through the fault
proxy of the tests (`tests/s3_proxy.py`), in one run:
(a) Storage, clean store, proxy passing everything: `--objects` small objects (64 px PNGs,
    ~12 KB) written and read back the way the code did before the retry layer (pyarrow's native
    `S3FileSystem`: `open_output_stream`, `open_input_stream().read()`) and the way it does now
    (`mrcnn.storage.write_bytes` / `read_bytes`: one PUT, one GET without a Range, retried by
    `mrcnn.s3_retry`). Seconds and requests of each, side by side, best of `--rounds`.
(b) `python -m jobs.segment` over `--images` PNGs on S3 (tiny preset, output on S3), the whole
    command, with the proxy throttling 0 %, 5 % and 20 % of every kind of request (`503 SlowDown`
    with S3's XML) and, in the last two, every ranged GET under 512 bytes: images/s of each and
    its ratio to the clean run, with the requests failed and retried.
The headline is last: the clean-store cost of the retry layer (now / before) and the throttled
throughputs as a share of the clean one.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from s3_proxy import KINDS, FlakyS3Proxy  # noqa: E402

from jobs.cli import OneLineParser, bounded  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="s3_throttling.py", description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=bounded(int, 10), default=400)
    parser.add_argument("--images", type=bounded(int, 8), default=240)
    parser.add_argument("--rounds", type=bounded(int, 1), default=2)
    return parser


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def native_round(proxy_url: str, bucket: str, payloads: list[bytes]) -> float:
    """Write and read every payload with a native pyarrow `S3FileSystem` (the code before)."""
    import pyarrow.fs as pafs

    filesystem = pafs.S3FileSystem(
        endpoint_override=proxy_url.removeprefix("http://"), scheme="http", region="us-east-1",
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=10),
    )  # fmt: skip
    started = time.perf_counter()
    prefix = uuid.uuid4().hex
    for i, payload in enumerate(payloads):
        with filesystem.open_output_stream(f"{bucket}/{prefix}/{i}.png") as stream:
            stream.write(payload)
    for i, payload in enumerate(payloads):
        with filesystem.open_input_stream(f"{bucket}/{prefix}/{i}.png") as stream:
            assert stream.read() == payload
    return time.perf_counter() - started


def storage_round(bucket: str, payloads: list[bytes]) -> float:
    """Write and read every payload through `mrcnn.storage` (the code now)."""
    from mrcnn import storage

    started = time.perf_counter()
    prefix = uuid.uuid4().hex
    for i, payload in enumerate(payloads):
        storage.write_bytes(f"s3://{bucket}/{prefix}/{i}.png", payload)
    for i, payload in enumerate(payloads):
        assert storage.read_bytes(f"s3://{bucket}/{prefix}/{i}.png") == payload
    return time.perf_counter() - started


def storage_costs(upstream: str, bucket: str, count: int, rounds: int) -> dict:
    payloads = [png(i) for i in range(count)]
    best = {"before": float("inf"), "now": float("inf")}
    requests = {}
    for _ in range(rounds):
        for name in ("before", "now"):
            with FlakyS3Proxy(upstream) as proxy:
                os.environ["AWS_ENDPOINT_URL"] = proxy.url
                if name == "before":
                    seconds = native_round(proxy.url, bucket, payloads)
                else:
                    seconds = storage_round(bucket, payloads)
                os.environ["AWS_ENDPOINT_URL"] = upstream
            best[name] = min(best[name], seconds)
            requests[name] = dict(proxy.by_kind)
    return {"seconds": best, "requests": requests}


def run_through(
    proxy: FlakyS3Proxy, argv: list[str], timeout: float
) -> tuple[float, subprocess.CompletedProcess]:
    """Run the command `argv` with a local Ray of its own and every S3 request through `proxy`:
    its seconds and its result."""
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "AWS_ENDPOINT_URL": proxy.url}
    env.pop("RAY_ADDRESS", None)
    started = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    return time.perf_counter() - started, result


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 with dummy credentials, for this process and every process it
    starts (`AWS_ENDPOINT_URL`); yields its URL."""
    from moto.server import ThreadedMotoServer

    for name, value in (
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ):
        os.environ.setdefault(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    try:
        yield os.environ["AWS_ENDPOINT_URL"]
    finally:
        server.stop()


def segment_run(upstream: str, bucket: str, share: float, model: str) -> dict:
    rates = dict.fromkeys(KINDS, share)
    small = 512 if share else None
    output = f"s3://{bucket}/masks-{uuid.uuid4().hex[:8]}"
    argv = [
        sys.executable, "-m", "jobs.segment", "--input", f"s3://{bucket}/photos", "--output", output,
        "--model", model, "--batch-size", "4", "--score-threshold", "0.3",
    ]  # fmt: skip
    with FlakyS3Proxy(upstream, rates, seed=11, small_range_bytes=small) as proxy:
        seconds, result = run_through(proxy, argv, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"jobs.segment failed at {share:.0%}: {result.stderr[-2000:]}")
    return {"seconds": seconds, "requests": proxy.requests, "failed": proxy.failures}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import boto3
    import torch

    from mrcnn import storage
    from mrcnn.categories import Category
    from mrcnn.model import build_model
    from mrcnn.model_folder import save_model_folder, spec_for

    with moto_server() as upstream:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=upstream).create_bucket(Bucket=bucket)
        costs = storage_costs(upstream, bucket, args.objects, args.rounds)
        for i in range(args.images):
            storage.write_bytes(f"s3://{bucket}/photos/{i:05d}.png", png(i))
        torch.manual_seed(0)
        model = build_model("tiny", 3)
        model_uri = f"s3://{bucket}/model"
        save_model_folder(model, spec_for(model, (Category(1, "a"), Category(2, "b"))), model_uri)
        runs = {share: segment_run(upstream, bucket, share, model_uri) for share in (0.0, 0.05, 0.2)}

    seconds = costs["seconds"]
    print(f"storage, {args.objects} small objects written and read, clean store (best of {args.rounds}):")
    for name in ("before", "now"):
        print(f"  {name:6s} {seconds[name]:7.2f} s  requests {costs['requests'][name]}")
    print(f"jobs.segment over {args.images} PNGs on S3, whole command:")
    clean = runs[0.0]["seconds"]
    for share, run in runs.items():
        print(
            f"  {share:4.0%} throttled: {run['seconds']:6.1f} s, {args.images / run['seconds']:5.2f} "
            f"images/s, {clean / run['seconds']:.2f} of clean; {run['failed']} of {run['requests']} "
            "requests failed"
        )
    print(
        f"headline: retry layer on a clean store {seconds['now'] / seconds['before']:.2f}x the time of "
        f"native pyarrow; jobs.segment keeps {clean / runs[0.05]['seconds']:.2f} of its clean throughput "
        f"at 5 % throttling and {clean / runs[0.2]['seconds']:.2f} at 20 %"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
