"""Millions of inputs (issue 25): the done set, the lister, the driver's state and a resume.

    nice -n 19 .venv/bin/python benchmarks/scale.py --manifest-lines 10000000 --done 5000000 \\
        --s3-objects 10000 50000 --block-stats 200000 10000000 \\
        --driver-sizes 2000 20000 --resume 20000

Each part measures in a fresh process, so that its peak RSS (VmHWM) is its own, and prints one
line; skip a part by leaving its flag out. Inputs are written once under `--workdir` and reused.
- done set: `pipeline.segment.output.committed_path_hashes` over an output of `--done` rows, in
  part files of 256 rows of the full schema without instances (what a re-run reads first).
- lister: the `pipeline.segment.listing.PathDatasource` read task, run in a process of its own
  with the done set in a local Ray's object store, over a `.txt` manifest of `--manifest-lines`
  lines whose first `--done` are done: seconds to its first block (what a resume waits for),
  for the whole listing, paths/s and peak RSS (the read task's memory).
- S3 lister: the same read task over an `s3://` prefix of each `--s3-objects` count on a moto
  server (no done set): paths/s and peak RSS; moto sorts every key for each 1,000-key page, so
  its pages slow down with the prefix's size (real S3's do not).
- block stats: the driver's memory for the per-block stats Ray Data keeps of a run of N images
  (`pipeline.cluster.ray_compat`, item 10: 0.75 blocks per image, one `BlockStats` each, built
  as Ray Data builds them), all kept (Ray Data alone) against what `BoundedBlockStats` keeps.
- driver: `python -m jobs.segment` with default flags over folders of N 32x32 PNGs with the
  `tiny` preset at 32 px: the driver's peak RSS (sampled from /proc), seconds to its first
  commit, and in all.
- resume: the same command over `--resume` images with the first half of the listing already
  committed (written as part files, as a killed run leaves them): seconds from the command's
  start to its first new commit, when the command is killed.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pyarrow as pa

from pipeline.segment import output

ROWS_PER_FILE = 256
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_mib() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def manifest_path(index: int) -> str:
    return f"/data/images/d{index // 1000:05d}/img{index:08d}.png"


def write_manifest(path: str, lines: int) -> None:
    if os.path.exists(path):
        return
    with open(path + ".tmp", "w") as file:
        for start in range(0, lines, 100_000):
            file.write("".join(manifest_path(i) + "\n" for i in range(start, min(lines, start + 100_000))))
    os.replace(path + ".tmp", path)


def fake_rows(paths: list[str]) -> pa.Table:
    """Committed rows of `paths` in the output schema: 32x32, no detections."""
    count = len(paths)
    empty = [[] for _ in range(count)]
    columns = {
        "path": paths, "width": [32] * count, "height": [32] * count, "category_ids": empty,
        "categories": empty, "scores": empty, "boxes": empty, "masks": empty,
        "error": [None] * count, "model": ["simulated"] * count,
    }  # fmt: skip
    return pa.Table.from_pydict(columns, schema=output.SCHEMA)


def write_done(folder: str, paths) -> None:
    """Commit `paths` under `folder` in part files of `ROWS_PER_FILE` rows (once)."""
    marker = os.path.join(folder, ".complete")
    if os.path.exists(marker):
        return
    os.makedirs(folder, exist_ok=True)
    batch: list[str] = []
    for path in paths:
        batch.append(path)
        if len(batch) == ROWS_PER_FILE:
            output.commit_part(fake_rows(batch), folder)
            batch = []
    if batch:
        output.commit_part(fake_rows(batch), folder)
    open(marker, "w").close()


def in_child(part: str, *args: str, env: dict | None = None) -> dict:
    """Run `part` of this script in a fresh process; its JSON result."""
    command = [sys.executable, os.path.abspath(__file__), "--child", part, *args]
    env = dict(env or os.environ)
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=HERE)
    if result.returncode != 0:
        raise SystemExit(f"{part} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def child_done_set(folder: str) -> dict:
    started = time.perf_counter()
    hashes = output.committed_path_hashes(folder)
    seconds = time.perf_counter() - started
    return {"rows": int(hashes.size), "seconds": seconds, "peak_mib": peak_mib()}


def child_lister(uri: str, done_folder: str) -> dict:
    import ray

    from pipeline.segment.inputs import check_input
    from pipeline.segment.listing import PathDatasource

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    done = None
    if done_folder:
        done = ray.put(output.committed_path_hashes(done_folder))
    task = PathDatasource(check_input(uri), rows_per_block=4, done=done).get_read_tasks(1)[0]
    before = peak_mib()
    started = time.perf_counter()
    first = None
    paths = 0
    for block in task():
        if first is None:
            first = time.perf_counter() - started
        paths += block.num_rows
    seconds = time.perf_counter() - started
    return {"paths": paths, "first_block_s": first, "seconds": seconds, "peak_mib": peak_mib(),
            "before_mib": before}  # fmt: skip


def child_block_stats(images: str, bounded: str) -> dict:
    """The driver's RSS growth for the stats of `images` * 0.75 blocks as Ray Data keeps them: each
    block's metadata comes from a worker (unpickled here), one list per operator."""
    import dataclasses
    import pickle

    from ray.data.block import BlockExecStats, BlockMetadata, TaskExecWorkerStats

    from pipeline.cluster.ray_compat import KEPT_BLOCK_STATS

    def rss() -> float:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    timings = {
        field.name: 0.001 * (index + 1)
        for index, field in enumerate(dataclasses.fields(BlockExecStats))
        if field.name not in ("task_idx", "node_id", "stage_time_s")
    }
    lists: list[list] = [[], [], [], []]
    blocks = int(int(images) * 0.75)
    before = rss()
    for index in range(blocks):
        stats = BlockExecStats(task_idx=index, node_id=os.urandom(28).hex(), **timings)
        task = TaskExecWorkerStats(task_wall_time_s=0.5, max_uss_bytes=10**8 + index)
        metadata = BlockMetadata(num_rows=4, size_bytes=4096, input_files=None, exec_stats=stats)
        metadata = pickle.loads(pickle.dumps(dataclasses.replace(metadata, task_exec_stats=task)))
        kept = lists[index % 4]
        kept.append(metadata.to_stats())
        if bounded == "1" and len(kept) >= 2 * KEPT_BLOCK_STATS:
            del kept[: len(kept) - KEPT_BLOCK_STATS]
    held = sum(len(kept) for kept in lists)
    return {"blocks": blocks, "held": held, "growth_mib": rss() - before}


