"""Turn a URI (`s3://bucket/key` or a local path) into a pyarrow filesystem and a path, and read,
write, list and delete through it.

Every reader and writer of the project goes through this module, so nothing else special-cases S3.
Its S3 clients (one per process and region, each bucket's region looked up once) are
`mrcnn.s3_clients`; the retries that carry S3 requests through throttling, and the filesystem an
`s3://` URI resolves to, are `mrcnn.s3_retry`. The number of attempts per S3 request is
`MRCNN_S3_MAX_ATTEMPTS` (default 10): pyarrow's own default of 3 is too few for bulk jobs that make
millions of requests.

Whole objects go in one request each: `read_bytes` is one GET without a Range, `write_bytes` one
PUT (atomic on S3; on local disk a temporary file renamed into place).

It lives in `mrcnn/` rather than `pipeline/` because the weights loader and the COCO reader need it,
and `mrcnn/` may import nothing above itself. It imports no Ray.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Iterator

import pyarrow.fs as pafs

from mrcnn import s3_clients, s3_retry
from mrcnn.errors import RunError, UserError, one_line

# A single PUT holds at most 5 GiB; larger objects go up in parts.
MAX_SINGLE_PUT_BYTES = 5 << 30
_MISSING = {
    FileNotFoundError: "not found",
    IsADirectoryError: "a folder, not a file",
    NotADirectoryError: "not found",
    PermissionError: "permission denied",
}


class StorageError(RunError):
    """A URI that cannot be read or written: a store that keeps failing after its retries (a
    re-run resumes), or, as the subclasses below, a URI the user got wrong."""


class BadUri(StorageError, UserError):
    """A URI this project cannot use: an unsupported scheme, an S3 URI without a bucket."""


class ObjectMissing(StorageError, UserError):
    """An object that is not there to read: missing, a folder, or forbidden; `reason` says which."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return `(filesystem, path)` for a URI; local paths become absolute.

    An S3 URI gets this process's retrying filesystem for its bucket's region (`mrcnn.s3_retry`).
    """
    if is_s3(uri):
        path = uri[len("s3://") :].rstrip("/")
        if not path:
            raise BadUri(f"{uri}: an S3 URI needs a bucket")
        return s3_retry.filesystem(_region_of(path)), path
    if "://" in uri and not uri.startswith("file://"):
        raise BadUri(f"{uri}: unsupported scheme (use a local path or s3://)")
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def _region_of(path: str) -> str:
    """The region of the bucket of `bucket/key`."""
    return s3_clients.bucket_region(path.partition("/")[0])


def to_uri(filesystem: pafs.FileSystem, path: str) -> str:
    """The inverse of `resolve`: `s3://bucket/key` for S3 paths, the absolute path otherwise."""
    if filesystem.type_name in ("s3", "py::s3"):  # pyarrow's own, or `mrcnn.s3_retry.S3Files`
        return f"s3://{path}"
    return path


def join(base: str, *parts: str) -> str:
    """Join URI parts with `/` (also for local paths, which are POSIX here)."""
    return posixpath.join(base.rstrip("/") if base != "/" else base, *parts)


def exists(uri: str) -> bool:
    filesystem, path = resolve(uri)
    try:
        return filesystem.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as error:
        raise StorageError(f"{uri}: cannot read ({one_line(error)})") from error


def read_bytes(uri: str) -> bytes:
    """The whole file or object at `uri`; `ObjectMissing` when it is not there to read."""
    filesystem, path = resolve(uri)
    try:
        if is_s3(uri):
            return s3_retry.get_object(_region_of(path), path)
        with open(path, "rb") as file:
            return file.read()
    except tuple(_MISSING) as error:
        reason = next(text for kind, text in _MISSING.items() if isinstance(error, kind))
        raise ObjectMissing(f"{uri}: cannot read ({reason})", reason) from error
    except UserError:
        raise
    except Exception as error:  # OSError, or botocore's errors after the retries
        raise StorageError(f"{uri}: cannot read ({one_line(error)})") from error


def read_chunks(uri: str, chunk_bytes: int = 8 << 20) -> Iterator[bytes]:
    """The bytes of `uri` in order, `chunk_bytes` at a time: memory for one chunk, whatever the size."""
    filesystem, path = resolve(uri)
    try:
        with filesystem.open_input_stream(path) as stream:
            while chunk := stream.read(chunk_bytes):
                yield chunk
    except OSError as error:
        raise StorageError(f"{uri}: cannot read ({one_line(error)})") from error


def write_bytes(uri: str, data: bytes, content_type: str | None = None) -> None:
    """Write `data` so that readers see either nothing or the whole object.

    S3: one PUT, which is atomic (a multipart upload, as atomic, beyond `MAX_SINGLE_PUT_BYTES`),
    served with `content_type` when given (a bucket serving a web page needs `text/html`, SVGs
    `image/svg+xml`). Local disk: a hidden temporary file beside the target, renamed into place
    (atomic on POSIX); `content_type` is ignored.
    """
    filesystem, path = resolve(uri)
    try:
        if is_s3(uri) and len(data) <= MAX_SINGLE_PUT_BYTES:
            s3_retry.put_object(_region_of(path), path, data, content_type)
            return
        if is_s3(uri):
            metadata = {"Content-Type": content_type} if content_type else None
            with filesystem.open_output_stream(path, metadata=metadata) as stream:
                stream.write(data)
            return
        parent = posixpath.dirname(path)
        filesystem.create_dir(parent, recursive=True)
        temporary = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
        with open(temporary, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except UserError:
        raise
    except Exception as error:  # OSError, or botocore's errors after the retries
        raise StorageError(f"{uri}: cannot write ({one_line(error)})") from error


def iter_files(uri: str) -> Iterator[str]:
    """Yield the URI of every file under the folder or prefix `uri`, recursively, as it is listed.

    Nothing is collected first, so a prefix of millions of objects costs memory for one page
    (S3: 1,000 keys per `ListObjectsV2` page, each page retried on its own; pyarrow's recursive
    `get_file_info` would return the whole listing at once). S3 keys come in lexicographic
    order; local entries are sorted per directory, so the order is stable from run to run.
    Local symbolic links to directories are not followed (no cycles). A missing local folder
    raises `StorageError`; a missing S3 prefix lists nothing, as S3 has no folders.
    """
    if is_s3(uri):
        yield from _iter_s3_files(uri)
        return
    _, root = resolve(uri)
    if not os.path.isdir(root):
        raise ObjectMissing(f"{uri}: not a folder", "not a folder")
    yield from _iter_local_files(root)


def _iter_local_files(folder: str) -> Iterator[str]:
    with os.scandir(folder) as scan:
        entries = sorted(scan, key=lambda entry: entry.name)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _iter_local_files(entry.path)
        elif entry.is_file():
            yield entry.path


def _iter_s3_files(uri: str) -> Iterator[str]:
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise BadUri(f"{uri}: an S3 URI needs a bucket")
    prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    try:
        for key in s3_retry.list_keys(_region_of(bucket), bucket, prefix):
            if not key.endswith("/"):
                yield f"s3://{bucket}/{key}"
    except (StorageError, UserError):
        raise
    except Exception as error:  # botocore's errors after the retries
        raise StorageError(f"{uri}: cannot list ({one_line(error)})") from error


def delete(uri: str) -> None:
    """Delete the file or object `uri`; nothing happens when it does not exist."""
    filesystem, path = resolve(uri)
    try:
        filesystem.delete_file(path)
    except FileNotFoundError:
        return
    except OSError as error:
        raise StorageError(f"{uri}: cannot delete ({one_line(error)})") from error
