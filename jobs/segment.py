"""Segment every image of a folder, an S3 prefix or a manifest into Parquet rows, with Ray Data.

    python -m jobs.segment --input s3://bucket/photos --output s3://bucket/masks \\
        --model s3://bucket/run/model --batch-size 8 --actors 1-4 --score-threshold 0.5

`--input` is a folder or `s3://bucket/prefix` (images by extension, recursively), a `.txt`
manifest (one URI per line) or a `.parquet` manifest with a `path` column. `--model` is a model
folder exported by `jobs.train` (local or s3://) or `torchvision:maskrcnn_resnet50_fpn_v2`. The
output gets one row per input image (schema in `pipeline.segment.output`), `OUTPUT/_JOB.json` with the
settings that made its rows (`pipeline.segment.provenance`), and `OUTPUT/_SUCCESS.json` with the counts
at the end. Re-running the same command after a crash or a kill processes only the inputs that
have no row yet; a re-run with other settings (model content, threshold, max pixels) exits 2.
With `RAY_ADDRESS` set the job runs on that cluster; otherwise on a local Ray of `--num-cpus` CPUs.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from jobs.cli import OneLineParser, bounded, run_job
from mrcnn import torchvision_models
from mrcnn.errors import RunError
from mrcnn.model_spec import ModelError, ModelSpec, load_spec
from mrcnn.storage import StorageError
from pipeline.cluster.gpu import AUTO
from pipeline.cluster.ray_compat import check_ray_version
from pipeline.segment.inference import PRECISION_CHOICES
from pipeline.segment.inputs import check_input
from pipeline.segment.job import DEFAULT_RESOURCE_TIMEOUT_S, SegmentConfig
from pipeline.segment.provenance import check_output, job_record, record_output


def actor_range(text: str) -> tuple[int, int]:
    """`N` -> (N, N), a fixed pool; `MIN-MAX` -> (MIN, MAX), an autoscaling pool."""
    low, _, high = text.partition("-")
    try:
        bounds = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX, got {text!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return bounds


def gpus_per_actor(text: str) -> float | str:
    """`auto` or a number of GPUs >= 0."""
    if text == AUTO:
        return AUTO
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be auto or at least 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m jobs.segment", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--input", required=True, help="folder, s3://bucket/prefix, .txt or .parquet manifest"
    )
    parser.add_argument("--output", required=True, help="output folder (local or s3://)")
    parser.add_argument("--model", required=True, help="model folder (local or s3://) or torchvision:<name>")
    parser.add_argument(
        "--batch-size", type=bounded(int, 1), default=4, help="images per inference batch (default 4)"
    )
    _actor_flags(parser)
    _row_flags(parser)
    _run_flags(parser)
    return parser


def _actor_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that size the inference actor pool."""
    parser.add_argument(
        "--actors",
        type=actor_range,
        default=None,
        metavar="N|MIN-MAX",
        help="inference actors: a fixed number or an autoscaling range (default: on a local Ray "
        "without GPUs, one per core as memory allows; on a cluster or with GPUs, 1)",
    )
    parser.add_argument(
        "--gpus-per-actor",
        type=gpus_per_actor,
        default=AUTO,
        metavar="auto|G",
        help="GPUs per inference actor. auto (the default): 1 where the cluster has GPU nodes or its "
        "autoscaler a node type with GPUs, else CPU actors (0). A number is requested as given on a "
        "cluster (RAY_ADDRESS), so that its autoscaler adds GPU nodes; a request no node and no node "
        "type can hold stops the job at once. A local Ray uses GPUs only when the machine has them",
    )
    parser.add_argument(
        "--cpus-per-actor",
        type=bounded(float, 0.0, above=True),
        default=None,
        help="CPUs per inference actor, and its torch threads (default: on a local Ray, its CPUs "
        "but three shared among the actors, which leaves one each for the listing's cut, decode "
        "and RLE tasks: 1 with the default --actors; on a cluster or with GPUs, 1)",
    )


