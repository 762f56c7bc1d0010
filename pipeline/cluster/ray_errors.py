"""One line from an error that Ray wrapped: the original exception under Ray's layers.

Ray re-raises a task's or actor's exception inside its own types and appends lines of retry
advice and tracebacks to their messages: `RayTaskError(X)` keeps the original in `.cause`; Ray
Train's `ControllerError.controller_failure` and `WorkerGroupError.worker_failures` hold theirs;
an actor whose `__init__` raised comes back as an `ActorDiedError` that keeps only the text of the
creation task's traceback, whose last line is `module.X: message`. Ray Data chains an empty
`SystemException` under errors it deems internal, which says nothing. Jobs print the innermost
exception, whose messages in this project are one line (`cause_line`).
"""

from __future__ import annotations

import re

from mrcnn.errors import one_line

# The last line of a Python traceback: `package.module.ErrorName: message`.
_TRACEBACK_LAST_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception)): (.+)$")


def root_cause(error: BaseException) -> BaseException:
    """The innermost informative exception under Ray's wrappers (the first failed worker's, by rank)."""
    seen = {id(error)}
    while True:
        failures = getattr(error, "worker_failures", None)
        if failures:
            inner = sorted(failures.items())[0][1]
        else:
            inner = (
                getattr(error, "controller_failure", None) or getattr(error, "cause", None) or error.__cause__
            )
        if not isinstance(inner, BaseException) or id(inner) in seen or not str(inner).strip():
            return error
        seen.add(id(inner))
        error = inner


def cause_line(error: BaseException, limit: int = 400) -> str:
    """`ErrorName: message` of the root cause in one line (`mrcnn.errors.one_line`), at most
    `limit` characters.

    When the root cause is Ray's text of a remote traceback, the original exception's own last
    line is taken from it.
    """
    cause = root_cause(error)
    lines = [line.strip() for line in str(cause).strip().splitlines()]
    remote = [match for line in lines if (match := _TRACEBACK_LAST_LINE.match(line))]
    if remote and len(lines) > 1:
        name, text = remote[-1].groups()
        return f"{name}: {' '.join(text.split())}"[:limit]
    return one_line(cause, with_type=True, limit=limit)


def actor_could_not_start(error: BaseException) -> bool:
    """Whether `error` (or one under it) says an actor's `__init__` raised: an actor that cannot
    load its model or use its node, which a re-run of the same command would not cure."""
    import ray

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ray.exceptions.RayActorError) and error.actor_init_failed:
            return True
        error = getattr(error, "cause", None) or error.__cause__
    return False
