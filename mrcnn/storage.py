"""Turn a URI (`s3://bucket/key` or a local path) into a pyarrow filesystem and a path.

Every reader and writer of the project goes through this module, so nothing else special-cases S3.
S3 honours the standard AWS credential chain and `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` (used
by the tests' moto server and by S3-compatible stores such as MinIO). The number of attempts per S3
request is `MRCNN_S3_MAX_ATTEMPTS` (default 10): pyarrow's own default of 3 is too few for bulk jobs
that make millions of requests.

One client per process: building an S3 client costs a credential lookup (on EC2, an
instance-metadata request) and new TLS connections, and a segmentation worker reads thousands of
objects. So each process keeps one `pyarrow.fs.S3FileSystem` (and one boto3 client, for listings)
per region and per S3 environment (the endpoint, region, retry and credential variables, kept as a
digest): every read and write of that process reuses it, and with it the connections it keeps
open. A change of those variables (a test that points `AWS_ENDPOINT_URL` at another server, rotated
keys) gets new clients; a forked child never uses its parent's (the connections would be shared)
and builds its own. Creation is under a lock, so threads share one client.

Regions: on AWS (no custom endpoint) the region of each bucket is looked up once per process
(HeadBucket answers with `x-amz-bucket-region`, whatever the region the request was signed for),
because pyarrow does not follow S3's redirects and EC2 nodes set no `AWS_REGION`. With a custom
endpoint, `AWS_REGION` / `AWS_DEFAULT_REGION` is taken as it is when set (that store is configured
in full), and the bucket's region is looked up otherwise. When no region comes back (a missing
bucket), the configured region or `us-east-1` is used, and asked again next time.

`MRCNN_S3_TRACE=<file>`: every process appends one JSON line to that file per S3 client it builds
(pid, kind, endpoint, region), to check on a live job that clients are not built per object.

It lives in `mrcnn/` rather than `pipeline/` because the weights loader and the COCO reader need it,
and `mrcnn/` may import nothing above itself. It imports no Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import threading
import uuid
from collections.abc import Iterator
from urllib.parse import urlparse

import pyarrow.fs as pafs

from mrcnn.errors import one_line

S3_MAX_ATTEMPTS_ENV = "MRCNN_S3_MAX_ATTEMPTS"
DEFAULT_S3_MAX_ATTEMPTS = 10
S3_TRACE_ENV = "MRCNN_S3_TRACE"
DEFAULT_REGION = "us-east-1"
# What an S3 client is built from: a change of any of these needs a new client.
S3_ENVIRONMENT = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    S3_MAX_ATTEMPTS_ENV,
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_EC2_METADATA_DISABLED",
    "AWS_CA_BUNDLE",
)
# Clients kept per process; the oldest is dropped beyond it (environments rarely change).
MAX_CACHED_CLIENTS = 16


class StorageError(Exception):
    """A URI that cannot be read or written (missing object, bad scheme, no permission)."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