CHILDREN = {"done-set": child_done_set, "lister": child_lister, "block-stats": child_block_stats}


def tiny_model(folder: str) -> str:
    """The `tiny` preset at 32 px, random weights (once)."""
    uri = os.path.join(folder, "model-tiny-32")
    if not os.path.exists(uri):
        import torch

        from mrcnn.model import build_model
        from mrcnn.model_folder import save_model_folder, spec_for
        from mrcnn.shapes import CATEGORIES

        torch.manual_seed(0)
        model = build_model("tiny", len(CATEGORIES) + 1)
        model.transform.min_size, model.transform.max_size = (32,), 32
        save_model_folder(model, spec_for(model, CATEGORIES), uri)
    return uri


def tiny_images(folder: str, count: int) -> str:
    """`count` 32x32 PNGs (64 distinct ones repeated), 1,000 per subfolder (once)."""
    import io

    import numpy as np
    from PIL import Image

    root = os.path.join(folder, f"images-{count}")
    if os.path.exists(os.path.join(root, ".complete")):
        return root
    encoded = []
    for seed in range(64):
        pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        pixels[8:16, 8:20] = (250, 20, 20)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        encoded.append(buffer.getvalue())
    for index in range(count):
        subfolder = os.path.join(root, f"d{index // 1000:04d}")
        os.makedirs(subfolder, exist_ok=True)
        with open(os.path.join(subfolder, f"img{index:07d}.png"), "wb") as file:
            file.write(encoded[index % 64])
    open(os.path.join(root, ".complete"), "w").close()
    return root


def new_parts(folder: str, before: set[str]) -> bool:
    return any(name.startswith(output.PART_PREFIX) and name not in before for name in os.listdir(folder))


