"""This process's S3 clients: one pyarrow `S3FileSystem` and one boto3 client per region, and the
region of each bucket.

One client per process: building an S3 client costs a credential lookup (on EC2, an
instance-metadata request) and new TLS connections, and a segmentation worker reads thousands of
objects. So each process keeps one native filesystem and one boto3 client per region and per S3
environment (the endpoint, region, retry and credential variables, kept as a digest): every read
and write of that process reuses them, and with them the connections they keep open. A change of
those variables (a test that points `AWS_ENDPOINT_URL` at another server, rotated keys) gets new
clients; a forked child never uses its parent's (the connections would be shared) and builds its
own. Creation is under a lock, so threads share one client.

S3 honours the standard AWS credential chain and `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` (used
by the tests' moto server and by S3-compatible stores such as MinIO).

Regions: on AWS (no custom endpoint) the region of each bucket is looked up once per process
(HeadBucket answers with `x-amz-bucket-region`, whatever the region the request was signed for),
because pyarrow does not follow S3's redirects and EC2 nodes set no `AWS_REGION`. With a custom
endpoint, `AWS_REGION` / `AWS_DEFAULT_REGION` is taken as it is when set (that store is configured
in full), and the bucket's region is looked up otherwise. When no region comes back (a missing
bucket), the configured region or `us-east-1` is used, and asked again next time.

Retries: the native filesystem's AWS SDK retries what it recognises up to `MRCNN_S3_MAX_ATTEMPTS`
times per request; the boto3 client retries nothing itself: `call` retries each request made with
it, by the same bound, with exponential backoff and full jitter (AWS's recommendation), whatever
`is_transient` says means "later": throttling, 5xx, dropped connections, and the one error the SDK
misreports (`mrcnn.s3_retry` says which).

`MRCNN_S3_TRACE=<file>`: every process appends one JSON line to that file per S3 client it builds
(pid, kind, endpoint, region) and per request it retries (kind "retry"), to check on a live job
that clients are not built per object and to count the retries a throttled job made.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

from mrcnn.errors import UserError

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
T = TypeVar("T")


class S3SettingError(UserError):
    """An S3 setting of the environment that is not valid (one line, naming the variable)."""


class _Clients:
    """This process's S3 clients and bucket regions, keyed by (environment digest, region/bucket)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.filesystems: dict[tuple[str, str], pafs.S3FileSystem] = {}
        self.boto3: dict[tuple[str, str], object] = {}
        self.wrappers: dict[tuple[str, str], object] = {}
        self.regions: dict[tuple[str, str], str] = {}


_clients = _Clients()
# A forked child's inherited clients: kept alive, never used, so that their destructors do not
# close connections the parent still uses.
_inherited: list[_Clients] = []


def _after_fork_in_child() -> None:
    global _clients
    _inherited.append(_clients)
    _clients = _Clients()


os.register_at_fork(after_in_child=_after_fork_in_child)


def max_attempts() -> int:
    """`MRCNN_S3_MAX_ATTEMPTS` (default 10): attempts per S3 request, the first one included."""
    text = os.environ.get(S3_MAX_ATTEMPTS_ENV, "").strip()
    if not text:
        return DEFAULT_S3_MAX_ATTEMPTS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise S3SettingError(f"{S3_MAX_ATTEMPTS_ENV} must be a whole number of at least 1, got {text!r}")
    return value


def endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def configured_region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def trace(kind: str, **fields) -> None:
    """Append one line to the `MRCNN_S3_TRACE` file, if set (one write: lines never interleave)."""
    path = os.environ.get(S3_TRACE_ENV)
    if not path:
        return
    line = json.dumps({"pid": os.getpid(), "kind": kind, "endpoint": endpoint(), **fields})
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, (line + "\n").encode())
    finally:
        os.close(descriptor)


# Backoff before attempt n+1: uniform in [0, min(CAP, BASE * 2^(n-1))] seconds ("full jitter").
BACKOFF_BASE_S = 0.1
BACKOFF_CAP_S = 20.0
# What the AWS SDK reports, as not retryable, when an error body overflowed a ranged read's buffer.
SDK_MISREPORTED_THROTTLE = "Failed to flush response stream"
# S3's answers that mean "later", by error code and by HTTP status.
TRANSIENT_CODES = frozenset(
    {
        "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
        "RequestTimeout", "InternalError", "ServiceUnavailable", "503", "500", "502", "504",
    }
)  # fmt: skip
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})

