"""The cost of the cluster path on one machine: the same segmentation on one node and on three.

    .venv/bin/python benchmarks/cluster_overhead.py [--preset small] [--num-images 240] [--size 128]
        [--rounds 2]

Both layouts are real Ray clusters on this machine (`ray.cluster_utils.Cluster`, through the
multi-node tests' harness `tests/ray_cluster.py`) with the same number of logical CPUs, and run
`python -m jobs.segment` as `ray job submit` would (RAY_ADDRESS set, one CPU inference actor,
local input and output, which the job's shared-storage check accepts since every node here sees
the same disk):
(a) one node of 3 CPUs;
(b) a head of 1 CPU and two worker nodes of 1 CPU each: decoded images, detections and counts
    now move between raylets through Ray's object manager, and tasks land on any of the three.
Each job's own images/s (`_SUCCESS.json`: listing to summary, actor start-up included, Ray start-up
not) is compared, best of `--rounds` alternating rounds; the ratio b/a is the cluster path's cost.

Then, on a head without CPUs (so that the actor runs on a worker node) and three 1-CPU worker
nodes, the node running the inference actor is killed as a crash would
(`remove_node(allow_graceful=False)`) right after the first committed file: the time from the
kill to the next committed file is the time the job needs to run again (Ray notices the dead
node, restarts the actor elsewhere, which loads the model, and retries the lost batches).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mrcnn.model import build_model
from mrcnn.model_folder import save_model_folder, spec_for
from mrcnn.shapes import CATEGORIES, generate_shapes

REPO = Path(__file__).resolve().parent.parent
# The multi-node tests' harness: a cluster in a process of its own, ended with it.
sys.path.insert(0, str(REPO / "tests"))
from ray_cluster import MultiNodeCluster, processes_of  # noqa: E402


def segment(cluster: MultiNodeCluster, images: str, output: str, model: str, batch_size: int):
    """Start `jobs.segment` on `cluster`; returns the process."""
    return subprocess.Popen(
        [
            sys.executable, "-m", "jobs.segment", "--input", images, "--output", output,
            "--model", model, "--gpus-per-actor", "0", "--cpus-per-actor", "1",
            "--batch-size", str(batch_size), "--rows-per-file", str(batch_size),
            "--score-threshold", "0.05",
        ],  # fmt: skip
        cwd=REPO,
        env=cluster.job_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def images_per_second(cluster: MultiNodeCluster, images: str, model: str, batch_size: int) -> float:
    output = tempfile.mkdtemp(prefix="cluster-bench-")
    job = segment(cluster, images, output, model, batch_size)
    _, stderr = job.communicate()
    if job.returncode != 0:
        raise RuntimeError(stderr[-2000:])
    return json.loads((Path(output) / "_SUCCESS.json").read_text())["images_per_second"]


def recovery_seconds(images: str, model: str, batch_size: int) -> tuple[float, int]:
    """(seconds from the kill of the actor's node to the next commit, part files at the kill)."""
    output = Path(tempfile.mkdtemp(prefix="cluster-bench-"))
    # A head of no CPU: the actor lands on a worker node (the head cannot be removed).
    with MultiNodeCluster(head_cpus=0) as cluster:
        for name in ("a", "b", "spare"):
            cluster.add_node(name, num_cpus=1)
        job = segment(cluster, images, str(output), model, batch_size)
        while not list(output.glob("part-*.parquet")):
            if job.poll() is not None:
                raise RuntimeError(job.stderr.read()[-2000:])
            time.sleep(0.01)
        victim = cluster.node_of(processes_of(cluster.env, "Segmenter")[0])
        committed = set(output.glob("part-*.parquet"))
        killed = time.monotonic()
        cluster.kill_node(victim)
        while not set(output.glob("part-*.parquet")) - committed:
            if job.poll() is not None:
                raise RuntimeError("the job ended before it committed again")
            time.sleep(0.01)
        resumed = time.monotonic() - killed
        _, stderr = job.communicate()
        if job.returncode != 0:
            raise RuntimeError(stderr[-2000:])
    return resumed, len(committed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--num-images", type=int, default=240)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="cluster-bench-")
    shapes = generate_shapes(os.path.join(work, "shapes"), args.num_images, seed=5, size=args.size)
    torch.manual_seed(0)
    model = build_model(args.preset, len(CATEGORIES) + 1)
    model_dir = os.path.join(work, "model")
    save_model_folder(model, spec_for(model, CATEGORIES), model_dir)

    best = {"one node": 0.0, "three nodes": 0.0}
    for round_ in range(args.rounds):
        with MultiNodeCluster(head_cpus=3) as cluster:
            rate = images_per_second(cluster, shapes.images_root, model_dir, args.batch_size)
            best["one node"] = max(best["one node"], rate)
            print(f"round {round_ + 1}: one node of 3 CPUs: {rate:.2f} images/s", flush=True)
        with MultiNodeCluster(head_cpus=1) as cluster:
            cluster.add_node("a", num_cpus=1)
            cluster.add_node("b", num_cpus=1)
            rate = images_per_second(cluster, shapes.images_root, model_dir, args.batch_size)
            best["three nodes"] = max(best["three nodes"], rate)
            print(f"round {round_ + 1}: head + 2 workers of 1 CPU: {rate:.2f} images/s", flush=True)
    resumed, committed = recovery_seconds(shapes.images_root, model_dir, args.batch_size)
    print(
        f"node death: the actor's node killed after {committed} committed file(s); the job "
        f"committed again {resumed:.1f} s later"
    )
    print(
        f"{args.num_images} images of {args.size} px, preset {args.preset}: one node "
        f"{best['one node']:.2f} images/s, three nodes {best['three nodes']:.2f} images/s"
    )
    print(f"three nodes / one node: {best['three nodes'] / best['one node']:.3f}")


if __name__ == "__main__":
    main()