class _Clients:
    """This process's S3 clients and bucket regions, keyed by (environment digest, region/bucket)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.filesystems: dict[tuple[str, str], pafs.S3FileSystem] = {}
        self.boto3: dict[tuple[str, str], object] = {}
        self.regions: dict[tuple[str, str], str] = {}
        self.created = {"pyarrow": 0, "boto3": 0}


_clients = _Clients()
# A forked child's inherited clients: kept alive, never used, so that their destructors do not
# close connections the parent still uses.
_inherited: list[_Clients] = []


def _after_fork_in_child() -> None:
    global _clients
    _inherited.append(_clients)
    _clients = _Clients()


os.register_at_fork(after_in_child=_after_fork_in_child)


def s3_clients_created() -> dict[str, int]:
    """How many S3 clients this process has built: `{"pyarrow": filesystems, "boto3": clients}`."""
    with _clients.lock:
        return dict(_clients.created)


def _environment() -> str:
    text = "\0".join(f"{name}={os.environ.get(name, '')}" for name in S3_ENVIRONMENT)
    return hashlib.sha256(text.encode()).hexdigest()


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _configured_region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def _max_attempts() -> int:
    return int(os.environ.get(S3_MAX_ATTEMPTS_ENV, DEFAULT_S3_MAX_ATTEMPTS))


def _cached(cache: dict, key: tuple[str, str], kind: str, build):
    """`cache[key]`, built by `build()` under the lock the first time (one client for all threads)."""
    with _clients.lock:
        client = cache.get(key)
        if client is None:
            client = cache[key] = build()
            _clients.created[kind] += 1
            if len(cache) > MAX_CACHED_CLIENTS:
                del cache[next(iter(cache))]
            _trace(kind, key[1])
        return client


def _trace(kind: str, region: str) -> None:
    path = os.environ.get(S3_TRACE_ENV)
    if not path:
        return
    line = json.dumps({"pid": os.getpid(), "kind": kind, "endpoint": _endpoint(), "region": region})
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, (line + "\n").encode())  # one write: lines of processes never interleave
    finally:
        os.close(descriptor)


def s3_filesystem(bucket: str | None = None) -> pafs.S3FileSystem:
    """This process's S3 filesystem for `bucket`'s region (the configured region when None)."""
    region = bucket_region(bucket) if bucket else (_configured_region() or DEFAULT_REGION)
    return _cached(_clients.filesystems, (_environment(), region), "pyarrow", lambda: _new_filesystem(region))


def _new_filesystem(region: str) -> pafs.S3FileSystem:
    kwargs: dict = {
        "region": region,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=_max_attempts()),
    }
    endpoint = _endpoint()
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs)


def _boto3_client(region: str):
    """This process's boto3 S3 client for `region` (thread-safe once built, unlike its session)."""

    def build():
        import boto3
        import botocore.config

        config = botocore.config.Config(retries={"max_attempts": _max_attempts(), "mode": "standard"})
        return boto3.session.Session().client(
            "s3", region_name=region, endpoint_url=_endpoint(), config=config
        )

    return _cached(_clients.boto3, (_environment(), region), "boto3", build)


def bucket_region(bucket: str) -> str:
    """The region to sign requests to `bucket` for (see the module docstring), cached per process."""
    configured = _configured_region()
    if configured and _endpoint():
        return configured
    key = (_environment(), bucket)
    with _clients.lock:
        known = _clients.regions.get(key)
    if known:
        return known
    found = _lookup_region(bucket, configured or DEFAULT_REGION)
    if not found:
        return configured or DEFAULT_REGION
    with _clients.lock:
        _clients.regions[key] = found
        if len(_clients.regions) > MAX_CACHED_CLIENTS * 64:
            del _clients.regions[next(iter(_clients.regions))]
    return found


def _lookup_region(bucket: str, signing_region: str) -> str | None:
    """`x-amz-bucket-region` of a HeadBucket; S3 sends it on errors too (403, a wrong region)."""
    import botocore.exceptions

    try:
        response = _boto3_client(signing_region).head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as error:
        response = error.response
    except botocore.exceptions.BotoCoreError:
        return None
    return response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return `(filesystem, path)` for a URI; local paths become absolute."""
    if is_s3(uri):
        path = uri[len("s3://") :].rstrip("/")
        if not path:
            raise StorageError(f"{uri}: an S3 URI needs a bucket")
        return s3_filesystem(path.partition("/")[0]), path
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
        raise StorageError(f"{uri}: cannot read ({one_line(error)})") from error


def read_chunks(uri: str, chunk_bytes: int = 8 << 20) -> Iterator[bytes]:
    """The bytes of `uri` in order, `chunk_bytes` at a time: memory for one chunk, whatever the size."""
    filesystem, path = resolve(uri)
    try:
        with filesystem.open_input_stream(path) as stream:
            while chunk := stream.read(chunk_bytes):
                yield chunk
    except (FileNotFoundError, OSError) as error:
        raise StorageError(f"{uri}: cannot read ({one_line(error)})") from error


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
        raise StorageError(f"{uri}: cannot write ({one_line(error)})") from error


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
    import botocore.exceptions

    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: an S3 URI needs a bucket")
    prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    client = _boto3_client(bucket_region(bucket))
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", ()):
                if not item["Key"].endswith("/"):
                    yield f"s3://{bucket}/{item['Key']}"
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
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
