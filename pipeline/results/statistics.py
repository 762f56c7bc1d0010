"""What an output holds, counted by streaming its Parquet columns a part file at a time: rows,
error rows grouped by reason (with a few example paths each), instances per category, the score
distribution per category, instance sizes and instances per image.

Memory is bounded whatever the output's size: counters, histograms with fixed bins, at most
`MAX_REASONS` reasons with `EXAMPLES_PER_REASON` examples each; the `masks` column is never read.
Each part file costs a few pyarrow and numpy calls over its flattened columns (no Python work per
row or per instance, except per error row's group).

Instance size is the box's area (`(x2 - x1) * (y2 - y1)` in displayed pixels), not the mask's:
it comes from the `boxes` column at numpy speed, where a mask's area means decoding its RLE. The
histogram is of its square root (the side of a square of that area) on half-octave bins, with
COCO's small / medium / large limits (32^2 and 96^2 pixels of area) marked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.results.selection import segmented

COLUMNS = ["path", "error", "categories", "scores", "boxes"]
SCORE_BINS = 20
"""Bins of the score histograms, over [0, 1]."""
MAX_INSTANCES = 100
"""Instances per image: one bin each from 0 to 99, and one for 100 or more."""
SIZE_EDGES = 2.0 ** (np.arange(31) / 2)
"""Bin edges of sqrt(box area), 1 px to 32768 px in half-octaves (below 1 and above: a bin each)."""
COCO_SMALL_AREA = 32**2
COCO_MEDIUM_AREA = 96**2
EXAMPLES_PER_REASON = 3
MAX_REASONS = 200
# An error's group: its message with every run of digits as '#', and at most this many characters.
REASON_CHARS = 200
OTHER_REASONS = "(other reasons)"


@dataclass
class ErrorReason:
    """Error rows of one reason: how many, and the first few `(path, message)`."""

    count: int = 0
    examples: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class OutputStatistics:
    """Counts over every row added (`add`); `columns` are what `add` reads."""

    rows: int = 0
    errors: int = 0
    instances: int = 0
    reasons: dict[str, ErrorReason] = field(default_factory=dict)
    per_category: dict[str, int] = field(default_factory=dict)
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    sizes: np.ndarray = field(default_factory=lambda: np.zeros(len(SIZE_EDGES) + 1, np.int64))
    size_classes: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("small", "medium", "large"), 0)
    )
    instances_per_image: np.ndarray = field(default_factory=lambda: np.zeros(MAX_INSTANCES + 1, np.int64))

    columns = COLUMNS

    @property
    def segmented(self) -> int:
        """Rows without an error."""
        return self.rows - self.errors

    def add(self, table: pa.Table) -> None:
        """Count the rows of `table` (at least `COLUMNS`)."""
        self.rows += table.num_rows
        ok = segmented(table)
        self.errors += int(table.num_rows - ok.sum())
        if not ok.all():
            self._add_errors(table.filter(pa.array(~ok)))
        scores = table.column("scores").combine_chunks()
        lengths = pc.fill_null(pc.list_value_length(scores), 0).to_numpy(zero_copy_only=False)
        self.instances_per_image += np.bincount(
            np.minimum(lengths[ok], MAX_INSTANCES), minlength=MAX_INSTANCES + 1
        )
        flat_scores = pc.fill_null(pc.list_flatten(scores), 0.0).to_numpy(zero_copy_only=False)
        self.instances += len(flat_scores)
        self._add_categories(table.column("categories").combine_chunks(), flat_scores)
        self._add_sizes(table.column("boxes").combine_chunks())

    def _add_errors(self, errors: pa.Table) -> None:
        messages = errors.column("error").combine_chunks()
        keys = pc.utf8_slice_codeunits(pc.replace_substring_regex(messages, r"\d+", "#"), 0, REASON_CHARS)
        counted = pc.value_counts(keys)
        for key, count in zip(
            counted.field("values").to_pylist(), counted.field("counts").to_pylist(), strict=True
        ):
            if key not in self.reasons and len(self.reasons) >= MAX_REASONS:
                key = OTHER_REASONS
            reason = self.reasons.setdefault(key, ErrorReason())
            reason.count += count
            wanted = EXAMPLES_PER_REASON - len(reason.examples)
            if wanted > 0:
                rows = np.flatnonzero(pc.equal(keys, key).to_numpy(zero_copy_only=False))[:wanted].tolist()
                examples = errors.take(pa.array(rows, pa.int64())).select(["path", "error"]).to_pylist()
                reason.examples += [(example["path"], example["error"]) for example in examples]

    def _add_categories(self, categories: pa.Array, flat_scores: np.ndarray) -> None:
        names = pc.fill_null(pc.list_flatten(categories), "(no name)")
        if len(names) != len(flat_scores):
            raise ValueError(f"{len(names)} category names but {len(flat_scores)} scores in one part file")
        if not len(names):
            return
        encoded = pc.dictionary_encode(names)
        codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        bins = np.clip((flat_scores * SCORE_BINS).astype(np.int64), 0, SCORE_BINS - 1)
        dictionary = encoded.dictionary.to_pylist()
        counts = np.bincount(codes * SCORE_BINS + bins, minlength=len(dictionary) * SCORE_BINS)
        for name, histogram in zip(dictionary, counts.reshape(-1, SCORE_BINS), strict=True):
            self.per_category[name] = self.per_category.get(name, 0) + int(histogram.sum())
            self.scores[name] = self.scores.get(name, np.zeros(SCORE_BINS, np.int64)) + histogram

    def _add_sizes(self, boxes: pa.Array) -> None:
        flat = pc.list_flatten(boxes)
        if not len(flat):
            return
        xyxy = pc.fill_null(flat.flatten(), 0.0).to_numpy(zero_copy_only=False).reshape(-1, 4)
        area = np.clip(xyxy[:, 2] - xyxy[:, 0], 0, None) * np.clip(xyxy[:, 3] - xyxy[:, 1], 0, None)
        self.sizes += np.bincount(
            np.searchsorted(SIZE_EDGES, np.sqrt(area), side="right"), minlength=len(self.sizes)
        )
        small = int((area < COCO_SMALL_AREA).sum())
        large = int((area >= COCO_MEDIUM_AREA).sum())
        self.size_classes["small"] += small
        self.size_classes["large"] += large
        self.size_classes["medium"] += len(area) - small - large

    def errors_by_reason(self) -> list[tuple[str, ErrorReason]]:
        """The reasons, most frequent first."""
        return sorted(self.reasons.items(), key=lambda item: (-item[1].count, item[0]))

    def categories_by_count(self) -> list[tuple[str, int]]:
        """(category, instances), most frequent first."""
        return sorted(self.per_category.items(), key=lambda item: (-item[1], item[0]))
