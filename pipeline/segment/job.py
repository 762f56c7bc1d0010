"""The bulk segmentation job: its config, the Ray Data pipeline, and a run of it from the done set
to `_SUCCESS.json`.

Stages (Ray Data, streaming end to end, memory bounded by Ray Data's backpressure):

1. `PathDatasource` (`pipeline.segment.listing`): one read task streams the inputs not yet in the
   output, `batch_size` paths per block; it reserves no CPU.
2. `decode_batch` (`pipeline.segment.decode`): CPU tasks read and decode each block, shrink the
   images to the model's input size, and turn bad files into error rows.
3. `Segmenter` (`pipeline.segment.inference`): an actor pool, fixed (`actors=(N, N)`) or
   autoscaling (`(MIN, MAX)`), each actor loading the model once, sized by
   `pipeline.segment.actor_sizing` (GPUs where the cluster has or can add them; on a Ray of the
   job's own, one single-thread actor per core as memory allows). On a cluster the job waits at
   most `resource_timeout_s` for the first `MIN` actors (Ray Data's `wait_for_min_actors_s`),
   saying each minute what it waits for, then stops with one line. A Ray of the job's own has all
   its resources from the start: the pool starts while the listing and the decode tasks already
   run (Ray Data's wait would put the actor's start, its torch import and model load, in series
   before every other stage: BENCHMARKS.md "Start-up of the whole command").
4. `finish_batch` (`pipeline.segment.postprocess`): CPU tasks encode the masks and commit every
   `rows_per_file` rows as one Parquet file (`pipeline.segment.output.commit_part`), returning one
   small row of counts. Files are decoupled from inference batches: a few hundred rows per file
   suit readers better than one tiny file per batch, and a kill loses at most that much work per
   task.

The driver only iterates over those count rows, then checks the output
(`pipeline.segment.output.summarize`): rows, errors, instances, and that no path appears twice.
Meanwhile the console shows Ray Data's progress bars, or where stdout is no terminal a line of
`SegmentProgress` every 30 s (`pipeline.cluster.progress`). The driver's memory does not grow with
the inputs: Ray Data's per-block stats are cut to a bound (`pipeline.cluster.ray_compat.
BoundedBlockStats`) and the listing is cut into batches only a few hundred ahead of the decode
tasks (`CutAhead`); figures in BENCHMARKS.md, "At scale (issue 25)".
Exactly-once and resume are described in `pipeline.segment.output`.

Ray Data fuses a task stage into the actor stage that follows it when their resource requirements
are compatible, which would decode on the inference actor. The actors differ from the decode
tasks in what they ask for, which keeps decoding on CPU tasks by that documented rule: a GPU
actor asks for a GPU, a CPU actor for the memory its model and activations need
(`pipeline.segment.actor_sizing.actor_memory_bytes`), which is also what keeps Ray from packing
more actors on a node than its memory holds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray

from mrcnn.errors import RunError, UserError
from mrcnn.model_spec import ModelSpec
from pipeline.cluster.gpu import AUTO
from pipeline.cluster.job_log import say
from pipeline.cluster.placement import WaitReport
from pipeline.cluster.progress import ProgressLines, with_progress_lines
from pipeline.cluster.ray_compat import BoundedBlockStats, QueuedBlocksCap, add_backpressure_policy
from pipeline.cluster.ray_errors import actor_could_not_start, cause_line, root_cause
from pipeline.cluster.shared_storage import StorageMarker
from pipeline.segment import output
from pipeline.segment.actor_sizing import ActorFlags, ActorRequest, plan_actors
from pipeline.segment.decode import decode_batch
from pipeline.segment.inference import Segmenter
from pipeline.segment.inputs import InputSpec
from pipeline.segment.listing import PathDatasource
from pipeline.segment.postprocess import finish_batch

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


class SegmentProgress(ProgressLines):
    """The job's progress line where its stdout is no terminal (`pipeline.cluster.progress`)."""

    prefix = "segment"


class CutAhead(QueuedBlocksCap):
    """The cut of the listing into batches waits while `pipeline.cluster.ray_compat.MAX_QUEUED_BLOCKS`
    batches wait for a decode task: its blocks are paths, which no byte budget of Ray Data's
    would stop before the whole listing was cut, one driver-side reference per batch."""

    names = ("StreamingRepartition",)


class SegmentError(RunError):
    """The job stopped on a failure that Ray's retries did not cure; the message is one line."""


