"""How many CPUs a segmentation job's local Ray gets, and how many each inference actor takes.

Defaults for the machine a job starts its own Ray on, where a user types no tuning flag. A CPU
actor runs torch with one thread per CPU it reserved (Ray sets `OMP_NUM_THREADS` to it), so Ray's
default of one CPU per actor would run the model on one core of many. Instead the actors share
every CPU of the local Ray but one, and that one runs the short decode and RLE + commit tasks.
Ray's CPUs are logical: the local Ray gets one more than the machine has cores, so that the
actors' threads use every core while the decode and RLE tasks interleave with them (measured in
BENCHMARKS.md, "Bulk segmentation against the bare model loop").

On a cluster the job joined, nodes may differ and appear later: an actor takes one CPU unless
`--cpus-per-actor` says otherwise. A GPU actor takes one CPU: its model runs on the GPU.
"""

from __future__ import annotations

import os


def local_ray_cpus() -> int:
    """Logical CPUs of a local Ray started by a job: this machine's cores plus one."""
    return (os.cpu_count() or 1) + 1


def actor_cpus(
    requested: float | None, cluster_cpus: float, actors: int, gpus: float, joined_cluster: bool
) -> float:
    """CPUs per inference actor (and its torch threads, rounded down).

    Args:
        requested: `--cpus-per-actor`, or None for the default described in the module docstring.
        cluster_cpus: CPUs of the Ray the job runs on.
        actors: the inference actors that start first (the pool's minimum).
        gpus: GPUs requested per actor (0: CPU actors).
        joined_cluster: the job joined a cluster (`RAY_ADDRESS`) rather than a Ray of its own.
    """
    if requested is not None:
        return requested
    if gpus > 0 or joined_cluster:
        return 1.0
    return float(max(1, int(cluster_cpus - 1) // max(1, actors)))
