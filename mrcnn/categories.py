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


def category_of(categories: tuple[Category, ...], label: int) -> Category:
    """The category behind a model's label `label` (1..K, 0 being the background)."""
    if not 1 <= label <= len(categories):
        raise ValueError(f"label {label} is not one of the model's 1..{len(categories)}")
    return categories[label - 1]
