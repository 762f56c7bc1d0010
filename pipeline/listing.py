"""Stream the input URIs of a segmentation job into Ray Data, skipping the inputs already done.

Three kinds of input:
- a folder or `s3://bucket/prefix`, listed recursively (`mrcnn.storage.iter_files`: 1,000 keys per
  S3 page), keeping image files by extension (`mrcnn.images.is_image_path`, any case);
- a `.txt` manifest, one URI per line (blank lines skipped), read as a stream;
- a `.parquet` manifest with a `path` column, read record batch by record batch.
Manifest entries are taken as they are, whatever their extension (a listed file that is not an
image becomes an error row); relative entries are relative to the manifest's folder, so a manifest
means the same thing wherever the job runs, and local paths become absolute. A manifest can name
an input twice; the second mention is dropped (a set of 64-bit path hashes in the listing task,
about 70 bytes per manifest line in that task, none in the driver).

Streaming: `PathDatasource` has a single read task, a generator that yields blocks of
`rows_per_block` paths as each chunk of `FILTER_CHUNK` listed inputs has been checked against the
done set, and the driver never holds the listing. Ray Data gathers those blocks up to the
dataset's target block size (`pipeline.segment.TARGET_MAX_BLOCK_SIZE`, ~15,000 paths) before it
hands them on; the segmentation dataset then cuts them back into batches, one decode task each. Ray
Data runs read tasks as streaming generators and pauses them when the stages downstream fall
behind (backpressure), which keeps memory bounded. One lister is enough: each ListObjectsV2
request returns 1,000 keys, so even a cluster segmenting 1,000 images a second needs one request
a second. `--limit N` keeps the
first N inputs of the listing (before skipping those done), so a re-run of the same command
completes the same set. The read task asks for no CPU, so the long-lived lister never keeps a decode
task from being scheduled, and it is not fused with the decode stage (different resources).

Resume: the read task receives the sorted 64-bit hashes of the paths already in the output
(`pipeline.output.committed_path_hashes`, shared through the object store: 8 bytes per done input)
and drops those inputs.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from mrcnn import storage
from mrcnn.images import is_image_path
from pipeline.output import path_hashes

FOLDER = "folder"
TEXT_MANIFEST = "txt"
PARQUET_MANIFEST = "parquet"
MANIFEST_COLUMN = "path"
# Record batches read from a Parquet manifest; paths are short, so this is a few hundred KB.
MANIFEST_BATCH_ROWS = 4096
# Inputs checked against the done set at once (vectorised lookup), independent of the block size.
FILTER_CHUNK = 1000


class InputError(Exception):
    """An `--input` that cannot be listed: missing folder or manifest, or a manifest without `path`."""


@dataclass(frozen=True)
class InputSpec:
    """What to list: `uri` (a folder, prefix or manifest), its `kind`, and at most `limit` inputs."""

    uri: str
    kind: str
    limit: int | None = None


def check_input(uri: str, limit: int | None = None) -> InputSpec:
    """Classify `uri` and check, cheaply, that it can be listed; raises `InputError` (one line).

    Only a manifest's existence and schema and a local folder's existence are checked here: an S3
    prefix has no existence of its own, and listing it is the job's work, not the driver's.
    """
    lowered = uri.lower()
    try:
        if lowered.endswith(".txt") or lowered.endswith(".parquet"):
            if not storage.exists(uri):
                raise InputError(f"{uri}: manifest not found")
            if lowered.endswith(".txt"):
                return InputSpec(uri, TEXT_MANIFEST, limit)
            filesystem, path = storage.resolve(uri)
            with filesystem.open_input_file(path) as file:
                names = pq.ParquetFile(file).schema_arrow.names
            if MANIFEST_COLUMN not in names:
                raise InputError(
                    f"{uri}: a Parquet manifest needs a {MANIFEST_COLUMN!r} column "
                    f"(it has {', '.join(names) or 'none'})"
                )
            return InputSpec(uri, PARQUET_MANIFEST, limit)
        filesystem, path = storage.resolve(uri)
        if not storage.is_s3(uri) and not os.path.isdir(path):
            raise InputError(f"{uri}: not a folder, a .txt manifest or a .parquet manifest")
        return InputSpec(storage.to_uri(filesystem, path), FOLDER, limit)
    except (storage.StorageError, pa.ArrowException, OSError) as error:
        raise InputError(f"{uri}: cannot read ({' '.join(str(error).split())})") from error


def iter_inputs(spec: InputSpec) -> Iterator[str]:
    """Yield the input URIs of `spec` in listing order, each once, at most `spec.limit` of them."""
    if spec.kind == FOLDER:
        listed = (uri for uri in storage.iter_files(spec.uri) if is_image_path(uri))
    else:
        listed = _dedup(_iter_manifest(spec))
    for count, uri in enumerate(listed):
        if spec.limit is not None and count >= spec.limit:
            return
        yield uri


def _iter_manifest(spec: InputSpec) -> Iterator[str]:
    filesystem, path = storage.resolve(spec.uri)
    base = posixpath.dirname(storage.to_uri(filesystem, path))
    if spec.kind == TEXT_MANIFEST:
        with filesystem.open_input_stream(path) as stream:
            remainder = b""
            while chunk := stream.read(1 << 20):
                lines = (remainder + chunk).split(b"\n")
                remainder = lines.pop()
                yield from _entries((line.decode() for line in lines), base)
            yield from _entries([remainder.decode()], base)
        return
    with filesystem.open_input_file(path) as file:
        manifest = pq.ParquetFile(file)
        for batch in manifest.iter_batches(batch_size=MANIFEST_BATCH_ROWS, columns=[MANIFEST_COLUMN]):
            yield from _entries((entry for entry in batch.column(0).to_pylist() if entry), base)


def _entries(lines, base: str) -> Iterator[str]:
    for line in lines:
        entry = line.strip()
        if entry:
            yield absolute_uri(entry, base)


def absolute_uri(entry: str, base: str) -> str:
    """`entry` as an absolute URI: s3:// kept, `file://` dropped, relative ones joined to `base`."""
    if storage.is_s3(entry):
        return entry
    if entry.startswith("file://"):
        entry = entry[len("file://") :]
    if os.path.isabs(entry):
        return os.path.normpath(entry)
    if storage.is_s3(base):
        return storage.join(base, entry)
    return os.path.normpath(os.path.join(base, entry))


