"""A fault-injecting HTTP proxy in front of the moto server, for the S3 tests.

It answers a seeded share of the requests of each kind with S3's `503 SlowDown` (and S3's real
XML body, request id and host id included: a few hundred bytes, which is what overflows the AWS
SDK's buffer on a small ranged GET), can fail exactly the small ranged GETs (the Parquet footer
length, a column chunk of an all-null column), can reset connections, answers a request signed for
another region than its bucket's as S3 does (moto accepts any region), and counts the requests and
TCP connections it served, by kind.

Request kinds (`kind_of`): `GET` (a whole object), `GET_RANGE` (a GET with a `Range` header),
`LIST` (a GET on the bucket itself: ListObjects), `HEAD`, `PUT`, `POST` (multipart upload
start and completion, batch deletes), `DELETE`.

Shared by the storage, segmentation, evaluation and training fault tests (`tests/` is on pytest's
import path: rootdir-relative imports as in `conftest.py`).
"""

from __future__ import annotations

import http.client
import http.server
import random
import re
import socket
import struct
import threading
import uuid
from collections import Counter
from urllib.parse import urlparse

# The region a SigV4 `Authorization` header was signed for.
SIGNED_REGION = re.compile(r"Credential=[^/]+/\d{8}/([^/]+)/s3/")
KINDS = ("GET", "GET_RANGE", "LIST", "HEAD", "PUT", "POST", "DELETE")


def slow_down_body() -> bytes:
    """S3's `SlowDown` error document, as S3 sends it (258 bytes with its ids)."""
    request_id = uuid.uuid4().hex[:16].upper()
    host_id = "s9lzHYrFp76ZVxRcpX9+5cjAnEH2ROuNkd2BHfIa6UkFVdtjf5mKR3/eTPFvsiP/XV/VLi31234="
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code><Message>Please reduce '
        f"your request rate.</Message><RequestId>{request_id}</RequestId><HostId>{host_id}</HostId></Error>"
    ).encode()


def kind_of(method: str, path: str, headers) -> str:
    """The request kind (see the module docstring) of an S3 request in path style."""
    if method != "GET":
        return method
    if headers.get("Range"):
        return "GET_RANGE"
    parsed = urlparse(path)
    return "LIST" if "/" not in parsed.path.strip("/") else "GET"


def range_length(header: str | None) -> int | None:
    """Bytes a `Range: bytes=a-b` header asks for; None for none or an open range."""
    found = re.fullmatch(r"bytes=(\d+)-(\d+)", header or "")
    return int(found.group(2)) - int(found.group(1)) + 1 if found else None


class FlakyS3Proxy:
    """An HTTP proxy on 127.0.0.1 in front of the moto server at `upstream`.

    Args:
        failure_rates: kind -> the share of its requests answered `503 SlowDown`.
        seed: of the random draws, so a run's faults are the same each time.
        small_range_bytes: also answer `503 SlowDown` to every ranged GET asking for fewer bytes.
        reset_rates: kind -> the share of its requests whose connection is reset, unanswered.
        bucket_regions: bucket -> region: a request to one of those buckets signed for another
            region gets what S3 answers it, `400 AuthorizationHeaderMalformed` with
            `x-amz-bucket-region`.

    `failures` counts the 503s sent, `resets` the connections reset, `requests` the requests
    received (by kind in `by_kind`, failed ones in `failed_by_kind`), `connections` the TCP
    connections accepted (HTTP/1.1 keep-alive), `log` each request as (method, path, status
    (0 forwarded), body bytes).
    """

    def __init__(
        self,
        upstream: str,
        failure_rates: dict[str, float] | None = None,
        seed: int = 0,
        *,
        small_range_bytes: int | None = None,
        reset_rates: dict[str, float] | None = None,
        bucket_regions: dict[str, str] | None = None,
    ):
        unknown = set(failure_rates or {}) | set(reset_rates or {})
        if unknown - set(KINDS):
            raise ValueError(f"unknown request kinds {sorted(unknown - set(KINDS))}; use {KINDS}")
        self.failures = 0
        self.resets = 0
        self.requests = 0
        self.connections = 0
        self.wrong_region = 0
        self.by_kind: Counter[str] = Counter()
        self.failed_by_kind: Counter[str] = Counter()
        self.log: list[tuple[str, str, int, int]] = []
        self._rates = failure_rates or {}
        self._resets = reset_rates or {}
        self._small = small_range_bytes
        self._regions = bucket_regions or {}
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._upstream = upstream.removeprefix("http://").split(":")
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FlakyS3Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _fault(self, kind: str, headers) -> str | None:
        """"503", "reset" or None for a request of `kind` (counted)."""
        with self._lock:
            self.requests += 1
            self.by_kind[kind] += 1
            length = range_length(headers.get("Range")) if kind == "GET_RANGE" else None
            small = self._small is not None and length is not None and length < self._small
            if small or self._rng.random() < self._rates.get(kind, 0.0):
                fault = "503"
            elif self._rng.random() < self._resets.get(kind, 0.0):
                fault = "reset"
            else:
                fault = None
            if fault:
                self.failed_by_kind[kind] += 1
                self.failures += fault == "503"
                self.resets += fault == "reset"
            return fault

    def _handler(self):
        proxy = self
        host, port = self._upstream

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                with proxy._lock:
                    proxy.connections += 1

            def handle_one_request(self):
                try:
                    super().handle_one_request()
                except ConnectionError:
                    self.close_connection = True

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)

            def _any(self):
                body = self._body()
                expected = proxy._regions.get(self.path.lstrip("/").split("/")[0].split("?")[0])
                signed = SIGNED_REGION.search(self.headers.get("Authorization", ""))
                if expected and signed and signed.group(1) != expected:
                    with proxy._lock:
                        proxy.wrong_region += 1
                    self._wrong_region(signed.group(1), expected)
                    return
                fault = proxy._fault(kind_of(self.command, self.path, self.headers), self.headers)
                proxy.log.append((self.command, self.path, 503 if fault == "503" else 0, len(body)))
                if fault == "reset":
                    # SO_LINGER 0: the close sends a TCP RST, as a dropped connection does.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if fault == "503":
                    self._send(503, {"Content-Type": "application/xml"}, slow_down_body())
                    return
                connection = http.client.HTTPConnection(host, int(port), timeout=60)
                hop_by_hop = ("connection", "transfer-encoding", "content-length")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in hop_by_hop}
                headers["Content-Length"] = str(len(body))
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                # A HEAD response has no body but the Content-Length of the object.
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                connection.close()

            def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _wrong_region(self, signed: str, expected: str) -> None:
                body = (
                    "<Error><Code>AuthorizationHeaderMalformed</Code><Message>The authorization "
                    f"header is malformed; the region '{signed}' is wrong; expecting '{expected}'"
                    f"</Message><Region>{expected}</Region></Error>"
                ).encode()
                headers = {"x-amz-bucket-region": expected, "Content-Type": "application/xml"}
                self._send(400, headers, body)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        return Handler
