"""The HTML of a report's page: what made the rows, the counts, the errors by reason, the figures
and the gallery, one static file with relative links only (a bucket can serve it as it is).

Every string from the output (paths, error messages, category names, the model's URI) is
HTML-escaped: they are user data, and a path may hold `<script>`. The counts are marked with
`data-count` attributes and each gallery tile with the row's `data-path`, for scripts and tests.
"""

from __future__ import annotations

import datetime as dt
import posixpath
from dataclasses import dataclass
from html import escape
from urllib.parse import quote

from pipeline.results.figures import Figure
from pipeline.results.job_record import Provenance
from pipeline.results.statistics import OutputStatistics

STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border-bottom: 1px solid #ddd; padding: 0.25em 0.8em 0.25em 0; text-align: left; }
td { vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: 0.9em; word-break: break-all; }
figure { margin: 1em 0 2em; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; }
.tile { margin: 0; width: 240px; }
.tile img { width: 240px; height: auto; display: block; border: 1px solid #ccc; }
.tile figcaption { font-size: 0.8em; word-break: break-all; }
"""


@dataclass(frozen=True)
class Tile:
    """A gallery image: the row's path, the overlay's and the thumbnail's relative names, and
    the instances drawn out of the row's."""

    path: str
    full: str
    thumbnail: str
    drawn: int
    instances: int


@dataclass(frozen=True)
class Gallery:
    """The sampled images and how they were chosen; `failed`: a line per image not drawn."""

    tiles: list[Tile]
    eligible: int
    choice: str
    failed: list[str]


def e(value: object) -> str:
    return escape(str(value), quote=True)


def _when(moment: dt.datetime | None) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC") if moment else "unknown"


def _rows(pairs: list[tuple[str, str]]) -> str:
    return "\n".join(f"<tr><th>{e(name)}</th><td>{value}</td></tr>" for name, value in pairs)


def provenance_section(provenance: Provenance) -> str:
    record = provenance.record
    if record is None:
        return "<h2>What made these rows</h2><p>No job record: an output of a version that kept none.</p>"
    digest = str(record.get("model_sha256") or "")
    pixels = record.get("max_pixels")
    completed = (
        _when(provenance.completed_at)
        if provenance.completed_at
        else "not complete: no success marker (a run is going on, or stopped before the end)"
    )
    pairs = [
        ("model", f"<code>{e(record.get('model'))}</code>"),
        ("model sha256", f"<code>{e(digest[:16])}</code>"),
        ("score threshold", e(record.get("score_threshold"))),
        ("max pixels", e(f"{pixels:,}" if isinstance(pixels, int) else "unknown")),
        ("precision (--amp)", e(record.get("amp"))),
        ("project version", e(record.get("project_version"))),
        ("first run started", e(_when(provenance.recorded_at))),
        ("completed", e(completed)),
    ]
    return f"<h2>What made these rows</h2><table>{_rows(pairs)}</table>"


def counts_section(statistics: OutputStatistics, files: int) -> str:
    counts = [
        ("rows", "rows (images listed)", statistics.rows),
        ("segmented", "images segmented", statistics.segmented),
        ("errors", "error rows", statistics.errors),
        ("instances", "instances", statistics.instances),
        ("files", "part files", files),
    ]
    body = "\n".join(
        f'<tr><th>{e(label)}</th><td class="n" data-count="{key}">{value:,}</td></tr>'
        for key, label, value in counts
    )
    return f"<h2>Counts</h2><table>{body}</table>"


def errors_section(statistics: OutputStatistics) -> str:
    if not statistics.errors:
        return "<h2>Errors</h2><p>No error rows.</p>"
    body = []
    for reason, group in statistics.errors_by_reason():
        examples = "<br>".join(f"<code>{e(path)}</code>: {e(message)}" for path, message in group.examples)
        body.append(
            f'<tr data-reason="{e(reason)}"><td>{e(reason)}</td><td class="n" data-count="reason">'
            f"{group.count:,}</td><td>{examples}</td></tr>"
        )
    head = "<tr><th>reason (digits as #)</th><th>rows</th><th>examples</th></tr>"
    return f"<h2>Errors by reason</h2><table>{head}{''.join(body)}</table>"


def figures_section(figures: list[Figure], statistics: OutputStatistics, folder: str) -> str:
    parts = ["<h2>Figures</h2>"]
    for figure in figures:
        parts.append(
            f'<figure><img src="{quote(posixpath.join(folder, figure.name))}" alt="{e(figure.title)}">'
        )
        if figure.name == "categories.svg":
            rows = "".join(
                f'<tr data-category="{e(name)}"><td>{e(name)}</td><td class="n">{count:,}</td></tr>'
                for name, count in statistics.categories_by_count()
            )
            parts.append(
                "<details><summary>instances per category, as numbers</summary>"
                f"<table>{rows}</table></details>"
            )
        parts.append("</figure>")
    return "\n".join(parts)


def gallery_section(gallery: Gallery) -> str:
    tiles = []
    for tile in gallery.tiles:
        caption = f"{posixpath.basename(tile.path)}: {tile.drawn} of {tile.instances} instances drawn"
        tiles.append(
            f'<figure class="tile" data-path="{e(tile.path)}"><a href="{quote(tile.full)}">'
            f'<img src="{quote(tile.thumbnail)}" alt="{e(tile.path)}"></a>'
            f'<figcaption title="{e(tile.path)}">{e(caption)}</figcaption></figure>'
        )
    failed = "".join(f"<li>{e(line)}</li>" for line in gallery.failed)
    return (
        f"<h2>Gallery</h2><p>{len(gallery.tiles):,} images of the {gallery.eligible:,} eligible rows, "
        f"{e(gallery.choice)}; click one for its full size.</p>"
        f'<div class="gallery">{"".join(tiles)}</div>'
        + (f"<p>Not drawn:</p><ul>{failed}</ul>" if failed else "")
    )


def page(
    predictions_uri: str,
    provenance: Provenance,
    statistics: OutputStatistics,
    files: int,
    figures: list[Figure],
    figures_folder: str,
    gallery: Gallery,
) -> str:
    """The whole page."""
    made = dt.datetime.now(dt.UTC)
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            # No icon: a browser would ask the server's root for /favicon.ico, outside the report.
            '<link rel="icon" href="data:,">',
            f"<title>Segmentation report: {e(predictions_uri)}</title>",
            f"<style>{STYLE}</style></head><body>",
            f"<h1>Segmentation report</h1><p><code>{e(predictions_uri)}</code>, read {e(_when(made))}</p>",
            provenance_section(provenance),
            counts_section(statistics, files),
            errors_section(statistics),
            figures_section(figures, statistics, figures_folder),
            gallery_section(gallery),
            "</body></html>",
            "",
        ]
    )
