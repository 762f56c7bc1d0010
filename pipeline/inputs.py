"""What a segmentation job's `--input` names, and the input URIs it stands for, in listing order.

Three kinds of input:
- a folder or `s3://bucket/prefix`, listed recursively (`mrcnn.storage.iter_files`: 1,000 keys per
  S3 page), keeping image files by extension (`mrcnn.images.is_image_path`, any case);
- a `.txt` manifest, one URI per line, or a `.parquet` manifest with a `path` column
  (`pipeline.manifests`).
`--limit N` keeps the first N inputs of the listing (before skipping those done), so a re-run of
the same command completes the same set.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from mrcnn import storage
from mrcnn.images import is_image_path
from pipeline.manifests import MANIFEST_COLUMN, PARQUET_MANIFEST, TEXT_MANIFEST, dedup, iter_manifest

FOLDER = "folder"


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
        listed = dedup(iter_manifest(spec.uri, spec.kind))
    for count, uri in enumerate(listed):
        if spec.limit is not None and count >= spec.limit:
            return
        yield uri
