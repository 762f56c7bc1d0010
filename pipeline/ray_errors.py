"""One line from an error that Ray wrapped: the original exception under Ray's layers.

Ray re-raises a task's or actor's exception inside its own types (`RayTaskError(X)` with `.cause`,
Ray Train's `ControllerError.controller_failure` and `WorkerGroupError.worker_failures`, or plain
`__cause__`) and appends lines of retry advice and tracebacks to their messages. Jobs print the
innermost exception, whose messages in this project are one line.
"""

from __future__ import annotations


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception under Ray's wrappers (the first failed worker's, by rank)."""
    seen = {id(error)}
    while True:
        failures = getattr(error, "worker_failures", None)
        if failures:
            inner = sorted(failures.items())[0][1]
        else:
            inner = (
                getattr(error, "controller_failure", None) or getattr(error, "cause", None) or error.__cause__
            )
        if not isinstance(inner, BaseException) or id(inner) in seen:
            return error
        seen.add(id(inner))
        error = inner


def one_line(error: BaseException, limit: int = 400) -> str:
    """`Type: first line of the message` of the root cause, at most `limit` characters."""
    cause = root_cause(error)
    lines = str(cause).strip().splitlines()
    name = type(cause).__name__
    # RayTaskError(X) subclasses print the traceback; their last line is "X: message".
    text = lines[-1] if name.startswith("RayTaskError") and lines else (lines[0] if lines else "")
    return f"{name}: {' '.join(text.split())}"[:limit]
