"""The segmentation output folder: its Parquet schema, its atomic part commits and its success marker.

Exactly-once from at-least-once: Ray retries tasks and restarts actors, so a batch can be
processed twice, and a killed job is run again. Every batch of rows is committed as one Parquet
file named after its content, `part-<sha1 of the batch's sorted input paths>.parquet`, written in
one piece with `mrcnn.storage.write_bytes` (local: a hidden temporary file renamed into place; S3:
pyarrow's multipart upload, whose object appears only when the upload completes). A retried batch
rewrites the same name with the same rows, so nothing is duplicated, and a reader never sees a
partial file (pyarrow, DuckDB and pandas skip `.`/`_` names). A re-run skips the inputs already
committed (`pipeline.done_set`), and every run ends with a check of the whole output
(`pipeline.output_check`). `_SUCCESS.json` is written (atomically, like every file here) only for
an output in which every path has one row, and is deleted when a new run starts.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
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
# Recorded in `_JOB.json` (`pipeline.provenance`): raise it when SCHEMA or a column's meaning
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


def write_success(output_uri: str, report: dict) -> str:
    """Write `report` as `OUTPUT/_SUCCESS.json`, atomically; returns its URI."""
    uri = storage.join(output_uri, SUCCESS_FILE)
    storage.write_bytes(uri, (json.dumps(report, indent=2) + "\n").encode())
    return uri
