"""Headless Chromium (Debian's `chromium`, installed by `make setup-browser`) driven through the
Chrome DevTools protocol over a websocket: open a page, wait for its load event, collect what it
logged as errors (console errors, uncaught exceptions, resources that failed to load), evaluate a
script in it, and take a screenshot of the whole page.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import websocket

START_TIMEOUT_S = 60
CALL_TIMEOUT_S = 60


def chromium_path() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@dataclass
class Page:
    """One tab: `call` a DevTools method; events that arrive meanwhile are kept in `events`."""

    socket: websocket.WebSocket
    events: list[dict] = field(default_factory=list)
    _next_id: int = 0

    def call(self, method: str, **params) -> dict:
        self._next_id += 1
        self.socket.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def wait_for(self, event: str, timeout_s: float = CALL_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for message in self.events:
                if message.get("method") == event:
                    self.events.remove(message)
                    return message
            self.events.append(json.loads(self.socket.recv()))
        raise TimeoutError(f"no {event} in {timeout_s} s")

    def open(self, url: str) -> None:
        """Navigate to `url` and wait for its load event (every <img> loaded or failed)."""
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads seen so far, one line each."""
        found = []
        for message in self.events:
            method, params = message.get("method"), message.get("params", {})
            if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                found.append("console: " + " ".join(str(arg.get("value", arg)) for arg in params["args"]))
            elif method == "Runtime.exceptionThrown":
                found.append("exception: " + json.dumps(params["exceptionDetails"])[:500])
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                entry = params["entry"]
                found.append(f"log: {entry['text']} {entry.get('url', '')}")
        return found

    def evaluate(self, expression: str):
        """The JSON value of `expression` in the page."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page (beyond the window), written to `path`."""
        size = self.call("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


@contextlib.contextmanager
def chromium(profile: Path, width: int = 1200, height: int = 900) -> Iterator[Page]:
    """A headless Chromium with its own profile folder; yields its first tab."""
    executable = chromium_path()
    if executable is None:
        raise RuntimeError("chromium is not installed: run `make setup-browser` (Debian's chromium package)")
    profile.mkdir(parents=True, exist_ok=True)
    log = open(profile / "chromium.log", "wb")  # noqa: SIM115 (closed below, after the process)
    process = subprocess.Popen(
        [
            executable,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--hide-scrollbars",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        port = _devtools_port(profile, process)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=CALL_TIMEOUT_S) as answer:
            tab = next(target for target in json.load(answer) if target["type"] == "page")
        # No Origin header: Chromium refuses websocket clients that send one it does not allow.
        socket = websocket.create_connection(
            tab["webSocketDebuggerUrl"], timeout=CALL_TIMEOUT_S, suppress_origin=True
        )
        try:
            yield Page(socket)
        finally:
            socket.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _devtools_port(profile: Path, process: subprocess.Popen) -> int:
    """The port Chromium chose, from the `DevToolsActivePort` file it writes in its profile."""
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"chromium exited with {process.returncode}: see {profile / 'chromium.log'}")
        if marker.exists() and os.path.getsize(marker) > 0:
            return int(marker.read_text().split()[0])
        time.sleep(0.1)
    raise TimeoutError(f"chromium did not start in {START_TIMEOUT_S} s: see {profile / 'chromium.log'}")
