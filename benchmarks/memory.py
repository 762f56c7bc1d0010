"""Bounded memory: peak RSS of the `jobs.segment` driver and its Ray workers at two dataset sizes.

    .venv/bin/python benchmarks/memory.py [--sizes 1000 10000] [--preset tiny] [--image-size 64]

For each size, generates that many shapes images, runs `python -m jobs.segment` on them (its own
local Ray, batch 16, 64 rows per file) and samples, every 0.2 s, the resident memory of the driver
process and of every Ray process of that run (found by an environment marker): the driver's peak,
the largest other process's peak, and the peak of all the run's processes together. RSS counts the
shared object-store pages a process has touched, so the figures overlap; what matters is how they
change with the dataset size. The last line is the ratio of the whole run's peak at the largest
size to that at the smallest: close to 1 when memory does not grow with the dataset. The default
sizes take about 12 minutes on the 2-core machine of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch

from mrcnn.model import build_model
from mrcnn.model_folder import save_model_folder, spec_for
from mrcnn.shapes import CATEGORIES, generate_shapes

MARKER = "MRCNN_MEMORY_BENCHMARK"


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_processes(marker: str) -> list[int]:
    """PIDs whose environment carries `MARKER=marker` (the driver and the Ray processes it started)."""
    found = []
    needle = f"{MARKER}={marker}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as file:
                if needle in file.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:
            continue
    return found


def measure(model_dir: str, images: str, output: str) -> dict[str, float]:
    marker = os.urandom(6).hex()
    env = {**os.environ, MARKER: marker}
    env.pop("RAY_ADDRESS", None)
    command = [
        sys.executable, "-m", "jobs.segment", "--input", images, "--output", output, "--model", model_dir,
        "--batch-size", "16", "--rows-per-file", "64", "--score-threshold", "0.3", "--num-cpus", "2",
    ]  # fmt: skip
    started = time.perf_counter()
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peaks = {"driver": 0, "largest worker": 0, "all": 0}

    def sample() -> None:
        while driver.poll() is None:
            sizes = {}
            for pid in run_processes(marker):
                try:
                    sizes[pid] = rss_bytes(pid)
                except OSError:
                    continue
            workers = [size for pid, size in sizes.items() if pid != driver.pid]
            peaks["driver"] = max(peaks["driver"], sizes.get(driver.pid, 0))
            peaks["largest worker"] = max(peaks["largest worker"], max(workers, default=0))
            peaks["all"] = max(peaks["all"], sum(sizes.values()))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    driver.wait()
    sampler.join()
    if driver.returncode != 0:
        raise SystemExit(f"jobs.segment failed with exit code {driver.returncode}")
    mebibytes = {name: value / 2**20 for name, value in peaks.items()}
    return {**mebibytes, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        model = build_model(args.preset, len(CATEGORIES) + 1)
        model_dir = os.path.join(folder, "model")
        save_model_folder(model, spec_for(model, CATEGORIES), model_dir)
        results = {}
        for size in args.sizes:
            shapes = generate_shapes(os.path.join(folder, f"shapes-{size}"), size, size=args.image_size)
            results[size] = measure(model_dir, shapes.images_root, os.path.join(folder, f"out-{size}"))
            peak = results[size]
            print(
                f"{size} images: driver {peak['driver']:.0f} MiB, "
                f"largest worker {peak['largest worker']:.0f} MiB, "
                f"all processes {peak['all']:.0f} MiB, {peak['seconds']:.0f} s",
                flush=True,
            )
        smallest, largest = min(args.sizes), max(args.sizes)
        print(f"peak_ratio: {results[largest]['all'] / results[smallest]['all']:.2f}")


if __name__ == "__main__":
    main()
