"""How many CPUs a segmentation job's local Ray gets, and how its inference actors share them.

Defaults for the machine a job starts its own Ray on, where a user types no tuning flag. Ray's CPUs
are logical: the local Ray gets `TASK_CPUS` more than the machine has cores, and the actors take
every CPU but those, which run the listing's cut into batches and the short decode and RLE +
commit tasks between the actors' forwards. Two, not one: with one, the task that cuts the
listing into batches held it while the decode tasks waited for it, and the actors sat idle until
the whole listing was cut (BENCHMARKS.md, "Start-up of the whole command and one actor per
core").

How the actors share the cores: one actor per core, each running torch on one thread, as many as
memory holds (`actor_memory_bytes`); fewer actors take more CPUs and threads each. Separate
processes beat one process of many threads on a CPU: the model's ops are small enough (many
RoIs of 14 x 14, small convolutions) that torch's threads spend much of a forward waiting for
each other, and a thread that another process pre-empts stalls its whole team (measured in
BENCHMARKS.md, "Start-up of the whole command and one actor per core"). An actor holds torch and
its own copy of the model, so memory, not cores, bounds the count on a large model.

On a cluster the job joined, nodes may differ and appear later: one actor of one CPU unless
`--actors` / `--cpus-per-actor` say otherwise. A GPU actor takes one CPU: its model runs on the
GPU.
"""

from __future__ import annotations

import os

# Logical CPUs of a local Ray left to the tasks beside the inference actors.
TASK_CPUS = 2

# Peak resident memory of a CPU inference actor: the process with torch and the model before its
# first forward, plus the forward's activations per input pixel of a batch. Rounded up from the
# ResNet-50 figures in BENCHMARKS.md ("Start-up of the whole command and one actor per core"):
# the estimate must not oversubscribe a laptop, and the small presets sit far below it.
ACTOR_BASE_BYTES = 1 << 30
ACTIVATION_BYTES_PER_PIXEL = 640


def local_ray_cpus() -> int:
    """Logical CPUs of a local Ray started by a job: this machine's cores plus `TASK_CPUS`."""
    return (os.cpu_count() or 1) + TASK_CPUS


def actor_memory_bytes(min_size: int, max_size: int, batch_size: int) -> int:
    """Peak memory of one CPU inference actor running batches of `batch_size` images.

    The model's input is at most `min_size x max_size` pixels (shorter side scaled to `min_size`,
    longer side at most `max_size`).
    """
    return ACTOR_BASE_BYTES + ACTIVATION_BYTES_PER_PIXEL * min_size * max_size * batch_size


def actor_count(
    requested: tuple[int, int] | None,
    cluster_cpus: float,
    cluster_memory: float,
    actor_memory: int,
    gpus: float,
    joined_cluster: bool,
) -> tuple[int, int]:
    """The actor pool's (MIN, MAX) size.

    Args:
        requested: `--actors`, or None for the default described in the module docstring.
        cluster_cpus: CPUs of the Ray the job runs on.
        cluster_memory: bytes of Ray's `memory` resource (what Ray lets tasks and actors use).
        actor_memory: `actor_memory_bytes` of one actor.
        gpus: GPUs requested per actor (0: CPU actors).
        joined_cluster: the job joined a cluster (`RAY_ADDRESS`) rather than a Ray of its own.
    """
    if requested is not None:
        return requested
    if gpus > 0 or joined_cluster:
        return (1, 1)
    count = max(1, min(int(cluster_cpus) - TASK_CPUS, int(cluster_memory // actor_memory)))
    return (count, count)


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
    return float(max(1, int(cluster_cpus - TASK_CPUS) // max(1, actors)))
