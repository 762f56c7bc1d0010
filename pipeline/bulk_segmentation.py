"""Build and run the bulk segmentation dataset: list -> decode -> infer -> RLE + commit -> summary.

Stages (Ray Data, streaming end to end, memory bounded by Ray Data's backpressure):

1. `PathDatasource` (`pipeline.listing`): one read task streams the inputs not yet in the
   output, `batch_size` paths per block; it reserves no CPU.
2. `decode_batch` (`pipeline.decode`): CPU tasks read and decode each block, shrink the images to
   the model's input size, and turn bad files into error rows.
3. `Segmenter` (`pipeline.inference`): an actor pool, fixed (`actors=(N, N)`) or autoscaling
   (`(MIN, MAX)`), each actor loading the model once, with `cpus_per_actor` CPUs (and as many torch
   threads; by default on a local Ray, one actor of one CPU per core as memory allows, leaving
   one CPU for the tasks, `pipeline.actor_sizing`) and
   `gpus_per_actor` GPUs. On a cluster the job joined, the GPUs are requested
   whatever the cluster holds at the start, so that an autoscaler launches GPU nodes; on a Ray of
   the job's own they are requested only when the machine has GPUs (`pipeline.gpu`). On a cluster
   the job waits at most `resource_timeout_s` for the first `MIN` actors (Ray Data's
   `wait_for_min_actors_s`), then stops with one line instead of waiting forever for a node that
   never comes. A Ray of the job's own has all its resources from the start and never grows:
   actors that do not fit it are an error at once, and the pool starts while the listing and the
   decode tasks already run (Ray Data's wait would put the actor's start, its torch import and
   model load, in series before every other stage: BENCHMARKS.md "Start-up of the whole command").
4. `finish_batch` (`pipeline.postprocess`): CPU tasks encode the masks and commit every
   `rows_per_file` rows as one Parquet file (`pipeline.output.commit_part`), returning one small
   row of counts. Files are decoupled from inference batches: a few hundred rows per file suit
   readers better than one tiny file per batch, and a kill loses at most that much work per task.

The driver only iterates over those count rows (Ray Data's progress bar shows the stages) and
then checks the output (`pipeline.output_check.summarize`): rows, errors, instances, and that no path
appears twice. Exactly-once and resume are described in `pipeline.output`.

Ray Data fuses a task stage into the actor stage that follows it when their resource requirements
are compatible, which would decode on the inference actor. The actors differ from the decode
tasks in what they ask for, which keeps decoding on CPU tasks by that documented rule: a GPU
actor asks for a GPU, a CPU actor for the memory its model and activations need
(`pipeline.actor_sizing.actor_memory_bytes`), which is also what keeps Ray from packing more
actors on a node than its memory holds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import ray

from mrcnn.model_spec import ModelError, load_spec
from pipeline import output
from pipeline.actor_sizing import actor_count, actor_cpus, actor_memory_bytes
from pipeline.decode import decode_batch
from pipeline.done_set import committed_path_hashes
from pipeline.gpu import AUTO, GpuUnavailableError, gpus_to_request
from pipeline.inference import Segmenter
from pipeline.inputs import InputSpec
from pipeline.job_log import say
from pipeline.listing import PathDatasource
from pipeline.output_check import OutputSummary, remove_duplicates, summarize
from pipeline.placement import WaitReport, auto_gpus, require_placement
from pipeline.postprocess import finish_batch
from pipeline.ray_errors import one_line
from pipeline.shared_storage import SharedStorageError, StorageMarker

logger = logging.getLogger(__name__)


# Ray Data gathers what a task yields into blocks of up to `target_max_block_size` bytes (128 MiB
# by default) before it hands any on. For the listing, whose rows are paths of ~60 bytes, that
# would hold back the first block until millions of paths were listed, and that one block would
# become one decode task: no streaming, no parallel decode. At 1 MiB the first block leaves the
# lister after ~15,000 paths (15 S3 pages) and the repartition below cuts it into batches. Decoded
# images and detections are ~0.1-3 MB per row, so their blocks hold one to a few rows.
TARGET_MAX_BLOCK_SIZE = 1 << 20
# How long a job waits for its first actors' resources by default: an autoscaler launching a GPU
# node (instance start, image pull, `ray start`) commonly takes 5 to 15 minutes.
DEFAULT_RESOURCE_TIMEOUT_S = 1200.0


class SegmentError(Exception):
    """The job stopped on a failure that Ray's retries did not cure; the message is one line."""


