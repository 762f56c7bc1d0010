"""Writing what the results tools make, local or `s3://`, checked writable before any work.

- A report's or overlays' files under an `--output` folder (`write_file`), so that a bucket can
  serve them as they are: each goes up in one `mrcnn.storage.write_bytes` with the
  `Content-Type` its extension calls for (`CONTENT_TYPES`); pages link by relative paths only.
- One file too large to hold in memory, an export (`staged`): written into a local file and
  published whole when the block ends without an error. On local disk it was written as a hidden
  file beside the target and is renamed into place (atomic on POSIX); on S3 it is uploaded through
  pyarrow's output stream (a multipart upload for a large file) and the object appears when the
  upload completes. Readers see nothing or the whole file; on an error nothing is published.

Both check first, with a probe object written and deleted, that the output can be written, so that
a long run fails in its first second rather than at its end (`OutputNotWritable`, one line).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator

import pyarrow.fs as pafs

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
    """An `--output` that cannot be written, or a folder where a file is asked (before any work)."""


def check_writable(output_uri: str) -> None:
    """Write and delete a small hidden file under the folder `output_uri`; `OutputNotWritable` if
    that fails."""
    try:
        _probe(output_uri, ".write-check")
    except (storage.StorageError, UserError) as error:
        raise OutputNotWritable(f"--output {output_uri}: cannot write there ({one_line(error)})") from error


def write_file(output_uri: str, name: str, data: bytes) -> str:
    """Write `data` as `OUTPUT/name` (a relative path) with its content type; returns its URI."""
    uri = storage.join(output_uri, name)
    storage.write_bytes(uri, data, CONTENT_TYPES.get(posixpath.splitext(name)[1].lower()))
    return uri


@contextlib.contextmanager
def staged(uri: str) -> Iterator[tuple[str, str]]:
    """`(local file to write, a temporary local folder for helpers)`, published to `uri` whole
    when the block ends without an error. Raises `OutputNotWritable` before the block runs, and
    `mrcnn.storage.StorageError` when the publishing fails."""
    filesystem, path = storage.resolve(uri)
    check_file_writable(uri, filesystem, path)
    name = posixpath.basename(path)
    with tempfile.TemporaryDirectory(prefix="staged-") as folder:
        if storage.is_s3(uri):
            local = os.path.join(folder, name)
        else:
            local = posixpath.join(posixpath.dirname(path), f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            yield local, folder
            if storage.is_s3(uri):
                with filesystem.open_output_stream(path) as stream, open(local, "rb") as source:
                    stream.upload(source)
            else:
                os.replace(local, path)
        except OSError as error:
            raise storage.StorageError(f"{uri}: cannot write ({one_line(error)})") from error
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(local)


def check_file_writable(uri: str, filesystem: pafs.FileSystem, path: str) -> None:
    """Refuse a file output that is a folder or that cannot be written there (`OutputNotWritable`)."""
    try:
        if filesystem.get_file_info(path).type == pafs.FileType.Directory:
            raise OutputNotWritable(f"{uri}: a folder; name the file to write")
        _probe(posixpath.dirname(uri.rstrip("/")), f".{posixpath.basename(path)}")
    except (OSError, storage.StorageError) as error:
        cause = error.__cause__ if isinstance(error, storage.StorageError) and error.__cause__ else error
        raise OutputNotWritable(f"{uri}: cannot write there ({one_line(cause)})") from error


def _probe(folder_uri: str, stem: str) -> None:
    """Write and delete an empty hidden object under `folder_uri`."""
    probe = storage.join(folder_uri, f"{stem}.{uuid.uuid4().hex}.probe")
    storage.write_bytes(probe, b"")
    storage.delete(probe)
