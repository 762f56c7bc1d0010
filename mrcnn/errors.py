"""The project's two kinds of error, and the one-line messages every job and error row is made of.

Every error a job can end with derives from one of two bases, and the base decides the exit code
(`jobs.cli.run_job`), never the message's text:
- `UserError`: the user's input or flags are wrong (exit 2): a missing or malformed file, a model
  folder that does not load, an output that holds another run, a request no node of the cluster
  can ever hold. Re-running the same command fails the same way.
- `RunError`: the run failed (exit 1): a store that keeps failing after its retries, a task or a
  training worker that failed. What is committed is complete; re-running the same command resumes.
An error that is both (an object that is not there to read, which is a `StorageError` too) is the
user's. Each module's exceptions derive from one of the two, with a message of one line that names
the input.
"""

from __future__ import annotations


class UserError(Exception):
    """The user's input or flags are wrong: exit 2, one line."""


class RunError(Exception):
    """The run failed; re-running the same command resumes: exit 1, one line."""


def one_line(error: BaseException, with_type: bool = False, limit: int | None = None) -> str:
    """The message of `error` with its white space folded into one line (its type when empty).

    `with_type`: as `ErrorName: message`; `limit`: at most that many characters.
    """
    text = " ".join(str(error).split())
    line = f"{type(error).__name__}: {text}" if with_type or not text else text
    if not text and not with_type:
        line = type(error).__name__
    return line[:limit] if limit is not None else line
