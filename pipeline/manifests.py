"""Read a manifest of input URIs: a `.txt` file (one URI per line) or a `.parquet` file (`path`).

Both are read as streams (1 MiB of text, or `MANIFEST_BATCH_ROWS` record batches, at a time), so a
manifest of millions of lines costs the reader a chunk of memory, not the whole file. Entries are
taken as they are, whatever their extension (a listed file that is not an image becomes an error
row); blank lines are skipped; relative entries are relative to the manifest's folder, so a
manifest means the same thing wherever the job runs, and local paths become absolute. A manifest
can name an input twice; `dedup` drops the second mention (a set of 64-bit path hashes, about 70
bytes per manifest line in the listing task, none in the driver).
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator

import pyarrow.parquet as pq

from mrcnn import storage
from pipeline.done_set import path_hashes

TEXT_MANIFEST = "txt"
PARQUET_MANIFEST = "parquet"
MANIFEST_COLUMN = "path"
# Record batches read from a Parquet manifest; paths are short, so this is a few hundred KB.
MANIFEST_BATCH_ROWS = 4096


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