def is_transient(error: BaseException) -> bool:
    """Whether `error` of an S3 request means "try again later" (see the module docstring)."""
    import botocore.exceptions

    if isinstance(error, botocore.exceptions.ClientError):
        details = error.response.get("Error", {})
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return details.get("Code") in TRANSIENT_CODES or status in TRANSIENT_STATUSES
    if isinstance(
        error,
        botocore.exceptions.HTTPClientError
        | botocore.exceptions.ConnectionError
        | botocore.exceptions.ResponseStreamingError
        | botocore.exceptions.IncompleteReadError,
    ):
        return True
    # The SDK inside pyarrow retried everything else it could already.
    return isinstance(error, OSError) and SDK_MISREPORTED_THROTTLE in str(error)


def backoff_s(attempt: int) -> float:
    """Seconds to wait after failed attempt `attempt` (1-based) before the next one."""
    return random.uniform(0.0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1)))


def call(operation: Callable[[], T], uri: str) -> T:
    """`operation()` (one S3 request on `uri`), retried while it fails transiently, at most
    `MRCNN_S3_MAX_ATTEMPTS` attempts; the last error is raised as it is."""
    attempts = max_attempts()
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except Exception as error:
            if attempt == attempts or not is_transient(error):
                raise
            trace("retry", uri=uri, attempt=attempt, error=type(error).__name__)
            time.sleep(backoff_s(attempt))
    raise AssertionError("unreachable")


def _environment() -> str:
    text = "\0".join(f"{name}={os.environ.get(name, '')}" for name in S3_ENVIRONMENT)
    return hashlib.sha256(text.encode()).hexdigest()


def _cached(cache: dict, region: str, kind: str, build: Callable[[], object]):
    """`cache[(environment, region)]`, built by `build()` under the lock the first time (one client
    for all threads)."""
    key = (_environment(), region)
    with _clients.lock:
        client = cache.get(key)
        if client is None:
            client = cache[key] = build()
            if len(cache) > MAX_CACHED_CLIENTS:
                del cache[next(iter(cache))]
            trace(kind, region=region)
        return client


def native_filesystem(region: str) -> pafs.S3FileSystem:
    """This process's pyarrow `S3FileSystem` for `region` (the AWS SDK retrying each request)."""

    def build() -> pafs.S3FileSystem:
        kwargs: dict = {
            "region": region,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts()),
        }
        custom = endpoint()
        if custom:
            parsed = urlparse(custom)
            kwargs["endpoint_override"] = parsed.netloc or parsed.path
            kwargs["scheme"] = parsed.scheme or "https"
        return pafs.S3FileSystem(**kwargs)

    return _cached(_clients.filesystems, region, "pyarrow", build)


def cached_wrapper(region: str, build: Callable[[], object]):
    """This process's filesystem wrapping `native_filesystem(region)`, built once per environment."""
    key = (_environment(), region)
    with _clients.lock:
        wrapper = _clients.wrappers.get(key)
        if wrapper is None:
            wrapper = _clients.wrappers[key] = build()
            if len(_clients.wrappers) > MAX_CACHED_CLIENTS:
                del _clients.wrappers[next(iter(_clients.wrappers))]
        return wrapper


def boto3_client(region: str):
    """This process's boto3 S3 client for `region` (thread-safe once built, unlike its session).

    botocore's own retries are off: `call` retries every request made with it.
    """

    def build():
        import boto3
        import botocore.config

        config = botocore.config.Config(retries={"total_max_attempts": 1, "mode": "standard"})
        session = boto3.session.Session()
        return session.client("s3", region_name=region, endpoint_url=endpoint(), config=config)

    return _cached(_clients.boto3, region, "boto3", build)


def bucket_region(bucket: str) -> str:
    """The region to sign requests to `bucket` for (see the module docstring), cached per process."""
    configured = configured_region()
    if configured and endpoint():
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

    client = boto3_client(signing_region)
    try:
        response = call(lambda: client.head_bucket(Bucket=bucket), f"s3://{bucket}")
    except botocore.exceptions.ClientError as error:
        response = error.response
    except botocore.exceptions.BotoCoreError:
        return None
    return response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")
