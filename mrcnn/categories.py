"""The category of a dataset or a model: an original (COCO) id and a name.

A model's label `i` (1..K) is `categories[i - 1]`; ids may have gaps, labels never do.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Category:
    """One object category: `id` as in the dataset (COCO ids may have gaps), `name` for people."""

    id: int
    name: str