@dataclass(frozen=True)
class SegmentConfig:
    """One segmentation job: the flags of `jobs.segment`, the model's spec (its `model.json`, read
    once on the driver) and what the job learns when it joins Ray (`joined_cluster`, the output's
    marker on a cluster) and from the output (`job`, its `_JOB.json` record)."""

    input: InputSpec
    output_uri: str
    model_uri: str
    spec: ModelSpec
    batch_size: int = 4
    # None: `pipeline.segment.actor_sizing.actor_count` chooses.
    actors: tuple[int, int] | None = None
    # A number, or `pipeline.cluster.gpu.AUTO`: GPUs where the cluster has or can add them.
    gpus_per_actor: float | str = AUTO
    # None: `pipeline.segment.actor_sizing.actor_cpus` chooses.
    cpus_per_actor: float | None = None
    score_threshold: float = 0.5
    max_pixels: int = 100_000_000
    # The forward's precision (`pipeline.segment.inference.PRECISION_CHOICES`); "auto" is resolved
    # on each actor.
    precision: str = "auto"
    rows_per_file: int = 256
    resource_timeout_s: float = DEFAULT_RESOURCE_TIMEOUT_S
    joined_cluster: bool = False
    output_marker: StorageMarker | None = None
    job: dict | None = None

    @property
    def actor_flags(self) -> ActorFlags:
        return ActorFlags(
            self.actors, self.gpus_per_actor, self.cpus_per_actor, self.batch_size,
            self.spec.min_size, self.spec.max_size,
        )  # fmt: skip


@dataclass(frozen=True)
class SegmentReport:
    """What a run did (`new_*`, `seconds`, duplicate rows removed) and what the output holds."""

    new_images: int
    new_errors: int
    new_instances: int
    seconds: float
    output: output.OutputSummary
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

    `request`: the actor pool's resources (`pipeline.segment.actor_sizing.plan_actors`), planned
    here when not given.
    """
    request = request or plan_actors(config.actor_flags, config.joined_cluster)
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
    # `plan_actors` checked) start them asynchronously: -1 is Ray Data's "do not wait".
    context.wait_for_min_actors_s = max(1, round(config.resource_timeout_s)) if config.joined_cluster else -1
    try:
        dataset = with_progress_lines(_stages(config, done, request), SegmentProgress)
        # The driver's memory bounded whatever the number of inputs: Ray Data would keep the
        # stats of every block on it (`pipeline.cluster.ray_compat.BoundedBlockStats`).
        classes = dataset.context.custom_execution_callback_classes
        dataset.context.custom_execution_callback_classes = [*classes, BoundedBlockStats]
        add_backpressure_policy(dataset.context, CutAhead)
        return dataset
    finally:
        for name, value in zip(settings, previous, strict=True):
            setattr(context, name, value)


def _stages(config: SegmentConfig, done: ray.ObjectRef | None, request: ActorRequest) -> ray.data.Dataset:
    spec = config.spec
    dataset = ray.data.read_datasource(
        PathDatasource(config.input, rows_per_block=config.batch_size, done=done),
        override_num_blocks=1,
        num_cpus=0,
    )
    # Blocks of `batch_size` paths, so that decode runs as many parallel tasks, one per batch.
    dataset = dataset.repartition(target_num_rows_per_block=config.batch_size)
    dataset = dataset.map_batches(
        decode_batch,
        fn_kwargs={"max_pixels": config.max_pixels, "min_size": spec.min_size, "max_size": spec.max_size},
        batch_format="numpy",
    )
    low, high = request.actors
    dataset = dataset.map_batches(
        Segmenter,
        fn_constructor_kwargs={
            "model_uri": config.model_uri,
            "spec": spec,
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

    Ray must be initialised (`pipeline.cluster.session`). Rows that a killed run's stray writer
    added twice are removed (`pipeline.segment.output.remove_duplicates`); `_SUCCESS.json` is
    written only when every path has one row.
    """
    start = time.perf_counter()
    output.clear_stale_state(config.output_uri)
    done_hashes = output.committed_path_hashes(config.output_uri)
    done = ray.put(done_hashes) if done_hashes.size else None
    request = plan_actors(config.actor_flags, config.joined_cluster)
    counts = _run_dataset(config, done, request)
    summary, repaired = _check_output(config.output_uri)
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


def _run_dataset(config: SegmentConfig, done: ray.ObjectRef | None, request: ActorRequest) -> dict[str, int]:
    """Run the pipeline; this run's counts. On a cluster, a line a minute until the first batch
    is done (the actors were placed); Ray's failures as `SegmentError`."""
    counts = {"images": 0, "errors": 0, "instances": 0}
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
            f"add such nodes (Ray: {cause_line(error)})"
        ) from error
    except ray.exceptions.RayError as error:
        cause = cause_line(error)
        if actor_could_not_start(error) or isinstance(root_cause(error), UserError):
            # A node that cannot do the work, or weights no actor can load: re-running the same
            # command would not help.
            raise SegmentError(cause) from error
        raise SegmentError(
            f"the job stopped: {cause}; the files already in the output are complete, "
            f"re-run the same command to go on"
        ) from error
    finally:
        waiting.stop()
    return counts


def _check_output(output_uri: str) -> tuple[output.OutputSummary, int]:
    """The output's summary, after removing the rows a killed run's stray writer added twice;
    with the number of rows removed."""
    summary = output.summarize(output_uri)
    if not summary.duplicate_paths:
        return summary, 0
    repaired = output.remove_duplicates(output_uri, summary.duplicate_paths)
    return output.summarize(output_uri), repaired