@dataclass(frozen=True)
class SegmentConfig:
    """One segmentation job; the fields mirror the flags of `jobs.segment`."""

    input: InputSpec
    output_uri: str
    model_uri: str
    batch_size: int = 4
    # None: `pipeline.actor_sizing.actor_count` chooses.
    actors: tuple[int, int] | None = None
    # A number, or `pipeline.gpu.AUTO`: GPUs where the cluster has or can add them.
    gpus_per_actor: float | str = AUTO
    # None: `pipeline.actor_sizing.actor_cpus` chooses.
    cpus_per_actor: float | None = None
    score_threshold: float = 0.5
    max_pixels: int = 100_000_000
    # The forward's precision, `pipeline.inference.PRECISION_CHOICES`; "auto" is resolved on each actor.
    precision: str = "auto"
    rows_per_file: int = 256
    joined_cluster: bool = False
    resource_timeout_s: float = DEFAULT_RESOURCE_TIMEOUT_S
    output_marker: StorageMarker | None = None
    # The output's `_JOB.json` record (`pipeline.provenance`), repeated in `_SUCCESS.json`.
    job: dict | None = None


@dataclass(frozen=True)
class SegmentReport:
    """What a run did (`new_*`, `seconds`, duplicate rows removed) and what the output holds."""

    new_images: int
    new_errors: int
    new_instances: int
    seconds: float
    output: OutputSummary
    repaired_duplicates: int = 0
    job: dict | None = None

    @property
    def images_per_second(self) -> float:
        return self.new_images / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        """The `_SUCCESS.json` content: output totals first, then this run's figures and settings."""
        return {
            "images": self.output.images,
            "errors": self.output.errors,
            "instances": self.output.instances,
            "files": self.output.files,
            "duplicate_paths": len(self.output.duplicate_paths),
            "repaired_duplicates": self.repaired_duplicates,
            "new_images": self.new_images,
            "new_errors": self.new_errors,
            "new_instances": self.new_instances,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 3),
            "job": self.job,
        }


def build_dataset(
    config: SegmentConfig, done: ray.ObjectRef | None, request: ActorRequest | None = None
) -> ray.data.Dataset:
    """The lazy dataset of per-batch counts; iterating it runs the job.

    `request`: the actor pool's resources (`plan_actors`), planned here when not given.
    """
    # A Dataset copies the current DataContext when it is created: these settings reach every
    # stage of this one (a failure then names our StorageError, not Ray's UserCodeException;
    # blocks are sized by TARGET_MAX_BLOCK_SIZE; the actor pool's start is bounded in time), and
    # the caller's context is left as it was.
    context = ray.data.DataContext.get_current()
    settings = ("raise_original_map_exception", "target_max_block_size", "wait_for_min_actors_s")
    previous = [getattr(context, name) for name in settings]
    context.raise_original_map_exception = True
    context.target_max_block_size = TARGET_MAX_BLOCK_SIZE
    # On a cluster, bound the wait for the first actors; on a Ray of the job's own (whose fit
    # `_build_dataset` checks) start them asynchronously: -1 is Ray Data's "do not wait".
    context.wait_for_min_actors_s = max(1, round(config.resource_timeout_s)) if config.joined_cluster else -1
    try:
        return _build_dataset(config, done, request or plan_actors(config))
    finally:
        for name, value in zip(settings, previous, strict=True):
            setattr(context, name, value)


