"""A static HTML report of a segmentation output: `OUTPUT/index.html`, its figures under `plots/`
and its gallery under `gallery/` (full-size overlays, thumbnails under `gallery/thumbs/`), all
linked by relative paths, so that the folder, or the `s3://` prefix a bucket serves, is the report.

One scan of the output reads the few columns the statistics and the sample need, a part file at a
time (`pipeline.results.statistics`, `pipeline.results.selection`); the gallery's rows are then
fetched with their masks from the files that hold them (`pipeline.results.reading.iter_rows`)
and drawn one by one (`pipeline.results.render`). What made the rows comes from the output's job
record (`pipeline.results.job_record`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pipeline.results import page, publish
from pipeline.results.figures import figures
from pipeline.results.job_record import read_provenance
from pipeline.results.reading import Parts, RowRef, list_parts, scan
from pipeline.results.render import OverlayNames, draw_rows, encoded, pixel_limit, thumbnail
from pipeline.results.selection import InstanceFilter, RowSample
from pipeline.results.statistics import OutputStatistics

INDEX = "index.html"
PLOTS = "plots"
GALLERY = "gallery"
THUMBNAILS = "gallery/thumbs"
DEFAULT_SAMPLE = 24


@dataclass(frozen=True)
class Report:
    """What `write_report` wrote: the page's URI, the statistics, the gallery."""

    index_uri: str
    statistics: OutputStatistics
    gallery: page.Gallery


def write_report(
    predictions_uri: str,
    output_uri: str,
    sample: int = DEFAULT_SAMPLE,
    seed: int = 0,
    min_score: float | None = None,
    categories: Iterable[str] | None = None,
) -> Report:
    """Write the report of the output at `predictions_uri` under `output_uri`.

    The gallery is a uniform sample of `sample` segmented rows (seeded by `seed`); with
    `min_score` or `categories`, of the rows having an instance that scores at least `min_score`
    in one of `categories`, with only those instances drawn. Raises `reading.NoPredictions`
    when there is no output and `publish.OutputNotWritable` before any work when `output_uri`
    cannot be written.
    """
    parts = list_parts(predictions_uri)
    publish.check_writable(output_uri)
    instance_filter = InstanceFilter(min_score, frozenset(categories) if categories is not None else None)
    statistics = OutputStatistics()
    chosen = RowSample(sample, seed, instance_filter)
    for file, table in scan(parts, sorted(set(statistics.columns) | set(chosen.columns))):
        statistics.add(table)
        chosen.add(file, table)
    made = read_provenance(predictions_uri)
    tiles, failed = write_gallery(parts, chosen.refs(), output_uri, instance_filter, pixel_limit(made))
    gallery = page.Gallery(tiles, chosen.eligible, _choice(sample, seed, instance_filter), failed)
    drawn = figures(statistics)
    for figure in drawn:
        publish.write_file(output_uri, f"{PLOTS}/{figure.name}", figure.svg.encode())
    html = page.page(predictions_uri, made, statistics, len(parts.files), drawn, PLOTS, gallery)
    return Report(publish.write_file(output_uri, INDEX, html.encode()), statistics, gallery)


def write_gallery(
    parts: Parts, refs: list[RowRef], output_uri: str, instance_filter: InstanceFilter, max_pixels: int
) -> tuple[list[page.Tile], list[str]]:
    """Draw the rows at `refs` as full-size overlays and thumbnails under `output_uri`: their
    tiles (sorted by path), and a line per row that could not be drawn (not the end of the
    report)."""
    names = OverlayNames("jpg")
    tiles, failed = [], []
    for row, drawing, why in draw_rows(parts, refs, instance_filter, max_pixels):
        if drawing is None:
            failed.append(why)
            continue
        name = names(row["path"])
        full, small = f"{GALLERY}/{name}", f"{THUMBNAILS}/{name}"
        publish.write_file(output_uri, full, encoded(drawing, "jpeg"))
        publish.write_file(output_uri, small, encoded(thumbnail(drawing), "jpeg"))
        drawn = len(instance_filter.kept(row["scores"], row["categories"]))
        tiles.append(page.Tile(row["path"], full, small, drawn, len(row["scores"])))
    return sorted(tiles, key=lambda tile: tile.path), failed


def _choice(sample: int, seed: int, instance_filter: InstanceFilter) -> str:
    """How the gallery's rows were chosen, in words."""
    words = [f"a uniform sample of {sample} (seed {seed})"]
    if instance_filter.min_score is not None:
        words.append(f"instances scoring at least {instance_filter.min_score:g}")
    if instance_filter.categories is not None:
        words.append("categories " + ", ".join(sorted(instance_filter.categories)))
    return "; ".join(words)