def _row_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that decide what a row holds (recorded in `_JOB.json`)."""
    parser.add_argument(
        "--score-threshold",
        type=bounded(float, 0.0, 1.0),
        default=0.5,
        help="keep detections scoring above it (default 0.5)",
    )
    parser.add_argument(
        "--max-pixels",
        type=bounded(int, 1),
        default=100_000_000,
        help="images with more pixels (from the header) become error rows (default 100000000)",
    )
    parser.add_argument(
        "--amp",
        choices=PRECISION_CHOICES,
        default="auto",
        help="precision of the forward: auto is bf16 where the actor's hardware computes it "
        "natively (GPUs with bf16, CPUs with AMX or AVX512-BF16), fp16 on older GPUs, float32 (off) "
        "elsewhere; box coordinates stay float32 (default auto)",
    )


def _run_flags(parser: argparse.ArgumentParser) -> None:
    """Which inputs, how the output is cut into files, and the Ray the job runs on."""
    parser.add_argument(
        "--limit", type=bounded(int, 1), default=None, help="only the first N inputs of the listing"
    )
    parser.add_argument(
        "--rows-per-file",
        type=bounded(int, 1),
        default=256,
        help="rows per committed Parquet file (default 256)",
    )
    parser.add_argument(
        "--resource-timeout",
        type=bounded(float, 0.0, above=True),
        default=DEFAULT_RESOURCE_TIMEOUT_S,
        metavar="SECONDS",
        help="how long to wait for the cluster to provide the first actors' CPUs and GPUs before "
        f"stopping with an error (default {DEFAULT_RESOURCE_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--num-cpus",
        type=bounded(int, 1),
        default=None,
        help="logical CPUs of the local Ray started when RAY_ADDRESS is not set (default: the "
        "machine's cores plus three, so that the listing's cut, decode and RLE tasks run beside actors "
        "that use every core)",
    )
    parser.add_argument(
        "--verbose", action="store_true",
        help="also show what Ray and the job's workers print (by default it stays in Ray's log files); "
        "MRCNN_VERBOSE=1 in the environment does the same",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_job("segment", lambda: segment(args))


def segment(args: argparse.Namespace) -> int:
    """Check everything the driver can before Ray starts, then segment on a Ray session."""
    from pipeline.cluster.session import ray_session
    from pipeline.segment.actor_sizing import local_ray_cpus
    from pipeline.segment.job import run_segmentation

    config = config_from(args)
    previous = _output_record(args.output, config.job)
    with ray_session(num_cpus=args.num_cpus or local_ray_cpus(), verbose=args.verbose) as session:
        if session.joined_cluster:
            config = _on_cluster(config, args)
        if previous is None:
            notice = _output_call(args.output, lambda: record_output(args.output, config.job))
            if notice:
                print(f"segment: note: {notice}", file=sys.stderr)
        report = run_segmentation(replace(config, job=previous or config.job))
    return _print_report(report, args.output)


def config_from(args: argparse.Namespace) -> SegmentConfig:
    """The job's `SegmentConfig`, after the checks that need no Ray: the input can be listed, the
    model's spec and weights can be read (the spec is read here, once), Ray has the names the
    job relies on; `job` is the `_JOB.json` record of these settings."""
    check_ray_version(training=False)
    inputs = check_input(args.input, args.limit)
    spec = check_model(args.model)
    return SegmentConfig(
        input=inputs,
        output_uri=args.output,
        model_uri=args.model,
        spec=spec,
        batch_size=args.batch_size,
        actors=args.actors,
        gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor,
        score_threshold=args.score_threshold,
        max_pixels=args.max_pixels,
        precision=args.amp,
        rows_per_file=args.rows_per_file,
        resource_timeout_s=args.resource_timeout,
        job=job_record(args.model, args.score_threshold, args.max_pixels, args.amp),
    )


def check_model(uri: str) -> ModelSpec:
    """The model's spec; raises `ModelError` (one line) unless the driver finds what every actor
    will load: the model folder's `model.json`, or torchvision's weights in the torch hub cache
    (downloaded there where there is network), as `jobs.train` checks its backbone's."""
    spec = load_spec(uri)
    if torchvision_models.is_torchvision(uri):
        from mrcnn.weights import WeightsError, ensure_torchvision_weights

        try:
            ensure_torchvision_weights(torchvision_models.builder_of(uri))
        except WeightsError as error:
            raise ModelError(str(error)) from error
    return spec


class OutputUnreachable(RunError):
    """The output could not be read or written (throttling, permissions): a failure of the run, as
    when a part file cannot be committed, not a mistake in the command line."""


def _output_call(output_uri: str, read_or_write):
    """`read_or_write()` on the output, its storage errors as `OutputUnreachable`."""
    try:
        return read_or_write()
    except StorageError as error:
        raise OutputUnreachable(f"{error}; nothing was written, re-run the same command") from error


def _output_record(output_uri: str, record: dict) -> dict | None:
    """The output's `_JOB.json` when it matches `record` (`ProvenanceMismatch` otherwise), read
    before Ray starts so that a mismatch costs no start-up."""
    return _output_call(output_uri, lambda: check_output(output_uri, record))


def _on_cluster(config: SegmentConfig, args: argparse.Namespace) -> SegmentConfig:
    """On a cluster the job joined: local paths checked on every node, the output's marker kept."""
    from pipeline.cluster.shared_storage import check_local_paths

    markers = check_local_paths({"--output": args.output}, {"--input": args.input, "--model": args.model})
    return replace(config, joined_cluster=True, output_marker=markers.get("--output"))


def _print_report(report, output_uri: str) -> int:
    summary = report.to_dict()
    repaired = summary["repaired_duplicates"]
    print(
        f"segment: {summary['new_images']} images ({summary['new_errors']} errors, "
        f"{summary['new_instances']} instances) in {summary['seconds']:.1f} s, "
        f"{summary['images_per_second']:.2f} images/s; output {output_uri} holds "
        f"{summary['images']} images, {summary['errors']} errors, {summary['instances']} instances "
        f"in {summary['files']} files"
        + (f"; removed {repaired} duplicate rows of a killed run" if repaired else "")
    )
    if report.output.duplicate_paths:
        shown = ", ".join(report.output.duplicate_paths[:3])
        print(
            f"segment: error: {len(report.output.duplicate_paths)} paths have more than one row "
            f"(e.g. {shown}); _SUCCESS.json not written",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
