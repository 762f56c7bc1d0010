"""Check a segmentation output at the end of a run: counts, and paths that have two rows.

One race is left by the commits of `pipeline.output`: when a driver dies, its Ray workers outlive
it for a moment (they notice that their raylet or job is gone), and a task in the middle of a
commit can still write its file after a re-run has read the done set, so a path can land in two
files. At the end of every run `summarize` counts the rows and looks for paths that appear twice;
`remove_duplicates` then rewrites the files holding the extra copies without them (new
content-named file first, old file deleted after, so a kill in between leaves duplicates for the
next run to repair, never a lost row).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mrcnn import storage
from pipeline.done_set import path_hashes
from pipeline.output import commit_part, part_files, read_part, scan_parts


@dataclass(frozen=True)
class OutputSummary:
    """What the output holds: rows (`images`), error rows, instances, files; paths seen twice."""

    images: int
    errors: int
    instances: int
    files: int
    duplicate_paths: tuple[str, ...]


def summarize(output_uri: str) -> OutputSummary:
    """Count the committed rows and check that no path appears twice (one scan of three columns)."""
    listed = part_files(output_uri)
    images = errors = instances = 0
    chunks = []
    for batch in scan_parts(output_uri, ["path", "error", "scores"], listed):
        images += batch.num_rows
        errors += batch.num_rows - batch.column(1).null_count
        instances += int(pc.sum(pc.list_value_length(batch.column(2))).as_py() or 0)
        chunks.append(path_hashes(batch.column(0).to_pylist()))
    hashes = np.concatenate(chunks) if chunks else np.zeros(0, np.uint64)
    values, counts = np.unique(hashes, return_counts=True)
    suspects = values[counts > 1]
    duplicates: tuple[str, ...] = ()
    if suspects.size:
        # Equal hashes of different paths are collisions, not duplicates: compare the paths.
        seen: dict[str, int] = {}
        for batch in scan_parts(output_uri, ["path"], listed):
            paths = batch.column(0).to_pylist()
            for path in np.asarray(paths, dtype=object)[np.isin(path_hashes(paths), suspects)]:
                seen[path] = seen.get(path, 0) + 1
        duplicates = tuple(sorted(path for path, count in seen.items() if count > 1))
    return OutputSummary(images, errors, instances, len(listed[1]), duplicates)


def remove_duplicates(output_uri: str, duplicate_paths: Iterable[str]) -> int:
    """Keep one row per path of `duplicate_paths` (the one in the first file by name); returns
    the number of rows removed. Only files holding one of those paths are read and rewritten."""
    duplicates = set(duplicate_paths)
    filesystem, files = part_files(output_uri)
    kept: set[str] = set()
    removed = 0
    for file in files:
        paths = read_part(filesystem, file, ["path"]).column(0).to_pylist()
        drop = []
        for path in paths:
            drop.append(path in kept)
            if path in duplicates:
                kept.add(path)
        if not any(drop):
            continue
        table = read_part(filesystem, file).filter(pc.invert(pa.array(drop)))
        rewritten = commit_part(table, output_uri) if table.num_rows else None
        if rewritten is None or storage.resolve(rewritten)[1] != file:
            storage.delete(storage.to_uri(filesystem, file))
        removed += sum(drop)
    return removed
