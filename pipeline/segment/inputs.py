"""What a segmentation job's `--input` names, and the input URIs it stands for, in listing order.

Three kinds of input:
- a folder or `s3://bucket/prefix`, listed recursively (`mrcnn.storage.iter_files`: 1,000 keys per
  S3 page), keeping image files by extension (`mrcnn.images.is_image_path`, any case);
- a `.txt` manifest, one URI per line, or a `.parquet` manifest with a `path` column.
`--limit N` keeps the first N inputs of the listing (before skipping those done), so a re-run of
the same command completes the same set.

Manifests are read as streams (1 MiB of text, or `MANIFEST_BATCH_ROWS` record batches, at a time),
so a manifest of millions of lines costs the reader a chunk of memory, not the whole file. Entries
are taken as they are, whatever their extension (a listed file that is not an image becomes an
error row); blank lines are skipped; relative entries are relative to the manifest's folder, so a
manifest means the same thing wherever the job runs, and local paths become absolute. A manifest
can name an input twice; `dedup` drops the second mention (a set of 64-bit path hashes, about 70
bytes per manifest line in the listing task, none in the driver).
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from mrcnn import storage
from mrcnn.errors import UserError, one_line
from mrcnn.images import is_image_path
from pipeline.segment.output import path_hashes

FOLDER = "folder"
TEXT_MANIFEST = "txt"
PARQUET_MANIFEST = "parquet"
MANIFEST_COLUMN = "path"
# Record batches read from a Parquet manifest; paths are short, so this is a few hundred KB.
MANIFEST_BATCH_ROWS = 4096


class InputError(UserError):
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
        raise InputError(f"{uri}: cannot read ({one_line(error)})") from error


def iter_inputs(spec: InputSpec) -> Iterator[str]:
    """Yield the input URIs of `spec` in listing order, each once, at most `spec.limit` of them."""
    if spec.kind == FOLDER:
        listed = (uri for uri in storage.iter_files(spec.uri) if is_image_path(uri))
    else:
        listed = dedup(iter_manifest(spec.uri, spec.kind))
    for count, uri in enumerate(listed):
        if spec.limit is not None and count >= spec.limit:
            return
        yield uri


def iter_manifest(uri: str, kind: str) -> Iterator[str]:
    """The absolute URIs a manifest of `kind` (`TEXT_MANIFEST` or `PARQUET_MANIFEST`) lists, in order."""
    filesystem, path = storage.resolve(uri)
    base = posixpath.dirname(storage.to_uri(filesystem, path))
    if kind == TEXT_MANIFEST:
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


def dedup(uris: Iterator[str]) -> Iterator[str]:
    """`uris` without their repeats, in order (by 64-bit path hash)."""
    seen: set[int] = set()
    for uri in uris:
        key = int(path_hashes([uri])[0])
        if key not in seen:
            seen.add(key)
            yield uri
