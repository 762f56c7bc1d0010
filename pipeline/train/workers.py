"""How many CPUs each Ray Train worker asks for when `--cpus-per-worker` is not given, and a
warning when the cluster is too small for the workers as sized.

CPUs per worker are also its torch threads, since Ray sets `OMP_NUM_THREADS` to them: for GPU
workers three quarters of the CPUs per GPU of the GPU nodes alive (the rest decodes images), or 1
CPU when none is up yet (a cluster whose GPU nodes scale from zero); for CPU workers three
quarters of the cluster's CPUs shared by the workers, leaving at least half a CPU for decoding
images in Ray Data tasks, which would otherwise never get a CPU while the workers hold them all.
"""

from __future__ import annotations

import math

from pipeline.cluster.job_log import warn

WORKERS_CPU_SHARE = 0.75
MIN_DATA_CPUS = 0.5
# CPUs of a GPU worker when no GPU node is up to size it by (the autoscaler will launch them).
GPU_WORKER_CPUS_WHEN_UNKNOWN = 1.0


def default_worker_cpus(num_workers: int, use_gpu: bool) -> float:
    """CPUs per worker when `--cpus-per-worker` is not given (see the module docstring)."""
    import ray

    if use_gpu:
        per_gpu = [
            node["Resources"].get("CPU", 0.0) / node["Resources"]["GPU"]
            for node in ray.nodes()
            if node["Alive"] and node["Resources"].get("GPU", 0.0) >= 1
        ]
        if not per_gpu:
            return GPU_WORKER_CPUS_WHEN_UNKNOWN
        return max(1.0, math.floor(min(per_gpu) * WORKERS_CPU_SHARE))
    total = ray.cluster_resources().get("CPU", 1.0)
    share = min(total * WORKERS_CPU_SHARE, total - MIN_DATA_CPUS)
    return max(share / num_workers, 0.1)


def warn_if_too_small(num_workers: int, cpus_per_worker: float, use_gpu: bool, timeout_s: float) -> None:
    """A warning line when the cluster as it is now cannot hold the workers and their decoding."""
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if num_workers * cpus_per_worker >= cpus or (use_gpu and gpus < num_workers):
        warn(
            f"train: warning: the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs; {num_workers} "
            f"workers of {cpus_per_worker:g} CPUs{' and 1 GPU' if use_gpu else ''} plus image "
            f"decoding need more, so training waits up to {timeout_s:g} s for the cluster to grow"
        )