def _build_dataset(
    config: SegmentConfig, done: ray.ObjectRef | None, request: ActorRequest
) -> ray.data.Dataset:
    spec = load_spec(config.model_uri)
    resources = ray.cluster_resources()
    low, high = request.actors
    cpus = resources.get("CPU", 0)
    if not config.joined_cluster:
        _check_local_fit(request, resources)
    elif cpus - low * request.cpus < 1:
        logger.warning(
            "%d inference actors of %g CPUs leave less than one of the cluster's %g CPUs for the "
            "decode and RLE tasks: the job waits until the cluster grows (or lower "
            "--cpus-per-actor / --actors)",
            low,
            request.cpus,
            cpus,
        )
    dataset = ray.data.read_datasource(
        PathDatasource(config.input, rows_per_block=config.batch_size, done=done),
        override_num_blocks=1,
        num_cpus=0,
    )
    # Blocks of `batch_size` paths, so that decode runs as many parallel tasks, one per batch.
    dataset = dataset.repartition(target_num_rows_per_block=config.batch_size)
    dataset = dataset.map_batches(
        decode_batch,
        fn_kwargs={
            "max_pixels": config.max_pixels,
            "min_size": spec.min_size,
            "max_size": spec.max_size,
        },
        batch_format="numpy",
    )
    dataset = dataset.map_batches(
        Segmenter,
        fn_constructor_kwargs={
            "model_uri": config.model_uri,
            "score_threshold": config.score_threshold,
            "num_threads": max(1, int(request.cpus)),
            "use_gpu": request.gpus > 0,
            "precision": config.precision,
        },
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high),
        num_cpus=request.cpus,
        num_gpus=request.gpus or None,
        memory=request.memory,
    )
    return dataset.map_batches(
        finish_batch,
        batch_size=config.rows_per_file,
        fn_kwargs={
            "categories": spec.categories,
            "model_uri": config.model_uri,
            "output_uri": config.output_uri,
            "output_marker": config.output_marker,
        },
        batch_format="numpy",
    )


def run_segmentation(config: SegmentConfig) -> SegmentReport:
    """Segment every input of `config` not yet in the output, then check and summarise the output.

    Ray must be initialised (see `pipeline.ray_runtime`). Rows that a killed run's stray writer
    added twice are removed (`pipeline.output_check.remove_duplicates`); `_SUCCESS.json` is written only
    when every path has one row.
    """
    start = time.perf_counter()
    output.clear_stale_state(config.output_uri)
    done_hashes = committed_path_hashes(config.output_uri)
    done = ray.put(done_hashes) if done_hashes.size else None
    request = plan_actors(config)
    counts = {"images": 0, "errors": 0, "instances": 0}
    # On a cluster, a line a minute until the first batch is done: the actors were placed.
    waiting = WaitReport(
        say, f"{request.actors[0]} inference actor(s)", request.bundle(), config.resource_timeout_s
    )
    try:
        if config.joined_cluster:
            waiting.start()
        for batch in build_dataset(config, done, request).iter_batches(batch_size=None, batch_format="numpy"):
            waiting.stop()
            for name in counts:
                counts[name] += int(batch[name].sum())
    except ray.exceptions.GetTimeoutError as error:
        raise SegmentError(
            f"the cluster gave no room for {request.describe()} within {config.resource_timeout_s:g} s: "
            f"no node has them free and none was added (an autoscaler without a node type that "
            f"fits, or at its max_workers); lower --actors/--cpus-per-actor/--gpus-per-actor or "
            f"add such nodes (Ray: {one_line(error)})"
        ) from error
    except ray.exceptions.RayError as error:
        cause = one_line(error)
        cannot_work = (GpuUnavailableError, SharedStorageError, ModelError)
        if cause.startswith(tuple(f"{kind.__name__}:" for kind in cannot_work)):
            # A node that cannot do the work, or weights no actor can load: re-running the same
            # command would not help.
            raise SegmentError(cause) from error
        raise SegmentError(
            f"the job stopped: {cause}; the files already in the output are complete, "
            f"re-run the same command to go on"
        ) from error
    finally:
        waiting.stop()
    summary = summarize(config.output_uri)
    repaired = 0
    if summary.duplicate_paths:
        repaired = remove_duplicates(config.output_uri, summary.duplicate_paths)
        summary = summarize(config.output_uri)
    report = SegmentReport(
        new_images=counts["images"],
        new_errors=counts["errors"],
        new_instances=counts["instances"],
        seconds=time.perf_counter() - start,
        output=summary,
        repaired_duplicates=repaired,
        job=config.job,
    )
    if not summary.duplicate_paths:
        output.write_success(config.output_uri, report.to_dict())
    return report


