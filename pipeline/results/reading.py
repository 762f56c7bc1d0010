"""Reading a segmentation output for the results wing: file by file, only the columns asked for,
and the rows chosen from it fetched back whole.

The output folder is `pipeline.segment.output`'s; this module adds what its `scan_parts` does not
say: which part file each table comes from, so that a row found while streaming a few small
columns (`path`, `scores`, ...) can be fetched later with its heavy ones (`masks`) by reading
that one file again, never the whole output.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from mrcnn.errors import UserError
from pipeline.segment import output

# The columns a drawing needs (`pipeline.results.render`).
ROW_COLUMNS = ["path", "width", "height", "categories", "scores", "boxes", "masks", "error"]
# Part files read at once: S3 answers each in tens of milliseconds, so one at a time would wait on
# latency; at most twice as many are held in memory.
READ_THREADS = output.SCAN_THREADS


class NoPredictions(UserError):
    """The predictions folder holds no part file of a segmentation output."""


@dataclass(frozen=True)
class Parts:
    """The committed part files of an output, listed once (`list_parts`)."""

    uri: str
    filesystem: pafs.FileSystem
    files: tuple[str, ...]


@dataclass(frozen=True, order=True)
class RowRef:
    """Where a row is: its part file's index in `Parts.files`, and its index in that file."""

    file: int
    row: int


def list_parts(predictions_uri: str) -> Parts:
    """The part files of the output at `predictions_uri`; `NoPredictions` when there is none."""
    filesystem, files = output.part_files(predictions_uri)
    if not files:
        raise NoPredictions(
            f"{predictions_uri}: no Parquet part files there (not the --output of jobs.segment, "
            "or it has no rows yet)"
        )
    return Parts(predictions_uri, filesystem, tuple(files))


def scan(parts: Parts, columns: list[str]) -> Iterator[tuple[int, pa.Table]]:
    """`(file index, table of columns)` for every part file, in order, `READ_THREADS` at a time."""
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        pending: deque = deque()
        for index, file in enumerate(parts.files):
            pending.append((index, pool.submit(output.read_part, parts.filesystem, file, columns)))
            if len(pending) >= 2 * READ_THREADS:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def iter_rows(parts: Parts, refs: Iterable[RowRef], columns: list[str] = ROW_COLUMNS) -> Iterator[dict]:
    """The rows at `refs` as dicts of `columns`, in the order of the files: each file holding one
    is read once, and memory holds one file's rows at a time."""
    by_file: dict[int, list[int]] = {}
    for ref in refs:
        by_file.setdefault(ref.file, []).append(ref.row)
    for file, rows in sorted(by_file.items()):
        table = output.read_part(parts.filesystem, parts.files[file], columns)
        yield from table.take(pa.array(sorted(rows), pa.int64())).to_pylist()
