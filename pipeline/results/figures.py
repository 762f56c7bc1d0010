"""The report's pictures of `pipeline.results.statistics.OutputStatistics`, as SVG text: instances
per category, the score distribution per category, instance sizes and instances per image."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.results import plots
from pipeline.results.statistics import (
    COCO_MEDIUM_AREA,
    COCO_SMALL_AREA,
    MAX_INSTANCES,
    SCORE_BINS,
    OutputStatistics,
)

# Categories named in the bar chart (the rest are one bar) and given a score histogram.
BAR_CATEGORIES = 30
SCORE_CATEGORIES = 12


@dataclass(frozen=True)
class Figure:
    """One picture of the report: its file name, what it shows (its `alt` text) and its SVG."""

    name: str
    title: str
    svg: str


def figures(statistics: OutputStatistics) -> list[Figure]:
    """The report's figures, in the order of the page."""
    return [
        _categories(statistics),
        _scores(statistics),
        _sizes(statistics),
        _instances_per_image(statistics),
    ]


def _categories(statistics: OutputStatistics) -> Figure:
    ranked = statistics.categories_by_count()
    shown = ranked[:BAR_CATEGORIES]
    labels, values = [name for name, _ in shown], [count for _, count in shown]
    if len(ranked) > BAR_CATEGORIES:
        labels.append(f"{len(ranked) - BAR_CATEGORIES} other categories")
        values.append(sum(count for _, count in ranked[BAR_CATEGORIES:]))
    title = "Instances per category"
    return Figure("categories.svg", title, plots.bar_chart(labels, values, title, "instances"))


def _scores(statistics: OutputStatistics) -> Figure:
    ranked = statistics.categories_by_count()[:SCORE_CATEGORIES]
    series = {name: statistics.scores[name].tolist() for name, _ in ranked}
    title = "Score distribution per category"
    if len(statistics.per_category) > SCORE_CATEGORIES:
        title += f" (the {SCORE_CATEGORIES} with the most instances)"
    ticks = {SCORE_BINS * fraction: f"{fraction:g}" for fraction in (0, 0.5, 1)}
    return Figure("scores.svg", title, plots.small_multiples(series, title, "score", ticks))


def _sizes(statistics: OutputStatistics) -> Figure:
    # Bin 0 is below 1 px, bin i + 1 starts at edge i = 2 ** (i / 2) px: edge 2 ** j sits at 2 j + 1.
    ticks = {2 * j + 1: f"{2**j:,}" for j in range(0, 16, 2)}
    marks = {
        2 * math.log2(math.sqrt(COCO_SMALL_AREA)) + 1: "COCO small | medium",
        2 * math.log2(math.sqrt(COCO_MEDIUM_AREA)) + 1: "medium | large",
    }
    classes = statistics.size_classes
    title = (
        f"Instance sizes: {classes['small']:,} small, {classes['medium']:,} medium, "
        f"{classes['large']:,} large"
    )
    x_label = "square root of the box's area (pixels of the displayed image), log scale"
    return Figure(
        "sizes.svg", title, plots.histogram(statistics.sizes.tolist(), title, x_label, ticks, marks)
    )


def _instances_per_image(statistics: OutputStatistics) -> Figure:
    counts = statistics.instances_per_image
    used = np.flatnonzero(counts)
    shown = max(int(used[-1]) + 1 if len(used) else 0, 11)
    step = int(plots.nice_step(shown, 5))
    ticks = {k + 0.5: str(k) for k in range(0, shown, step)}
    if shown > MAX_INSTANCES:
        ticks[MAX_INSTANCES + 0.5] = f"{MAX_INSTANCES}+"
    title = f"Instances per image ({statistics.segmented:,} images segmented)"
    return Figure(
        "instances_per_image.svg",
        title,
        plots.histogram(counts[:shown].tolist(), title, "instances in the image", ticks),
    )
