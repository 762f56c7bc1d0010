"""Turn a URI (`s3://bucket/key` or a local path) into a pyarrow filesystem and a path.

Every reader and writer of the project goes through this module, so nothing else special-cases S3.
S3 honours the standard AWS credential chain and `AWS_ENDPOINT_URL` (used by the tests' moto server
and by S3-compatible stores such as MinIO). The number of attempts per S3 request is
`MRCNN_S3_MAX_ATTEMPTS` (default 10): pyarrow's own default of 3 is too few for bulk jobs that make
millions of requests.

It lives in `mrcnn/` rather than `pipeline/` because the weights loader and the COCO reader need it,
and `mrcnn/` may import nothing above itself. It imports no Ray.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from urllib.parse import urlparse

import pyarrow.fs as pafs

S3_MAX_ATTEMPTS_ENV = "MRCNN_S3_MAX_ATTEMPTS"
DEFAULT_S3_MAX_ATTEMPTS = 10


class StorageError(Exception):
    """A URI that cannot be read or written (missing object, bad scheme, no permission)."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem configured from the environment (endpoint, region, retries)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict = {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(
            max_attempts=int(os.environ.get(S3_MAX_ATTEMPTS_ENV, DEFAULT_S3_MAX_ATTEMPTS))
        ),
    }
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return `(filesystem, path)` for a URI; local paths become absolute."""
    if is_s3(uri):
        path = uri[len("s3://") :].rstrip("/")
        if not path:
            raise StorageError(f"{uri}: an S3 URI needs a bucket")
        return s3_filesystem(), path
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"{uri}: unsupported scheme (use a local path or s3://)")
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def to_uri(filesystem: pafs.FileSystem, path: str) -> str:
    """The inverse of `resolve`: `s3://bucket/key` for S3 paths, the absolute path otherwise."""
    if isinstance(filesystem, pafs.S3FileSystem):
        return f"s3://{path}"
    return path


def join(base: str, *parts: str) -> str:
    """Join URI parts with `/` (also for local paths, which are POSIX here)."""
    return posixpath.join(base.rstrip("/") if base != "/" else base, *parts)


def exists(uri: str) -> bool:
    filesystem, path = resolve(uri)
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    filesystem, path = resolve(uri)
    try:
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except (FileNotFoundError, OSError) as error:
        raise StorageError(f"{uri}: cannot read ({_one_line(error)})") from error


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` so that readers see either nothing or the whole object.

    S3 PUTs are atomic. On local disk we write a hidden temporary file beside the target and
    rename it into place, which is atomic on POSIX filesystems.
    """
    filesystem, path = resolve(uri)
    parent = posixpath.dirname(path)
    try:
        if isinstance(filesystem, pafs.LocalFileSystem):
            filesystem.create_dir(parent, recursive=True)
            temporary = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
            with filesystem.open_output_stream(temporary) as stream:
                stream.write(data)
            os.replace(temporary, path)
        else:
            with filesystem.open_output_stream(path) as stream:
                stream.write(data)
    except OSError as error:
        raise StorageError(f"{uri}: cannot write ({_one_line(error)})") from error


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
