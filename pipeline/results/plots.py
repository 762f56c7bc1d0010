"""Small SVG charts of counts, written as text: horizontal bars, histograms, and histograms in small
multiples. A few hundred lines of SVG each, no plotting library, nothing to install.

Every text in a chart (a category name, a title) is XML-escaped: category names come from the
model's files and reach the page of a report. Each SVG has a fixed `width` and `height`, so a
browser sizes it as an image like a PNG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

WIDTH = 640
BAR = "#4c78a8"
MARK = "#e45756"
FONT = 'font-family="sans-serif" font-size="11"'
TITLE_FONT = 'font-family="sans-serif" font-size="14" font-weight="bold"'


def nice_step(maximum: float, ticks: int = 4) -> float:
    """A round step (1, 2 or 5 times a power of ten) that cuts `[0, maximum]` into about `ticks`."""
    if maximum <= 0:
        return 1.0
    raw = maximum / ticks
    power = 10 ** math.floor(math.log10(raw))
    return next(step * power for step in (1, 2, 5, 10) if step * power >= raw)


def _number(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) else f"{value:g}"


def _svg(width: int, height: int, title: str, body: list[str]) -> str:
    return "\n".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img">',
            f"<title>{escape(title)}</title>",
            f'<rect width="{width}" height="{height}" fill="white"/>',
            f'<text x="8" y="18" {TITLE_FONT}>{escape(title)}</text>',
            *body,
            "</svg>",
            "",
        ]
    )


def bar_chart(labels: Sequence[str], values: Sequence[float], title: str, value_label: str) -> str:
    """Horizontal bars, one per label, longest first as given; the value written after each bar."""
    row, top, left, right = 20, 34, 150, 80
    height = top + row * max(len(labels), 1) + 34
    peak = max(values, default=0) or 1
    span = WIDTH - left - right
    body = []
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        y = top + i * row
        length = span * value / peak
        body += [
            f'<text x="{left - 6}" y="{y + 14}" {FONT} text-anchor="end">{escape(_clip(label, 24))}</text>',
            f'<rect x="{left}" y="{y + 3}" width="{length:.1f}" height="{row - 6}" fill="{BAR}">'
            f"<title>{escape(label)}: {_number(value)}</title></rect>",
            f'<text x="{left + length + 4:.1f}" y="{y + 14}" {FONT}>{_number(value)}</text>',
        ]
    if not labels:
        body.append(f'<text x="{left}" y="{top + 14}" {FONT}>none</text>')
    body.append(f'<text x="{left}" y="{height - 10}" {FONT} fill="#555">{escape(value_label)}</text>')
    return _svg(WIDTH, height, title, body)


def _clip(text: str, length: int) -> str:
    return text if len(text) <= length else text[: length - 1] + "\u2026"


def histogram(
    counts: Sequence[int],
    title: str,
    x_label: str,
    ticks: Mapping[float, str],
    marks: Mapping[float, str] | None = None,
) -> str:
    """Vertical bars of equal width, bin `i` spanning `[i, i + 1)` on the x axis.

    `ticks`: x positions (in bins) -> label under the axis; `marks`: x positions -> a vertical
    line with a label (a threshold).
    """
    body = _bars(counts, 56, 34, WIDTH - 72, 190, ticks, marks or {})
    body.append(
        f'<text x="{WIDTH / 2}" y="270" {FONT} text-anchor="middle" fill="#555">{escape(x_label)}</text>'
    )
    return _svg(WIDTH, 280, title, body)


def small_multiples(
    series: Mapping[str, Sequence[int]], title: str, x_label: str, ticks: Mapping[float, str]
) -> str:
    """One small histogram per name of `series` (all with the same bins), three a row."""
    columns, cell_w, cell_h = 3, WIDTH // 3, 150
    rows = max(math.ceil(len(series) / columns), 1)
    body = []
    for i, (name, counts) in enumerate(series.items()):
        x0, y0 = (i % columns) * cell_w, 30 + (i // columns) * cell_h
        body.append(
            f'<text x="{x0 + 36}" y="{y0 + 16}" {FONT} font-weight="bold">{escape(_clip(name, 20))} '
            f"({_number(sum(counts))})</text>"
        )
        body += _bars(counts, x0 + 36, y0 + 24, cell_w - 48, cell_h - 62, ticks, {}, y_ticks=2)
    if not series:
        body.append(f'<text x="36" y="50" {FONT}>none</text>')
    height = 30 + rows * cell_h + 20
    body.append(
        f'<text x="{WIDTH / 2}" y="{height - 8}" {FONT} text-anchor="middle" fill="#555">'
        f"{escape(x_label)}</text>"
    )
    return _svg(WIDTH, height, title, body)


def _bars(
    counts: Sequence[int],
    left: float,
    top: float,
    width: float,
    height: float,
    ticks: Mapping[float, str],
    marks: Mapping[float, str],
    y_ticks: int = 4,
) -> list[str]:
    """The bars, axes, ticks and marks of one histogram in the box `left, top, width, height`."""
    bins = max(len(counts), 1)
    step = max(nice_step(max(counts, default=0), y_ticks), 1.0)  # counts: whole numbers
    ceiling = step * max(math.ceil(max(counts, default=0) / step), 1)
    bin_w = width / bins
    bottom = top + height
    body = []
    for k in range(int(ceiling / step) + 1):
        y = bottom - height * k * step / ceiling
        body += [
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + width}" y2="{y:.1f}" stroke="#ddd"/>',
            f'<text x="{left - 4}" y="{y + 4:.1f}" {FONT} text-anchor="end">{_number(k * step)}</text>',
        ]
    for i, count in enumerate(counts):
        if count:
            bar_h = height * count / ceiling
            body.append(
                f'<rect x="{left + i * bin_w:.1f}" y="{bottom - bar_h:.1f}" '
                f'width="{max(bin_w - 1, 0.5):.1f}" height="{bar_h:.1f}" fill="{BAR}">'
                f"<title>{_number(count)}</title></rect>"
            )
    body.append(f'<line x1="{left}" y1="{bottom}" x2="{left + width}" y2="{bottom}" stroke="#333"/>')
    for position, label in ticks.items():
        x = left + position * bin_w
        body.append(f'<text x="{x:.1f}" y="{bottom + 14}" {FONT} text-anchor="middle">{escape(label)}</text>')
    for k, (position, label) in enumerate(marks.items()):
        x = left + position * bin_w
        body += [
            f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="{MARK}" '
            'stroke-dasharray="4 3"/>',
            f'<text x="{x + 3:.1f}" y="{top + 10 + 13 * k}" {FONT} fill="{MARK}">{escape(label)}</text>',
        ]
    return body
