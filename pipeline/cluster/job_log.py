"""The job's terminal: our lines reach it, Ray's tracebacks and chatter stay in Ray's log files.

By default Ray prints on the driver's terminal whatever any of the job's processes prints: a
failing actor's traceback three times over (its stderr, the raylet's "There are infinite
retries remaining" warning, Ray Data's "Exception occurred ... please open an issue" and its full
stack trace), Ray Train's failure policy report, every worker's `(pid=...)` prefix, and for every
dataset its execution plan and, when the output is not a terminal, a report of every stage every
10 s. A job of ours ends with one line of its own that says what went wrong; Ray's text before it
buries that line and tells a user to file a Ray bug for a missing weights file. So,
unless the job's `--verbose` (or `MRCNN_VERBOSE=1` in its environment, `verbose_requested`) asks
for everything:
- Ray is started or joined with `log_to_driver=False`: what workers print stays in their log
  files (`ray logs`, the dashboard, the session's `logs/` folder, named in the job's error line).
  Where Ray Data's progress bars can be drawn (`pipeline.cluster.progress`) Ray forwards it, and
  the driver keeps only the bars' lines of it.
- Ray Data's console shows its warnings and nothing else: no INFO lines (the execution plan and
  "Starting execution" of every dataset, the periodic progress report, whose place
  `pipeline.cluster.progress.ProgressLines` takes), no errors or tracebacks ("Exception occurred
  ...": the exception is raised to the job, which prints its one line), and not the warnings that
  are false for this pipeline (`FALSE_RAY_DATA_WARNINGS`). Its `ray-data.log` file keeps them all.
- The lines Ray's C++ core worker logs on the driver's stderr ("core_worker.cc:2465: Actor ...
  has constructor arguments in the object store": Ray Data passes every actor its context by
  reference, and holds it for as long as the actors live) stay in the driver's
  `python-core-driver-*.log`, where Ray writes them too (`_NativeLogFilter`); so does Ray's
  "Token authentication is enabled ... Set RAY_AUTH_MODE=disabled to opt out", whose advice is
  the opposite of this project's (`pipeline.cluster.session`).
- Lines a worker must show the user (training progress, an image left out of training) go
  through `say`: to a relay actor the driver starts for the job (`QuietRay`), which the driver
  prints as they come, on stdout (`say`) or stderr (`warn`), without Ray's `(pid=...)` prefix,
  with `--verbose` too. A process with no relay (a plain Python process, a test calling a
  function directly) prints them itself.
"""

from __future__ import annotations

import logging
import os
import re
import select
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

RELAY_PREFIX = "mrcnn-job-log-"
# How long a worker waits for the relay to take a line before it prints the line itself.
RELAY_TIMEOUT_S = 30.0
POLL_S = 0.2
VERBOSE_ENV = "MRCNN_VERBOSE"
# (logger, start of the message) of Ray Data's warnings that are false for this pipeline. The
# starvation warning ("... The job may hang forever unless the cluster scales up") comes when
# training workers or inference actors hold the CPUs a decode task waits for, and they free them
# as they consume; on a cluster the jobs say themselves, once a minute, what they wait for
# (`pipeline.cluster.placement.WaitReport`).
FALSE_RAY_DATA_WARNINGS = (
    ("ray.data._internal.execution.resource_manager", "Cluster resources are not enough to run any task"),
)
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
# "[2026-01-01 10:00:00,000 E 123 123] core_worker.cc:2465: ...", Ray's C++ log line format.
NATIVE_LOG_LINE = re.compile(rb"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWEF] \d+ \d+\] [\w./-]+:\d+: ")

# This process's relay, looked up once: an actor handle, or False when the job has none (or this
# is the driver, which prints its own lines); `_blocks` counts the driver's `QuietRay`s, `_quiet`
# whether the outermost one quiets Ray.
_relay = None
_relay_lock = threading.Lock()
_blocks = 0
_quiet = False
_relayed = 0


def verbose_requested(flag: bool) -> bool:
    """Whether the job shows everything: its `--verbose` flag, or `MRCNN_VERBOSE` set (not 0)."""
    return flag or os.environ.get(VERBOSE_ENV, "").strip() not in ("", "0")


def console_quiet() -> bool:
    """Whether this process is a driver inside a `QuietRay` block that keeps Ray's output quiet."""
    return _quiet


def relayed_lines() -> int:
    """How many lines of the job's workers this driver has printed."""
    return _relayed


class _RayDataConsole(logging.Filter):
    """What Ray Data's console handler shows of a quiet job: warnings, less the false ones."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or record.name.startswith("ray.data.exceptions"):
            return False
        message = record.getMessage()
        return not any(
            record.name == name and message.startswith(start) for name, start in FALSE_RAY_DATA_WARNINGS
        )


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextmanager
def quiet_ray_init(verbose: bool) -> Iterator[None]:
    """Around `ray.init`: Ray's token authentication notice stays off the console unless `verbose`."""
    logger = logging.getLogger(TOKEN_AUTH_LOGGER)
    drop = _DropAll()
    if not verbose:
        logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _quiet_ray_data_console() -> Callable[[], None]:
    """Add `_RayDataConsole` to Ray Data's console handler; returns the function removing it."""
    import ray.data  # noqa: F401  (configures Ray Data's loggers)

    handlers = [handler for handler in logging.getLogger("ray.data").handlers if handler.name == "console"]
    console = _RayDataConsole()
    for handler in handlers:
        handler.addFilter(console)

    def remove() -> None:
        for handler in handlers:
            handler.removeFilter(console)

    return remove


