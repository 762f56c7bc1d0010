"""A fault-injecting HTTP proxy for S3 tests: 503 SlowDown for a share of the requests, S3's answer
to a request signed for another region than its bucket's (moto accepts any region), and counts of
the requests and TCP connections it served.

Shared by the segmentation and training fault-tolerance tests (`tests/` is on pytest's import
path: rootdir-relative imports as in `conftest.py`).
"""

from __future__ import annotations

import http.client
import http.server
import random
import re
import threading

# The region a SigV4 `Authorization` header was signed for.
SIGNED_REGION = re.compile(r"Credential=[^/]+/\d{8}/([^/]+)/s3/")


class FlakyS3Proxy:
    """An HTTP proxy on 127.0.0.1 in front of the moto server that answers a share of the requests
    with S3's `503 SlowDown` instead of forwarding them; `failures` counts those answers.

    `bucket_regions` (bucket -> region): a request to one of those buckets signed for another
    region gets what S3 answers it, `400 AuthorizationHeaderMalformed` with `x-amz-bucket-region`.
    `connections` counts the TCP connections accepted from clients (HTTP/1.1 keep-alive).
    """

    SLOW_DOWN = (
        b'<?xml version="1.0" encoding="UTF-8"?>'
        b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
    )

    def __init__(
        self,
        upstream: str,
        failure_rates: dict[str, float],
        seed: int = 0,
        bucket_regions: dict[str, str] | None = None,
    ):
        self.failures = 0
        self.requests = 0
        self.connections = 0
        self.wrong_region = 0
        self.log: list[tuple[str, str, int, int]] = []
        proxy = self
        rng = random.Random(seed)
        lock = threading.Lock()
        host, port = upstream.removeprefix("http://").split(":")

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                with lock:
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
                expected = (bucket_regions or {}).get(self.path.lstrip("/").split("/")[0].split("?")[0])
                signed = SIGNED_REGION.search(self.headers.get("Authorization", ""))
                if expected and signed and signed.group(1) != expected:
                    with lock:
                        proxy.wrong_region += 1
                    self._wrong_region(signed.group(1), expected)
                    return
                with lock:
                    proxy.requests += 1
                    fail = rng.random() < failure_rates.get(self.command, 0.0)
                    proxy.failures += fail
                proxy.log.append((self.command, self.path, 503 if fail else 0, len(body)))
                if fail:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(FlakyS3Proxy.SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(FlakyS3Proxy.SLOW_DOWN)
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

            def _wrong_region(self, signed: str, expected: str) -> None:
                body = (
                    "<Error><Code>AuthorizationHeaderMalformed</Code><Message>The authorization "
                    f"header is malformed; the region '{signed}' is wrong; expecting '{expected}'"
                    f"</Message><Region>{expected}</Region></Error>"
                ).encode()
                self.send_response(400)
                self.send_header("x-amz-bucket-region", expected)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FlakyS3Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
