"""What the inference actor pool asks Ray for: how many actors, their CPUs, GPUs and memory, and
the check that they can ever run where the job runs.

`plan_actors` decides it once per run (`ActorRequest`), from the flags and the Ray the job runs
on: on a cluster the job joined, `--gpus-per-actor auto` asks the cluster (`pipeline.cluster.
placement.auto_gpus`), and a request no node and no node type can ever hold is an error at once
(`pipeline.cluster.placement.InfeasibleRequest`); on a Ray of the job's own, whose resources are
what they will ever be, a pool that does not fit it is an error at once (`ActorsDoNotFit`).

How many CPUs a segmentation job's local Ray gets, and how its inference actors share them:

Defaults for the machine a job starts its own Ray on, where a user types no tuning flag. Ray's CPUs
are logical: the local Ray gets `TASK_CPUS` more than the machine has cores, and the actors take
every CPU but those, which run the listing's cut into batches and the short decode and RLE +
commit tasks between the actors' forwards: one for each of those three stages. Ray Data reserves
one task's CPUs for every stage in pipeline order and a stage it cannot reserve for waits until
a stage upstream has finished. With one, the decode tasks waited for the whole listing to be
cut while the actors sat idle (BENCHMARKS.md, "Start-up of the whole command and one actor per
core"); with two, the RLE + commit stage did, so that no file was committed before every input
had been listed and cut: a kill then lost every row segmented so far, and a re-run with half the
rows done committed its first file after 86 s (BENCHMARKS.md, "At scale (issue 25)").

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
from dataclasses import dataclass

from mrcnn.errors import RunError
from pipeline.cluster.gpu import AUTO, gpus_to_request
from pipeline.cluster.job_log import say, warn
from pipeline.cluster.placement import auto_gpus, require_placement

# Logical CPUs of a local Ray left to the tasks beside the inference actors.
TASK_CPUS = 3

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


class ActorsDoNotFit(RunError):
    """The first inference actors and a decode task do not fit the job's own Ray."""


@dataclass(frozen=True)
class ActorRequest:
    """What the inference actor pool asks Ray for.

    `actors`: the pool's (MIN, MAX) size; `cpus`, `gpus`: per actor; `memory`: bytes per CPU actor
    (`actor_memory_bytes`), None for a GPU actor, whose model and activations live on the GPU.
    """

    actors: tuple[int, int]
    cpus: float
    gpus: float
    memory: int | None

    def bundle(self) -> dict[str, float]:
        """What one actor asks Ray for."""
        bundle = {"CPU": self.cpus, "GPU": self.gpus}
        if self.memory:
            bundle["memory"] = float(self.memory)
        return {name: amount for name, amount in bundle.items() if amount}

    def describe(self) -> str:
        """`2 inference actor(s) of 1 CPUs and 1.1 GiB`: what the first actors ask for."""
        text = f"{self.actors[0]} inference actor(s) of {self.cpus:g} CPUs"
        if self.gpus:
            text += f" and {self.gpus:g} GPU"
        if self.memory:
            text += f" and {self.memory / (1 << 30):.1f} GiB"
        return text


@dataclass(frozen=True)
class ActorFlags:
    """The flags of `jobs.segment` that size the pool (see its `--help`), and the input size of
    the model, which sets an actor's memory."""

    actors: tuple[int, int] | None
    gpus_per_actor: float | str
    cpus_per_actor: float | None
    batch_size: int
    min_size: int
    max_size: int


def plan_actors(flags: ActorFlags, joined_cluster: bool) -> ActorRequest:
    """The actor pool's request on the connected Ray (see the module docstring), with a line
    saying whether the actors run on GPUs and why."""
    import ray

    resources = ray.cluster_resources()
    gpus, reason = flags.gpus_per_actor, None
    if joined_cluster and gpus == AUTO:
        gpus, reason = auto_gpus(1.0, cpus=1.0)
    request = _actor_request(flags, gpus, joined_cluster, resources)
    if reason is None:
        reason = (
            f"--gpus-per-actor {flags.gpus_per_actor}"
            if joined_cluster
            else f"this machine has {resources.get('GPU', 0):g} GPUs"
        )
    say(f"segment: inference actors on {'GPUs' if request.gpus else 'CPUs'} ({reason})")
    if not joined_cluster:
        check_local_fit(request, resources)
        return request
    # A GPU count `auto` chose is placeable already: the check that chose it said so.
    if not (flags.gpus_per_actor == AUTO and request.gpus):
        way_out = (
            "use --gpus-per-actor 0 for CPU actors, or give the cluster a node type with a GPU"
            if request.gpus
            else "lower --cpus-per-actor, or give the cluster a node type that holds it"
        )
        require_placement(request.bundle(), "an inference actor", way_out)
    cpus = resources.get("CPU", 0)
    if cpus - request.actors[0] * request.cpus < 1:
        warn(
            f"segment: warning: {request.actors[0]} inference actors of {request.cpus:g} CPUs leave "
            f"less than one of the cluster's {cpus:g} CPUs for the decode and RLE tasks: the job "
            "waits until the cluster grows (or lower --cpus-per-actor / --actors)"
        )
    return request


def _actor_request(
    flags: ActorFlags, gpus: float | str, joined_cluster: bool, resources: dict[str, float]
) -> ActorRequest:
    """The pool's request from the flags (`gpus` resolved on a joined cluster) and what the Ray
    holds (`resources`, Ray's `cluster_resources()`)."""
    cluster_cpus = resources.get("CPU", 0)
    gpus = gpus_to_request(gpus, joined_cluster, resources.get("GPU", 0))
    memory = actor_memory_bytes(flags.min_size, flags.max_size, flags.batch_size)
    actors = actor_count(flags.actors, cluster_cpus, resources.get("memory", 0), memory, gpus, joined_cluster)
    cpus = actor_cpus(flags.cpus_per_actor, cluster_cpus, actors[0], gpus, joined_cluster)
    return ActorRequest(actors, cpus, gpus, None if gpus else memory)


def check_local_fit(request: ActorRequest, resources: dict[str, float]) -> None:
    """Raise `ActorsDoNotFit` unless the first actors and a decode task fit this Ray's `resources`
    (a Ray of the job's own: its resources are what they will ever be, so a pool that does not
    fit would wait forever)."""
    cpus, gpus, memory = (resources.get(name, 0) for name in ("CPU", "GPU", "memory"))
    low = request.actors[0]
    if low * request.cpus + 1 > cpus or low * request.gpus > gpus or low * (request.memory or 0) > memory:
        raise ActorsDoNotFit(
            f"{request.describe()}, plus 1 CPU for the decode and RLE tasks, do not fit this Ray's "
            f"{cpus:g} CPUs, {gpus:g} GPUs and {memory / (1 << 30):.1f} GiB of memory: lower "
            f"--actors/--cpus-per-actor/--gpus-per-actor/--batch-size or raise --num-cpus (a local "
            f"Ray's CPUs are logical)"
        )