class _NativeLogFilter:
    """While it runs, this process's stderr (fd 2, where Ray's C++ code writes) goes through a pipe
    whose reader passes on everything but whole lines in Ray's C++ log format: those are in the
    process's Ray log file too. Bytes pass as they come (a progress bar's line never ends)."""

    def __init__(self) -> None:
        self._stop = threading.Event()

    def start(self) -> None:
        sys.stderr.flush()
        self._terminal = os.dup(2)
        self._read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self._thread = threading.Thread(target=self._pump, name="job-log-stderr", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        sys.stderr.flush()
        os.dup2(self._terminal, 2)
        self._stop.set()
        self._thread.join()
        os.close(self._read)
        os.close(self._terminal)

    def _pump(self) -> None:
        while True:
            readable, _, _ = select.select([self._read], [], [], POLL_S)
            if not readable:
                if self._stop.is_set():
                    return
                continue
            chunk = os.read(self._read, 1 << 16)
            if not chunk:  # every writer gone
                return
            kept = b"".join(
                line
                for line in chunk.splitlines(keepends=True)
                if not (line.endswith(b"\n") and NATIVE_LOG_LINE.match(line))
            )
            while kept:
                kept = kept[os.write(self._terminal, kept) :]


def _relay_name() -> str:
    import ray

    return RELAY_PREFIX + ray.get_runtime_context().get_job_id()


def _lookup_relay():
    global _relay
    with _relay_lock:
        if _relay is None:
            import ray

            _relay = False
            if ray.is_initialized():
                try:
                    _relay = ray.get_actor(_relay_name())
                except ValueError:
                    _relay = False
        return _relay


def say(line: str) -> None:
    """Show `line` on the job's terminal (stdout), from any process of the job."""
    _emit(line, "stdout")


def warn(line: str) -> None:
    """Show `line` on the job's terminal (stderr), from any process of the job."""
    _emit(line, "stderr")


def _emit(line: str, stream: str) -> None:
    global _relay
    relay = _lookup_relay()
    if relay:
        import ray

        try:
            # Waited for: a worker that exits right after (fault injection) must not lose its line.
            ray.get(relay.put.remote(stream, line), timeout=RELAY_TIMEOUT_S)
            return
        except (ray.exceptions.RayError, TimeoutError):
            # A line must never end the work it reports on: this process prints its lines itself
            # from now on (into Ray's log files).
            with _relay_lock:
                _relay = False
    print(line, file=sys.stdout if stream == "stdout" else sys.stderr, flush=True)


class _Relay:
    """The lines of the job's processes, until the driver takes them."""

    def __init__(self) -> None:
        self._lines: list[tuple[str, str]] = []

    def put(self, stream: str, line: str) -> None:
        self._lines.append((stream, line))

    def take(self) -> list[tuple[str, str]]:
        lines, self._lines = self._lines, []
        return lines


class QuietRay:
    """Around a job's use of Ray (entered after `ray.init`): print the lines the job's workers
    `say`, until the block ends, and unless `verbose`, quiet Ray's console output (see the module
    docstring). A block inside another (a job the quickstart runs) changes nothing.
    """

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose_requested(verbose)
        self._actor = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._undo: list[Callable[[], None]] = []

    def __enter__(self) -> QuietRay:
        global _relay, _blocks, _quiet
        with _relay_lock:
            _blocks += 1
            if _blocks > 1:
                return self
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from pipeline.cluster import ray_compat

        # On the driver's node, which lives as long as the job: a relay on a node that dies would
        # take the lines of every worker with it.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self._actor = (
            ray.remote(_Relay).options(name=_relay_name(), num_cpus=0, scheduling_strategy=here).remote()
        )
        with _relay_lock:
            _relay = False  # the driver prints its own lines
        self._thread = threading.Thread(target=self._print_lines, name="job-log", daemon=True)
        self._thread.start()
        if not self.verbose:
            _quiet = True
            self._undo.append(_quiet_ray_data_console())
            native = _NativeLogFilter()
            native.start()
            self._undo.append(native.stop)
            # Forwarded only for the progress bars (`pipeline.cluster.progress`): nothing else.
            restore = ray_compat.keep_worker_output(ray_compat.is_progress_bar_line)
            if restore is not None:
                self._undo.append(restore)
        return self

    def __exit__(self, *exc) -> None:
        global _relay, _blocks, _quiet
        with _relay_lock:
            _blocks -= 1
        if self._actor is None:
            return
        self._stop.set()
        self._thread.join()
        self._drain()
        import ray

        ray.kill(self._actor)
        with _relay_lock:
            _relay = None
        for undo in reversed(self._undo):
            undo()
        _quiet = False

    def _print_lines(self) -> None:
        while not self._stop.wait(POLL_S):
            self._drain()

    def _drain(self) -> None:
        global _relayed
        import ray

        try:
            lines = ray.get(self._actor.take.remote(), timeout=30)
        except ray.exceptions.RayError:
            return
        _relayed += len(lines)
        for stream, line in lines:
            print(line, file=sys.stdout if stream == "stdout" else sys.stderr, flush=True)
