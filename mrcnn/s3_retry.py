"""S3 reads and writes that ride through throttling: the filesystem every `s3://` path resolves
to, whole-object GETs and PUTs, and listing page by page.

At millions of objects S3 throttles (`503 SlowDown`, 429) and drops connections. Every S3 request
of the project is retried with exponential backoff and full jitter, at most
`MRCNN_S3_MAX_ATTEMPTS` attempts per request (`mrcnn.s3_clients.call`); only what still fails
after that fails the run, with one line, and a re-run resumes.

- The AWS SDK inside pyarrow retries what it recognises (503, 429, 5xx, resets) itself, per
  request (`AwsStandardS3RetryStrategy`).
- It misreports one: pyarrow hands the SDK a buffer sized exactly like the byte range of a read,
  the SDK writes the body of every response into it, and a `SlowDown` document of a few hundred
  bytes overflows the buffer of a small range (a Parquet footer length, the column chunk of an
  all-null column): curl aborts, and the SDK reports a non-retryable `INTERNAL_FAILURE ... Failed
  to flush response stream` instead of the 503 (apache/doris PRs 61636 and 66557 met it too). So
  no read asks S3 for a small range: objects up to `WHOLE_OBJECT_BYTES` are read whole, with one
  GET without a `Range` (boto3), and a read of fewer than `MIN_RANGE_BYTES` of a larger object
  fetches a window of that many bytes around it, which any error document fits; the error, should
  it come anyway, is retried per read (`mrcnn.s3_clients.is_transient` knows it).
- boto3 (whole-object GETs and PUTs, listing pages, the region lookup) retries nothing itself
  (botocore's standard mode stops retrying once its client-wide retry quota runs dry, which a long
  job under throttling reaches; and it never retries the read of a response body):
  `mrcnn.s3_clients.call` retries its throttling, 5xx and connection errors, the body's read
  included.

`S3Files` is the pyarrow filesystem (a `PyFileSystem` handler) that `mrcnn.storage.resolve` gives
for S3: everything, pyarrow's Parquet readers and Ray Train's checkpoints included, reads and
writes S3 through it, and so through the rules above. It wraps this process's one native
`S3FileSystem` (`mrcnn.s3_clients`); writes and metadata go to it directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

from mrcnn import s3_clients
from mrcnn.s3_clients import call

T = TypeVar("T")

# Objects up to this size are read whole, in one GET without a Range; a Parquet part of a few
# hundred rows and every image, JSON and marker file of a job are below it.
WHOLE_OBJECT_BYTES = 8 << 20
# No ranged GET of a larger object asks for fewer bytes than this.
MIN_RANGE_BYTES = 64 << 10
def split(path: str) -> tuple[str, str]:
    """`bucket/key` -> (bucket, key)."""
    bucket, _, key = path.partition("/")
    return bucket, key


def get_object(region: str, path: str) -> bytes:
    """The whole object at `bucket/key`, one GET without a Range, body included in the retries.

    Raises `FileNotFoundError` / `PermissionError` for a missing or forbidden object (as pyarrow
    does) and botocore's error when the store keeps failing.
    """
    import botocore.exceptions

    bucket, key = split(path)
    client = s3_clients.boto3_client(region)

    def get() -> bytes:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()

    try:
        return call(get, f"s3://{path}")
    except botocore.exceptions.ClientError as error:
        raise _as_os_error(error, path) from error


def put_object(region: str, path: str, data: bytes, content_type: str | None = None) -> None:
    """Write `data` as the object `bucket/key` in one PUT (atomic: readers see all or nothing);
    `content_type` is the `Content-Type` S3 serves it with (S3's default: binary/octet-stream)."""
    import botocore.exceptions

    bucket, key = split(path)
    client = s3_clients.boto3_client(region)
    extra = {"ContentType": content_type} if content_type else {}
    try:
        call(lambda: client.put_object(Bucket=bucket, Key=key, Body=data, **extra), f"s3://{path}")
    except botocore.exceptions.ClientError as error:
        raise _as_os_error(error, path) from error


def list_keys(region: str, bucket: str, prefix: str) -> Iterator[str]:
    """Every key under `prefix` in `bucket`, one ListObjectsV2 page (1,000 keys) at a time, each
    page retried on its own (a failure never restarts the listing)."""
    client = s3_clients.boto3_client(region)
    token: str | None = None
    while True:
        arguments = {"Bucket": bucket, "Prefix": prefix}
        if token:
            arguments["ContinuationToken"] = token
        page = call(lambda arguments=arguments: client.list_objects_v2(**arguments), f"s3://{bucket}/{prefix}")
        for item in page.get("Contents", ()):
            yield item["Key"]
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return


def _as_os_error(error, path: str) -> OSError:
    """botocore's error for `path` as the `OSError` pyarrow would raise."""
    code = error.response.get("Error", {}).get("Code")
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    message = f"s3://{path}: {code or status}: {error.response.get('Error', {}).get('Message', '')}".strip()
    if code in ("NoSuchKey", "NoSuchBucket", "404") or status == 404:
        return FileNotFoundError(message)
    if code in ("AccessDenied", "403") or status == 403:
        return PermissionError(message)
    return OSError(message)


class _WindowedReader:
    """A seekable read-only file over a large S3 object whose reads never ask S3 for fewer than
    `MIN_RANGE_BYTES` (see the module docstring); served to pyarrow through `pa.PythonFile`."""

    def __init__(self, native: pafs.S3FileSystem, path: str, size: int) -> None:
        self._native, self._path, self._size = native, path, size
        self._file = None
        self._position = 0
        self._window_start, self._window = 0, b""
        self.closed = False

    def _read_at(self, offset: int, count: int) -> bytes:
        def read() -> bytes:
            if self._file is None:
                self._file = self._native.open_input_file(self._path)
            try:
                return self._file.read_at(count, offset)
            except OSError:
                self._file = None  # its stream may be broken: reopen for the next attempt
                raise

        return call(read, f"s3://{self._path}")

    def read(self, count: int = -1) -> bytes:
        end = self._size if count is None or count < 0 else min(self._size, self._position + count)
        start = self._position
        if end <= start:
            return b""
        window_end = self._window_start + len(self._window)
        if not (self._window_start <= start and end <= window_end):
            if end - start >= MIN_RANGE_BYTES:
                self._position = end
                return self._read_at(start, end - start)
            self._window_start = max(0, min(start, self._size - MIN_RANGE_BYTES))
            self._window = self._read_at(self._window_start, min(MIN_RANGE_BYTES, self._size))
        self._position = end
        return self._window[start - self._window_start : end - self._window_start]

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._position, 2: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def size(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        self._file, self._window, self.closed = None, b"", True


class S3Files(pafs.FileSystemHandler):
    """The filesystem of every `s3://` path of this process (see the module docstring).

    Holds only the region: pickled into Ray Train's checkpoints and workers, it finds the native
    filesystem and boto3 client of the process it lands in (`mrcnn.s3_clients`).
    """

    def __init__(self, region: str) -> None:
        self.region = region

    def __reduce__(self):
        return (S3Files, (self.region,))

    def __eq__(self, other) -> bool:
        return isinstance(other, S3Files) and other.region == self.region

    def __hash__(self) -> int:
        return hash((S3Files, self.region))

    @property
    def native(self) -> pafs.S3FileSystem:
        return s3_clients.native_filesystem(self.region)

    def _call(self, operation: Callable[[], T], path: str) -> T:
        return call(operation, f"s3://{path}")

    def get_type_name(self) -> str:
        return "s3"

    def equals(self, other) -> bool:
        return isinstance(other, S3Files) and other.region == self.region

    def normalize_path(self, path: str) -> str:
        return self.native.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self._call(lambda: self.native.get_file_info(paths), paths[0] if paths else "")

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self._call(lambda: self.native.get_file_info(selector), selector.base_dir)

    def create_dir(self, path: str, recursive: bool) -> None:
        self._call(lambda: self.native.create_dir(path, recursive=recursive), path)

    def delete_dir(self, path: str) -> None:
        self._call(lambda: self.native.delete_dir(path), path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._call(lambda: self.native.delete_dir_contents(path, missing_dir_ok=missing_dir_ok), path)

    def delete_root_dir_contents(self) -> None:
        raise PermissionError("refusing to delete every object of every bucket")

    def delete_file(self, path: str) -> None:
        self._call(lambda: self.native.delete_file(path), path)

    def move(self, src: str, dest: str) -> None:
        self._call(lambda: self.native.move(src, dest), src)

    def copy_file(self, src: str, dest: str) -> None:
        self._call(lambda: self.native.copy_file(src, dest), src)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self.open_input_file(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        (info,) = self.get_file_info([path])
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"s3://{path}: no such object")
        if info.type != pafs.FileType.File:
            raise IsADirectoryError(f"s3://{path}: a folder, not a file")
        if info.size <= WHOLE_OBJECT_BYTES:
            return pa.BufferReader(get_object(self.region, path))
        return pa.PythonFile(_WindowedReader(self.native, path, info.size), mode="r")

    def open_output_stream(self, path: str, metadata) -> pa.NativeFile:
        return self.native.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata) -> pa.NativeFile:
        return self.native.open_append_stream(path, metadata=metadata)


def filesystem(region: str) -> pafs.PyFileSystem:
    """A pyarrow filesystem for the buckets of `region` (see `S3Files`)."""
    return s3_clients.cached_wrapper(region, lambda: pafs.PyFileSystem(S3Files(region)))
