"""What every entry point shares: an argument parser whose errors are one line, bounded numbers, and
the mapping of the project's two kinds of error to an exit code and one line (`run_job`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from mrcnn.errors import RunError, UserError, one_line


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag ends with one line naming it and exit code 2, without the usage dump."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def bounded(
    kind: Callable[[str], int | float],
    minimum: float,
    maximum: float | None = None,
    *,
    above: bool = False,
) -> Callable[[str], int | float]:
    """An argparse `type` accepting `kind` values >= minimum (> with `above`) and <= maximum."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < minimum or (above and value == minimum) or (maximum is not None and value > maximum):
            bound = f"above {minimum}" if above else f"at least {minimum}"
            bound += f" and at most {maximum}" if maximum is not None else ""
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


def run_job(prog: str, work: Callable[[], int]) -> int:
    """`work()`'s exit code; an error it raises ends the job with one line on stderr and the exit
    code of its base (`mrcnn.errors`): 2 for a `UserError` (also one that is a `RunError` too),
    1 for a `RunError`. Anything else is a bug and keeps its traceback."""
    try:
        return work()
    except UserError as error:
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except RunError as error:
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return 1
