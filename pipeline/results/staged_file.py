"""A result file too large to hold in memory: written into a local file, published whole.

`staged(uri)` checks first that `uri` can be written (not a folder; a probe object written and
deleted beside it), so that a long export fails in its first second rather than at its end, then
gives a local path to write. When the block ends without an error the file is published: on
local disk it was written as a hidden file beside the target and is renamed into place (atomic on
POSIX); on S3 it is uploaded through pyarrow's output stream (a multipart upload for a large
file), and the object appears when the upload completes. Readers see nothing or the whole file;
on an error the local file is removed and nothing is published.
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


class OutputNotWritable(UserError):
    """An output that is a folder or cannot be written there; the message is one line."""


@contextlib.contextmanager
def staged(uri: str) -> Iterator[tuple[str, str]]:
    """`(local file to write, a temporary local folder for helpers)`, published to `uri` whole
    when the block ends without an error. Raises `OutputNotWritable` before the block runs, and
    `mrcnn.storage.StorageError` when the publishing fails."""
    filesystem, path = storage.resolve(uri)
    check_writable(uri, filesystem, path)
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


def check_writable(uri: str, filesystem: pafs.FileSystem, path: str) -> None:
    """Refuse an output that is a folder or that cannot be written there (`OutputNotWritable`)."""
    probe = storage.join(
        posixpath.dirname(uri.rstrip("/")), f".{posixpath.basename(path)}.{uuid.uuid4().hex}.probe"
    )
    try:
        if filesystem.get_file_info(path).type == pafs.FileType.Directory:
            raise OutputNotWritable(f"{uri}: a folder; name the file to write")
        storage.write_bytes(probe, b"")
        storage.delete(probe)
    except (OSError, storage.StorageError) as error:
        cause = error.__cause__ if isinstance(error, storage.StorageError) and error.__cause__ else error
        raise OutputNotWritable(f"{uri}: cannot write there ({one_line(cause)})") from error