def _dedup(uris: Iterator[str]) -> Iterator[str]:
    seen: set[int] = set()
    for uri in uris:
        key = int(path_hashes([uri])[0])
        if key not in seen:
            seen.add(key)
            yield uri


class PathDatasource(Datasource):
    """The inputs of `spec` not yet done, as blocks of `rows_per_block` rows with one column `path`.

    `done` is an object reference to a sorted `uint64[D]` array of path hashes (or None).
    """

    def __init__(self, spec: InputSpec, rows_per_block: int, done: ray.ObjectRef | None = None):
        super().__init__()
        self._spec = spec
        self._rows_per_block = rows_per_block
        self._done = done

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        spec, rows_per_block, done = self._spec, self._rows_per_block, self._done

        def read() -> Iterator[pa.Table]:
            done_hashes = ray.get(done) if done is not None else np.zeros(0, np.uint64)
            pending: list[str] = []
            for chunk in _chunks(iter_inputs(spec), FILTER_CHUNK):
                pending.extend(_not_done(chunk, done_hashes))
                while len(pending) >= rows_per_block:
                    yield _block(pending[:rows_per_block])
                    pending = pending[rows_per_block:]
            if pending:
                yield _block(pending)

        metadata = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [ReadTask(read, metadata, per_task_row_limit=per_task_row_limit)]


def _chunks(uris: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for uri in uris:
        chunk.append(uri)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _not_done(paths: list[str], done_hashes: np.ndarray) -> list[str]:
    """The paths whose hash is not in the sorted `done_hashes`."""
    if not done_hashes.size:
        return paths
    hashes = path_hashes(paths)
    where = np.minimum(np.searchsorted(done_hashes, hashes), done_hashes.size - 1)
    done = done_hashes[where] == hashes
    return [path for path, is_done in zip(paths, done, strict=True) if not is_done]


def _block(paths: list[str]) -> pa.Table:
    return pa.table({MANIFEST_COLUMN: pa.array(paths, pa.string())})
