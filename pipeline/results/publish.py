"""Writing the files of a report or of overlays under an `--output` folder, local or `s3://`, so
that a bucket can serve them as they are: each file goes up in one `mrcnn.storage.write_bytes`
with the `Content-Type` its extension calls for (`CONTENT_TYPES`), and pages link to each other
by relative paths only.
"""

from __future__ import annotations

import posixpath
import uuid

from mrcnn import storage
from mrcnn.errors import UserError, one_line

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".txt": "text/plain; charset=utf-8",
}


class OutputNotWritable(UserError):
    """An `--output` that cannot be written (checked before any work)."""


def check_writable(output_uri: str) -> None:
    """Write and delete a small hidden file under `output_uri`; `OutputNotWritable` if that fails."""
    probe = storage.join(output_uri, f".write-check-{uuid.uuid4().hex}")
    try:
        storage.write_bytes(probe, b"")
        storage.delete(probe)
    except (storage.StorageError, UserError) as error:
        raise OutputNotWritable(f"--output {output_uri}: cannot write there ({one_line(error)})") from error


def write_file(output_uri: str, name: str, data: bytes) -> str:
    """Write `data` as `OUTPUT/name` (a relative path) with its content type; returns its URI."""
    uri = storage.join(output_uri, name)
    storage.write_bytes(uri, data, CONTENT_TYPES.get(posixpath.splitext(name)[1].lower()))
    return uri
