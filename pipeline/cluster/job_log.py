"""The job's terminal: our lines reach it, Ray's tracebacks and chatter stay in Ray's log files.

By default Ray prints on the driver's terminal whatever any of the job's processes prints: a
failing actor's traceback three times over (its stderr, the raylet's "There are infinite
retries remaining" warning, Ray Data's "Exception occurred ... please open an issue" and its full
stack trace), Ray Train's failure policy report, every worker's `(pid=...)` prefix. A job of ours
ends with one line of its own that says what went wrong; Ray's text before it buries that line
and tells a user to file a Ray bug for a missing weights file. So, unless the job's `--verbose`
asks for everything (`QuietRay(verbose=True)`):
- Ray is started or joined with `log_to_driver=False`: what workers print stays in their log
  files (`ray logs`, the dashboard, the session's `logs/` folder, named in the job's error line);
- Ray Data's console handler drops its error records and their tracebacks ("Exception occurred
  ...", "An exception was raised from a task of operator ..."): the exception is raised to the
  job, which prints its one line; its `ray-data.log` file still gets them.
- Lines a worker must show the user (training progress, an image left out of training) go
  through `say`: to a relay actor the driver starts for the job (`QuietRay`), which the driver
  prints as they come, on stdout (`say`) or stderr (`warn`). A process with no relay (a plain
  Python process, a test calling a function directly) prints them itself.
"""

from __future__ import annotations

import logging
import sys
import threading

RELAY_PREFIX = "mrcnn-job-log-"
# How long a worker waits for the relay to take a line before it prints the line itself.
RELAY_TIMEOUT_S = 30.0
POLL_S = 0.2

# This process's relay, looked up once: an actor handle, or False when the job has none (or this
# is the driver, which prints its own lines); `_quiet_blocks` counts the driver's `QuietRay`s.
_relay = None
_relay_lock = threading.Lock()
_quiet_blocks = 0
_relayed = 0


def relayed_lines() -> int:
    """How many lines of the job's workers this driver has printed."""
    return _relayed


class _DropRayDataErrors(logging.Filter):
    """Keeps Ray Data's errors and their tracebacks off the console: the exception is raised to the
    job, which says it in one line; Ray Data's log file still records them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR and not record.name.startswith("ray.data.exceptions")


def quiet_ray_data_console() -> None:
    """Add `_DropRayDataErrors` to Ray Data's console handler (once)."""
    import ray.data  # noqa: F401  (configures Ray Data's loggers)

    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console" and not any(
            isinstance(existing, _DropRayDataErrors) for existing in handler.filters
        ):
            handler.addFilter(_DropRayDataErrors())


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
    """Around a job's use of Ray (entered after `ray.init`): quiet Ray's console output (see the
    module docstring) and print the lines the job's workers `say`, until the block ends.

    With `verbose`, Ray's output is left as it is, and workers print their lines themselves.
    """

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self._actor = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> QuietRay:
        global _relay, _quiet_blocks
        if self.verbose:
            return self
        with _relay_lock:
            _quiet_blocks += 1
            if _quiet_blocks > 1:  # a job run inside another's block (the quickstart's)
                return self
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        quiet_ray_data_console()
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
        return self

    def __exit__(self, *exc) -> None:
        global _relay, _quiet_blocks
        if self.verbose:
            return
        with _relay_lock:
            _quiet_blocks -= 1
        if self._actor is None:
            return
        self._stop.set()
        self._thread.join()
        self._drain()
        import ray

        ray.kill(self._actor)
        with _relay_lock:
            _relay = None

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