def run_segment(images: str, out: str, model: str, stop_at_first_commit: bool = False) -> dict:
    """`python -m jobs.segment` with default flags: the driver's peak RSS, seconds to its first
    new commit and in all; killed (with its own Ray) at its first commit if `stop_at_first_commit`."""
    before = set(os.listdir(out)) if os.path.isdir(out) else set()
    env = {**os.environ, "PYTHONPATH": HERE}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "jobs.segment", "--input", images, "--output", out, "--model", model]
    started = time.perf_counter()
    driver = subprocess.Popen(
        command, env=env, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    peak, first = 0, None
    while driver.poll() is None:
        try:
            with open(f"/proc/{driver.pid}/status") as status:
                rss = next(line for line in status if line.startswith("VmRSS"))
            peak = max(peak, int(rss.split()[1]))
        except (OSError, StopIteration):
            pass
        if first is None and os.path.isdir(out) and new_parts(out, before):
            first = time.perf_counter() - started
            if stop_at_first_commit:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
                return {"driver_mib": peak / 1024, "first_commit_s": first, "seconds": first}
        time.sleep(0.2)
    if driver.returncode != 0:
        raise SystemExit(f"jobs.segment failed:\n{driver.stderr.read().decode()[-3000:]}")
    return {"driver_mib": peak / 1024, "first_commit_s": first, "seconds": time.perf_counter() - started}


def part_done_and_lister(workdir: str, lines: int, done: int) -> None:
    manifest = os.path.join(workdir, f"manifest-{lines}.txt")
    write_manifest(manifest, lines)
    done_folder = os.path.join(workdir, f"done-{done}")
    write_done(done_folder, (manifest_path(i) for i in range(done)))
    result = in_child("done-set", done_folder)
    print(
        f"done set: {result['rows']:,} committed rows read in {result['seconds']:.1f} s "
        f"({result['rows'] / result['seconds']:,.0f} rows/s), peak RSS {result['peak_mib']:.0f} MiB",
        flush=True,
    )
    result = in_child("lister", manifest, done_folder)
    print(
        f"lister: {lines:,}-line manifest, {done:,} done: {result['paths']:,} paths in "
        f"{result['seconds']:.1f} s ({lines / result['seconds']:,.0f} lines/s), first block after "
        f"{result['first_block_s']:.1f} s, peak RSS {result['peak_mib']:.0f} MiB "
        f"({result['before_mib']:.0f} MiB before the listing)",
        flush=True,
    )


def put_key(client, bucket: str, key: str) -> None:
    client.put_object(Bucket=bucket, Key=key, Body=b"x")


def part_s3(counts: list[int]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
           "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="x")  # fmt: skip
    try:
        for count in counts:
            bucket = f"scale-{count}"
            client.create_bucket(Bucket=bucket)
            started = time.perf_counter()
            keys = [f"images/d{i // 1000:05d}/img{i:08d}.png" for i in range(count)]
            put = functools.partial(put_key, client, bucket)
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(put, keys))
            put_s = time.perf_counter() - started
            result = in_child("lister", f"s3://{bucket}/images", "", env=env)
            print(
                f"S3 lister (moto): {result['paths']:,} objects listed in {result['seconds']:.1f} s "
                f"({result['paths'] / result['seconds']:,.0f} keys/s; {count / put_s:,.0f} PUTs/s "
                f"to create them), peak RSS {result['peak_mib']:.0f} MiB",
                flush=True,
            )
    finally:
        server.stop()


def part_block_stats(sizes: list[int]) -> None:
    for size in sizes:
        kept, bounded = in_child("block-stats", str(size), "0"), in_child("block-stats", str(size), "1")
        print(
            f"block stats, {size:,} images ({kept['blocks']:,} blocks): "
            f"all kept {kept['growth_mib']:.0f} MiB "
            f"({kept['growth_mib'] * 2**20 / size:,.0f} bytes per image); bounded: {bounded['held']:,} "
            f"kept, {max(0.0, bounded['growth_mib']):.1f} MiB",
            flush=True,
        )


def part_driver(workdir: str, sizes: list[int]) -> None:
    model = tiny_model(workdir)
    for size in sizes:
        images = tiny_images(workdir, size)
        out = os.path.join(workdir, f"out-{size}")
        shutil.rmtree(out, ignore_errors=True)
        result = run_segment(images, out, model)
        print(
            f"driver, {size:,} images: peak RSS {result['driver_mib']:.0f} MiB, first commit after "
            f"{result['first_commit_s']:.1f} s, {result['seconds']:.0f} s in all "
            f"({size / result['seconds']:.1f} images/s)",
            flush=True,
        )


def part_resume(workdir: str, size: int) -> None:
    from pipeline.segment.inputs import check_input, iter_inputs

    model = tiny_model(workdir)
    images = tiny_images(workdir, size)
    base = os.path.join(workdir, f"half-done-{size}")
    listed = iter_inputs(check_input(images))
    write_done(base, (path for _, path in zip(range(size // 2), listed, strict=False)))
    out = os.path.join(workdir, f"resumed-{size}")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(base, out)
    result = run_segment(images, out, model, stop_at_first_commit=True)
    print(
        f"resume, {size:,} images with {size // 2:,} done: first new commit after "
        f"{result['first_commit_s']:.1f} s (then killed), driver peak RSS {result['driver_mib']:.0f} MiB",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/scale-sim")
    parser.add_argument("--manifest-lines", type=int, default=0)
    parser.add_argument("--done", type=int, default=0)
    parser.add_argument("--s3-objects", type=int, nargs="*", default=[])
    parser.add_argument("--block-stats", type=int, nargs="*", default=[])
    parser.add_argument("--driver-sizes", type=int, nargs="*", default=[])
    parser.add_argument("--resume", type=int, default=0)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](*args.child[1:])))
        return
    os.makedirs(args.workdir, exist_ok=True)
    if args.manifest_lines:
        part_done_and_lister(args.workdir, args.manifest_lines, args.done)
    if args.s3_objects:
        part_s3(args.s3_objects)
    if args.block_stats:
        part_block_stats(args.block_stats)
    if args.driver_sizes:
        part_driver(args.workdir, args.driver_sizes)
    if args.resume:
        part_resume(args.workdir, args.resume)


if __name__ == "__main__":
    main()
