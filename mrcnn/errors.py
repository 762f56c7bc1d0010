"""One-line messages from exceptions: error rows and job errors in this project are one line."""

from __future__ import annotations


def one_line(error: BaseException) -> str:
    """The message of `error` with its white space folded into one line (its type when empty)."""
    return " ".join(str(error).split()) or type(error).__name__
