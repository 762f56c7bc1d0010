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
from collections.abc import Iterator
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


def iter_files(uri: str) -> Iterator[str]:
    """Yield the URI of every file under the folder or prefix `uri`, recursively, as it is listed.

    Nothing is collected first, so a prefix of millions of objects costs memory for one page
    (S3: 1,000 keys per `ListObjectsV2` page through boto3's paginator; pyarrow's recursive
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
        raise StorageError(f"{uri}: not a folder")
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
    import boto3
    import botocore.config
    import botocore.exceptions

    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: an S3 URI needs a bucket")
    prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    attempts = int(os.environ.get(S3_MAX_ATTEMPTS_ENV, DEFAULT_S3_MAX_ATTEMPTS))
    # boto3 reads AWS_ENDPOINT_URL(_S3), the region and the credential chain from the
    # environment itself, as pyarrow does in `s3_filesystem`.
    client = boto3.client(
        "s3", config=botocore.config.Config(retries={"max_attempts": attempts, "mode": "standard"})
    )
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", ()):
                if not item["Key"].endswith("/"):
                    yield f"s3://{bucket}/{item['Key']}"
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        raise StorageError(f"{uri}: cannot list ({_one_line(error)})") from error


def delete(uri: str) -> None:
    """Delete the file or object `uri`; nothing happens when it does not exist."""
    filesystem, path = resolve(uri)
    try:
        filesystem.delete_file(path)
    except FileNotFoundError:
        return
    except OSError as error:
        raise StorageError(f"{uri}: cannot delete ({_one_line(error)})") from error
