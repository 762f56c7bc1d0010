"""Which rows of an output to draw, and which of their instances: a `--paths` file of URIs, or a
seeded uniform sample of the rows (`--sample N`), shaped by `--min-score` and `--categories`.

An `InstanceFilter` keeps the instances scoring at least `min_score` whose category is one of
`categories` (either may be unset). A sample draws from the rows that were segmented (error rows
have nothing to draw) and, when a filter is set, that have at least one instance it keeps; the
drawing then shows only those instances. Rows named by `--paths` are drawn whatever the filter,
with the instances it keeps.

The sample is bottom-k reservoir sampling: each eligible row gets a random key from a generator
seeded with `--seed`, and the `N` smallest keys seen so far are kept, so that every set of `N`
eligible rows is equally likely, memory holds `N` keys whatever the output's size, and the keys of
a whole part file are drawn and compared at once with numpy (no Python work per row). The same
output and seed give the same sample: part files are read in the order of their names.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mrcnn import storage
from mrcnn.errors import UserError
from pipeline.results.reading import Parts, RowRef, scan

# Rows named in the message of a `--paths` file with rows missing.
MISSING_SHOWN = 3


class PathsNotFound(UserError):
    """A `--paths` file that names rows the output does not have, or that cannot be used."""


class BadCategories(UserError):
    """A `--categories` list without a name."""


@dataclass(frozen=True)
class InstanceFilter:
    """The instances to show: scoring at least `min_score`, of one of `categories` (None: any)."""

    min_score: float | None = None
    categories: frozenset[str] | None = None

    @property
    def active(self) -> bool:
        return self.min_score is not None or self.categories is not None

    @property
    def columns(self) -> list[str]:
        """The columns `rows_with_instances` reads."""
        return ["scores"] + (["categories"] if self.categories is not None else [])

    def kept(self, scores: Sequence[float], categories: Sequence[str]) -> list[int]:
        """Indexes of one row's instances that this filter keeps."""
        return [
            i
            for i, (score, category) in enumerate(zip(scores, categories, strict=True))
            if (self.min_score is None or score >= self.min_score)
            and (self.categories is None or category in self.categories)
        ]

    def rows_with_instances(self, table: pa.Table) -> np.ndarray:
        """bool[rows]: which rows of `table` (its `columns`) have an instance this filter keeps."""
        scores = table.column("scores").combine_chunks()
        keep = np.ones(len(pc.list_flatten(scores)), bool)
        if self.min_score is not None:
            # In float64, as `kept` compares: float32(0.7) is below 0.7, and equal to float32(0.7).
            flat = pc.cast(pc.list_flatten(scores), pa.float64())
            keep &= pc.greater_equal(flat, self.min_score).to_numpy(zero_copy_only=False)
        if self.categories is not None:
            names = pc.list_flatten(table.column("categories").combine_chunks())
            wanted = pa.array(sorted(self.categories), pa.string())
            keep &= pc.is_in(names, value_set=wanted).to_numpy(zero_copy_only=False)
        parents = pc.list_parent_indices(scores).to_numpy(zero_copy_only=False)
        return np.bincount(parents[keep], minlength=table.num_rows) > 0


def parse_categories(text: str | None) -> frozenset[str] | None:
    """`"cat, dog"` -> {"cat", "dog"}; None stays None."""
    if text is None:
        return None
    names = frozenset(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise BadCategories(f"--categories {text!r}: name at least one category (comma-separated)")
    return names


def segmented(table: pa.Table) -> np.ndarray:
    """bool[rows]: the rows without an error."""
    return pc.is_null(table.column("error")).to_numpy(zero_copy_only=False)


class RowSample:
    """A uniform sample of `size` rows among those a filter makes eligible, fed a file at a time."""

    def __init__(self, size: int, seed: int, instance_filter: InstanceFilter) -> None:
        self.size = size
        self.instance_filter = instance_filter
        self.eligible = 0
        self._rng = np.random.default_rng(seed)
        self._keys = np.zeros(0)
        self._refs = np.zeros((0, 2), np.int64)

    @property
    def columns(self) -> list[str]:
        """The columns `add` needs."""
        return ["error", *self.instance_filter.columns]

    def add(self, file: int, table: pa.Table) -> None:
        """Offer the rows of part file `file` (a table with at least `columns`)."""
        eligible = segmented(table)
        if self.instance_filter.active:
            eligible &= self.instance_filter.rows_with_instances(table)
        rows = np.flatnonzero(eligible)
        self.eligible += len(rows)
        if not len(rows) or not self.size:
            return
        keys = np.concatenate([self._keys, self._rng.random(len(rows))])
        refs = np.concatenate([self._refs, np.stack([np.full(len(rows), file), rows], axis=1)])
        if len(keys) > self.size:
            kept = np.argpartition(keys, self.size - 1)[: self.size]
            keys, refs = keys[kept], refs[kept]
        self._keys, self._refs = keys, refs

    def refs(self) -> list[RowRef]:
        """The sampled rows, in the order of the output's files."""
        return sorted(RowRef(int(file), int(row)) for file, row in self._refs)


def sample_rows(parts: Parts, size: int, seed: int, instance_filter: InstanceFilter) -> RowSample:
    """A `RowSample` of the whole output (one scan of the few columns it needs)."""
    sample = RowSample(size, seed, instance_filter)
    for file, table in scan(parts, sample.columns):
        sample.add(file, table)
    return sample


def read_paths_file(uri: str) -> list[str]:
    """The URIs listed in `uri`, one a line (blank lines and `#` comments skipped), each once."""
    try:
        text = storage.read_bytes(uri).decode("utf-8")
    except UnicodeDecodeError as error:
        raise PathsNotFound(f"{uri}: not a text file of paths ({error.reason})") from error
    lines = (line.strip() for line in text.splitlines())
    paths = list(dict.fromkeys(line for line in lines if line and not line.startswith("#")))
    if not paths:
        raise PathsNotFound(f"{uri}: names no path (one URI a line)")
    return paths


def rows_named(parts: Parts, paths: list[str], paths_uri: str) -> list[RowRef]:
    """Where the rows of `paths` are (one scan of the `path` column), in the order of the files.

    A local path matches a row as written or as an absolute path. Raises `PathsNotFound` naming
    how many paths have no row, and the first few.
    """
    forms = {
        path: {path} if "://" in path else {path, os.path.abspath(os.path.expanduser(path))} for path in paths
    }
    owner = {form: path for path, variants in forms.items() for form in variants}
    wanted = pa.array(sorted(owner), pa.string())
    refs: list[RowRef] = []
    found: set[str] = set()
    for file, table in scan(parts, ["path"]):
        column = table.column("path")
        hits = np.flatnonzero(pc.is_in(column, value_set=wanted).to_numpy(zero_copy_only=False))
        for row in hits.tolist():
            refs.append(RowRef(file, row))
            found.add(owner[column[row].as_py()])
    missing = [path for path in paths if path not in found]
    if missing:
        shown = ", ".join(missing[:MISSING_SHOWN]) + (", ..." if len(missing) > MISSING_SHOWN else "")
        raise PathsNotFound(
            f"{paths_uri}: {len(missing)} of its {len(paths)} paths have no row in {parts.uri}: {shown}"
        )
    return refs
