"""S3 requests per 1,000 images (issue 25, point 4): what `jobs.segment` asks of S3, by kind and
by what it touches, for a fresh run and for resumes, and what a million images cost in requests.

    PYTHONPATH=. .venv/bin/python benchmarks/s3_requests.py [--images 1000]

Everything runs against a moto server on 127.0.0.1 that this script starts, through the counting
proxy of the tests (`tests/s3_proxy.py`, no faults injected), with default flags but the model
(the `tiny` preset at 32 px, random weights, on S3) and `--input`/`--output` on S3:
(a) fresh: `--images` 32x32 PNGs under `s3://<bucket>/photos/`, nothing done;
(b) resume, half done: the same output with every other committed part file deleted (what a run
    killed half way leaves: whole part files of the rows it finished), the same command again;
(c) resume, all done: the same command over the finished output (nothing left to segment).
Each request is counted by kind (`tests/s3_proxy.py`: GET, GET_RANGE, LIST, HEAD, PUT, POST for
multipart and batch deletes, DELETE) and by the prefix it names (the input images, the model
folder, the output folder), then scaled to 1,000 inputs and priced at S3 Standard's list prices.

Prices: S3 Standard in us-east-1, as listed on aws.amazon.com/s3/pricing in 2024-2025 (unchanged
through that time): PUT, COPY, POST and LIST $0.005 per 1,000 requests; GET, HEAD and all other
requests $0.0004 per 1,000; DELETE free. Transfer inside one region is free; storage is not a
request cost and is left out.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import uuid
from collections import Counter
from urllib.parse import urlparse

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from s3_proxy import KINDS, FlakyS3Proxy, kind_of  # noqa: E402
from s3_throttling import moto_server, run_through  # noqa: E402

from jobs.cli import OneLineParser, bounded  # noqa: E402

# Dollars per 1,000 requests of each kind the proxy counts (see the docstring for the source).
PRICE_PER_1000 = {
    "GET": 0.0004, "GET_RANGE": 0.0004, "HEAD": 0.0004,
    "LIST": 0.005, "PUT": 0.005, "POST": 0.005, "DELETE": 0.0,
}  # fmt: skip
PREFIXES = ("photos", "model", "masks")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="s3_requests.py", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=bounded(int, 16), default=1000)
    return parser


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    pixels[8:16, 8:20] = (250, 20, 20)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def touched(path: str, bucket: str) -> str:
    """Which of `PREFIXES` a path-style request names; LISTs carry it as `prefix=`."""
    parsed = urlparse(path)
    key = parsed.path.lstrip("/").removeprefix(bucket).lstrip("/")
    if not key:
        query = dict(part.split("=", 1) for part in parsed.query.split("&") if "=" in part)
        key = query.get("prefix", "")
    return next((prefix for prefix in PREFIXES if key.startswith(prefix)), "bucket")


def segment_run(upstream: str, bucket: str, output: str, model: str) -> dict:
    """`python -m jobs.segment` over the photos, through a counting proxy."""
    argv = [sys.executable, "-m", "jobs.segment", "--input", f"s3://{bucket}/photos", "--output", output,
            "--model", model]  # fmt: skip
    with FlakyS3Proxy(upstream) as proxy:
        seconds, result = run_through(proxy, argv, timeout=3600)
    if result.returncode != 0:
        raise SystemExit(f"jobs.segment failed: {result.stderr[-2000:]}")
    by_target: Counter[tuple[str, str]] = Counter()
    for method, path, _status, _bytes in proxy.log:  # the log keeps no headers: ranged GETs count as GET
        by_target[(touched(path, bucket), kind_of(method, path, {}))] += 1
    return {"seconds": seconds, "by_kind": Counter(proxy.by_kind), "by_target": by_target}


def dollars_per_million(by_kind: Counter, images: int) -> float:
    return sum(count / images * 1e6 * PRICE_PER_1000[kind] / 1000 for kind, count in by_kind.items())


def drop_every_other_part(client, bucket: str, prefix: str) -> int:
    """Delete every other committed part file and the success marker (outside the proxy): the
    rows left are those of a run killed half way. Returns the rows' files kept."""
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    parts = sorted(key for key in keys if os.path.basename(key).startswith("part-"))
    doomed = parts[1::2] + [key for key in keys if key.endswith("_SUCCESS.json")]
    for key in doomed:
        client.delete_object(Bucket=bucket, Key=key)
    return len(parts) - len(parts[1::2])


def committed_rows(output: str) -> int:
    from pipeline.segment import output as segment_output

    return sum(table.num_rows for table in segment_output.scan_parts(output, columns=["path"]))


def report(name: str, run: dict, images: int, segmented: int) -> None:
    by_kind = run["by_kind"]
    total = sum(by_kind.values())
    per_1000 = ", ".join(f"{kind} {by_kind[kind] / images * 1000:.1f}" for kind in KINDS if by_kind[kind])
    print(f"{name}: {run['seconds']:.0f} s, {segmented} images segmented, {total} requests")
    print(f"  per 1,000 inputs: {per_1000}")
    targets = sorted(run["by_target"].items())
    print(
        "  by what they touch: "
        + ", ".join(f"{target} {method} {count}" for (target, method), count in targets)
    )
    print(f"  request cost per million inputs at list prices: ${dollars_per_million(by_kind, images):.2f}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import logging

    import boto3
    import torch

    from mrcnn import storage
    from mrcnn.model import build_model
    from mrcnn.model_folder import save_model_folder, spec_for
    from mrcnn.shapes import CATEGORIES

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    with moto_server() as upstream:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        client = boto3.client("s3", endpoint_url=upstream)
        client.create_bucket(Bucket=bucket)
        encoded = [png(seed) for seed in range(64)]
        for i in range(args.images):
            client.put_object(Bucket=bucket, Key=f"photos/d{i // 1000:04d}/{i:07d}.png", Body=encoded[i % 64])
        torch.manual_seed(0)
        model = build_model("tiny", len(CATEGORIES) + 1)
        model.transform.min_size, model.transform.max_size = (32,), 32
        model_uri = f"s3://{bucket}/model"
        save_model_folder(model, spec_for(model, CATEGORIES), model_uri)
        output = f"s3://{bucket}/masks"
        fresh = segment_run(upstream, bucket, output, model_uri)
        assert committed_rows(output) == args.images
        kept_files = drop_every_other_part(client, bucket, "masks")
        done = committed_rows(output)
        half = segment_run(upstream, bucket, output, model_uri)
        assert committed_rows(output) == args.images
        finished = segment_run(upstream, bucket, output, model_uri)
        assert storage.exists(f"{output}/_SUCCESS.json")

    print(f"jobs.segment over {args.images:,} PNGs on S3 (input, model and output on S3), default flags:")
    report("fresh", fresh, args.images, args.images)
    report(f"resume with {done:,} done ({kept_files} part files kept)", half, args.images, args.images - done)
    report("resume with all done", finished, args.images, 0)
    fresh_cost = dollars_per_million(fresh["by_kind"], args.images)
    input_gets = fresh["by_target"][("photos", "GET")] / args.images
    puts = sum(
        count
        for (target, method), count in fresh["by_target"].items()
        if target == "masks" and method == "PUT"
    )
    print(
        f"headline: a fresh run makes {sum(fresh['by_kind'].values()) / args.images * 1000:.0f} requests per "
        f"1,000 images ({input_gets:.2f} GET per input image, {puts / args.images * 1000:.1f} output "
        f"PUTs per 1,000), ${fresh_cost:.2f} per million images; a resume of a finished run "
        f"${dollars_per_million(finished['by_kind'], args.images):.2f} per million inputs"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