@dataclass(frozen=True)
class ActorRequest:
    """What the inference actor pool asks Ray for.

    `actors`: the pool's (MIN, MAX) size; `cpus`, `gpus`: per actor; `memory`: bytes per CPU actor
    (`pipeline.actor_sizing.actor_memory_bytes`), None for a GPU actor, whose model and
    activations live on the GPU.
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


def plan_actors(config: SegmentConfig) -> ActorRequest:
    """The actor pool's request on the connected Ray, decided once per run, with a line saying
    whether the actors run on GPUs and why.

    On a cluster the job joined, `--gpus-per-actor auto` asks the cluster (`pipeline.placement.
    auto_gpus`), and a request that no node and no node type can ever hold raises
    `pipeline.placement.InfeasibleRequest` at once instead of waiting out the resource timeout.
    """
    spec = load_spec(config.model_uri)
    resources = ray.cluster_resources()
    gpus, reason = config.gpus_per_actor, None
    if config.joined_cluster and gpus == AUTO:
        gpus, reason = auto_gpus(1.0, cpus=1.0)
    request = _actor_request(config, gpus, spec.min_size, spec.max_size, resources)
    if reason is None:
        reason = (
            f"--gpus-per-actor {config.gpus_per_actor}"
            if config.joined_cluster
            else f"this machine has {resources.get('GPU', 0):g} GPUs"
        )
    say(f"segment: inference actors on {'GPUs' if request.gpus else 'CPUs'} ({reason})")
    # A GPU count `auto` chose is placeable already: the check that chose it said so.
    if config.joined_cluster and not (config.gpus_per_actor == AUTO and request.gpus):
        way_out = (
            "use --gpus-per-actor 0 for CPU actors, or give the cluster a node type with a GPU"
            if request.gpus
            else "lower --cpus-per-actor, or give the cluster a node type that holds it"
        )
        require_placement(request.bundle(), "an inference actor", way_out)
    return request


def _actor_request(
    config: SegmentConfig, gpus: float | str, min_size: int, max_size: int, resources: dict[str, float]
) -> ActorRequest:
    """The actor pool's request, from the flags (`gpus` resolved on a joined cluster) and what the
    cluster holds (`resources`, Ray's `cluster_resources()`)."""
    cluster_cpus = resources.get("CPU", 0)
    gpus = gpus_to_request(gpus, config.joined_cluster, resources.get("GPU", 0))
    memory = actor_memory_bytes(min_size, max_size, config.batch_size)
    actors = actor_count(
        config.actors, cluster_cpus, resources.get("memory", 0), memory, gpus, config.joined_cluster
    )
    cpus = actor_cpus(config.cpus_per_actor, cluster_cpus, actors[0], gpus, config.joined_cluster)
    return ActorRequest(actors, cpus, gpus, None if gpus else memory)


def _check_local_fit(request: ActorRequest, resources: dict[str, float]) -> None:
    """Raise `SegmentError` unless the first actors and a decode task fit this Ray's `resources`.

    For a Ray that is not a cluster the job joined: its resources are what they will ever be, so a
    pool that does not fit would wait forever.
    """
    cpus, gpus, memory = (resources.get(name, 0) for name in ("CPU", "GPU", "memory"))
    low = request.actors[0]
    if low * request.cpus + 1 > cpus or low * request.gpus > gpus or low * (request.memory or 0) > memory:
        raise SegmentError(
            f"{request.describe()}, plus 1 CPU for the decode and RLE tasks, do not fit this Ray's "
            f"{cpus:g} CPUs, {gpus:g} GPUs and {memory / (1 << 30):.1f} GiB of memory: lower "
            f"--actors/--cpus-per-actor/--gpus-per-actor/--batch-size or raise --num-cpus (a local "
            f"Ray's CPUs are logical)"
        )
