"""The segmentation output folder: its Parquet schema, its atomic part commits, its done set, its
reader, its final check and its success marker.

Exactly-once from at-least-once: Ray retries tasks and restarts actors, so a batch can be
processed twice, and a killed job is run again. Every batch of rows is committed as one Parquet
file named after its content, `part-<sha1 of the batch's sorted input paths>.parquet`, written in
one piece with `mrcnn.storage.write_bytes` (local: a hidden temporary file renamed into place; S3:
one PUT, whose object appears whole). A retried batch rewrites the same name with the same rows, so
nothing is duplicated, and a reader never sees a partial file (pyarrow, DuckDB and pandas skip
`.`/`_` names). `_SUCCESS.json` is written (atomically, like every file here) only for an output in
which every path has one row, and is deleted when a new run starts.

The done set: a re-run reads only the `path` column of the committed files, keeps their 64-bit
hashes (8 bytes per row) and the lister drops those inputs (`pipeline.segment.listing`), so each
input gets a row once over any sequence of kills and re-runs. Two distinct paths share a 64-bit
hash with probability about n^2 / 2^65 (1e-7 for a million inputs, 3e-4 for a hundred million);
such an input would be skipped.

The final check: when a driver dies, its Ray workers outlive it for a moment (they notice that
their raylet or job is gone), and a task in the middle of a commit can still write its file after a
re-run has read the done set, so a path can land in two files. At the end of every run `summarize`
counts the rows and looks for paths that appear twice; `remove_duplicates` then rewrites the files
holding the extra copies without them (new content-named file first, old file deleted after, so a
kill in between leaves duplicates for the next run to repair, never a lost row).

Readers of an output (`jobs.evaluate`, the quickstart, the checks here) go through `scan_parts`:
the committed part files only, one file at a time, each read retried on its own.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mrcnn import storage
from mrcnn.errors import one_line

SCHEMA = pa.schema(
    [
        pa.field("path", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("category_ids", pa.list_(pa.int32())),
        pa.field("categories", pa.list_(pa.string())),
        pa.field("scores", pa.list_(pa.float32())),
        pa.field("boxes", pa.list_(pa.list_(pa.float32(), 4))),
        pa.field("masks", pa.list_(pa.string())),
        pa.field("error", pa.string()),
        pa.field("model", pa.string()),
    ]
)
"""One row per input image; see issue 5 and the README for the meaning of each column."""
# Recorded in `_JOB.json` (`pipeline.segment.provenance`): raise it when SCHEMA or a column's meaning
# changes, so that a re-run never mixes rows of two schemas in one output.
SCHEMA_VERSION = 1

PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
SUCCESS_FILE = "_SUCCESS.json"
# Rows per record batch when scanning committed files (the done set and the summary), and the part
# files read at once.
SCAN_BATCH_ROWS = 65536
SCAN_THREADS = 8


def part_name(paths: Iterable[str]) -> str:
    """The file name of the batch holding `paths`: the same paths give the same name."""
    digest = hashlib.sha1("\n".join(sorted(paths)).encode()).hexdigest()
    return f"{PART_PREFIX}{digest}{PART_SUFFIX}"


def commit_part(table: pa.Table, output_uri: str) -> str:
    """Write `table` (exactly `SCHEMA`) under `output_uri` as one file, atomically; returns its URI."""
    if not table.schema.equals(SCHEMA):
        raise ValueError(f"commit_part: the table's schema is not the output schema:\n{table.schema}")
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    uri = storage.join(output_uri, part_name(table.column("path").to_pylist()))
    storage.write_bytes(uri, buffer.getvalue())
    return uri


def part_files(output_uri: str) -> tuple[pafs.FileSystem, list[str]]:
    """The committed part files directly under `output_uri` (none when it does not exist yet)."""
    filesystem, files = _part_infos(output_uri)
    return filesystem, [info.path for info in files]


def _part_infos(output_uri: str) -> tuple[pafs.FileSystem, list[pafs.FileInfo]]:
    filesystem, path = storage.resolve(output_uri)
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as error:
        raise storage.StorageError(f"{output_uri}: cannot list ({one_line(error)})") from error
    parts = [
        info
        for info in infos
        if info.type == pafs.FileType.File
        and info.base_name.startswith(PART_PREFIX)
        and info.base_name.endswith(PART_SUFFIX)
    ]
    return filesystem, sorted(parts, key=lambda info: info.path)


def read_part(filesystem: pafs.FileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    """`columns` (all: None) of the part file at `path`, read on its own: a failure is retried at
    the read of this one file (`mrcnn.s3_retry`), never by restarting a scan of the output.

    On S3 the file is read whole, in one GET (parts are a few hundred rows): one request instead
    of a HEAD, the footer and a range per column chunk.
    """
    uri = storage.to_uri(filesystem, path)
    try:
        if storage.is_s3(uri):
            return pq.read_table(pa.BufferReader(storage.read_bytes(uri)), columns=columns, schema=SCHEMA)
        return pq.read_table(path, columns=columns, filesystem=filesystem, schema=SCHEMA)
    except (OSError, pa.ArrowException) as error:
        raise storage.StorageError(f"{uri}: cannot read ({one_line(error)})") from error


def scan_parts(
    output_uri: str, columns: list[str], listed: tuple[pafs.FileSystem, list[str]] | None = None
) -> Iterator[pa.RecordBatch]:
    """Record batches of `columns` from every committed part (`listed`: a `part_files` result).

    Files are read `SCAN_THREADS` at a time (S3 answers each in tens of milliseconds: one after
    the other, a resume of a million rows would wait minutes on latency alone), in order, with at
    most twice that many files in memory.
    """
    filesystem, files = listed or part_files(output_uri)
    with ThreadPoolExecutor(max_workers=SCAN_THREADS) as pool:
        pending: deque = deque()
        for file in files:
            pending.append(pool.submit(read_part, filesystem, file, columns))
            if len(pending) >= 2 * SCAN_THREADS:
                yield from pending.popleft().result().to_batches(SCAN_BATCH_ROWS)
        while pending:
            yield from pending.popleft().result().to_batches(SCAN_BATCH_ROWS)


def iter_rows(output_uri: str, columns: list[str]) -> Iterator[dict]:
    """The rows of the output as dicts of `columns`, file by file (`scan_parts`)."""
    for batch in scan_parts(output_uri, columns):
        yield from batch.to_pylist()


def clear_stale_state(output_uri: str) -> None:
    """Delete what a run must not find: a stale `_SUCCESS.json` and the temporaries of killed
    writers; create a local output folder."""
    storage.delete(storage.join(output_uri, SUCCESS_FILE))
    filesystem, path = storage.resolve(output_uri)
    if not storage.is_s3(output_uri):
        filesystem.create_dir(path, recursive=True)
        for info in filesystem.get_file_info(pafs.FileSelector(path)):
            # `storage.write_bytes` names its temporaries `.<target>.<uuid>.tmp`.
            if info.base_name.startswith("." + PART_PREFIX) and info.base_name.endswith(".tmp"):
                filesystem.delete_file(info.path)


def read_success(output_uri: str) -> dict:
    """The `_SUCCESS.json` of a complete output."""
    return json.loads(storage.read_bytes(storage.join(output_uri, SUCCESS_FILE)))


def write_success(output_uri: str, report: dict) -> str:
    """Write `report` as `OUTPUT/_SUCCESS.json`, atomically; returns its URI."""
    uri = storage.join(output_uri, SUCCESS_FILE)
    storage.write_bytes(uri, (json.dumps(report, indent=2) + "\n").encode())
    return uri


def path_hashes(paths: Iterable[str]) -> np.ndarray:
    """`uint64[N]`: a 64-bit BLAKE2b hash of each path, stable across processes and runs."""
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "little")
            for path in paths
        ),
        dtype=np.uint64,
    )


def committed_path_hashes(output_uri: str) -> np.ndarray:
    """Sorted unique `uint64[D]` hashes of the paths already committed under `output_uri`."""
    chunks = [path_hashes(batch.column(0).to_pylist()) for batch in scan_parts(output_uri, ["path"])]
    if not chunks:
        return np.zeros(0, np.uint64)
    return np.unique(np.concatenate(chunks))


@dataclass(frozen=True)
class OutputSummary:
    """What the output holds: rows (`images`), error rows, instances, files; paths seen twice."""

    images: int
    errors: int
    instances: int
    files: int
    duplicate_paths: tuple[str, ...]


def summarize(output_uri: str) -> OutputSummary:
    """Count the committed rows and check that no path appears twice (one scan of three columns)."""
    listed = part_files(output_uri)
    images = errors = instances = 0
    chunks = []
    for batch in scan_parts(output_uri, ["path", "error", "scores"], listed):
        images += batch.num_rows
        errors += batch.num_rows - batch.column(1).null_count
        instances += int(pc.sum(pc.list_value_length(batch.column(2))).as_py() or 0)
        chunks.append(path_hashes(batch.column(0).to_pylist()))
    hashes = np.concatenate(chunks) if chunks else np.zeros(0, np.uint64)
    values, counts = np.unique(hashes, return_counts=True)
    suspects = values[counts > 1]
    duplicates: tuple[str, ...] = ()
    if suspects.size:
        # Equal hashes of different paths are collisions, not duplicates: compare the paths.
        seen: dict[str, int] = {}
        for batch in scan_parts(output_uri, ["path"], listed):
            paths = batch.column(0).to_pylist()
            for path in np.asarray(paths, dtype=object)[np.isin(path_hashes(paths), suspects)]:
                seen[path] = seen.get(path, 0) + 1
        duplicates = tuple(sorted(path for path, count in seen.items() if count > 1))
    return OutputSummary(images, errors, instances, len(listed[1]), duplicates)


def remove_duplicates(output_uri: str, duplicate_paths: Iterable[str]) -> int:
    """Keep one row per path of `duplicate_paths` (the one in the first file by name); returns
    the number of rows removed. Only files holding one of those paths are read and rewritten."""
    duplicates = set(duplicate_paths)
    filesystem, files = part_files(output_uri)
    kept: set[str] = set()
    removed = 0
    for file in files:
        paths = read_part(filesystem, file, ["path"]).column(0).to_pylist()
        drop = []
        for path in paths:
            drop.append(path in kept)
            if path in duplicates:
                kept.add(path)
        if not any(drop):
            continue
        table = read_part(filesystem, file).filter(pc.invert(pa.array(drop)))
        rewritten = commit_part(table, output_uri) if table.num_rows else None
        if rewritten is None or storage.resolve(rewritten)[1] != file:
            storage.delete(storage.to_uri(filesystem, file))
        removed += sum(drop)
    return removed
