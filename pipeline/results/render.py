"""The overlay of one output row: its image, read from the row's `path` (local or `s3://`) and shown
as the row describes it (EXIF orientation applied, as `jobs.segment` decoded it), with the masks,
boxes, categories and scores of its instances drawn by `mrcnn.overlay.draw_instances`.

The image is decoded by `mrcnn.images.decode_image` with a pixel limit checked from the header
before any pixel is decoded (image bombs): the output's own `--max-pixels` where its job record
says it, else `MAX_PIXELS`, the default of `jobs.segment`. An image that is gone, refused or of
another size than its row says (changed since it was segmented) raises `RenderError`, one line,
which the callers report and skip.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import re
from collections.abc import Iterable, Iterator

import numpy as np
from PIL import Image

from mrcnn import storage
from mrcnn.errors import UserError
from mrcnn.images import ImageDecodeError, decode_image
from mrcnn.overlay import draw_instances
from mrcnn.rle import decode_masks
from pipeline.results.job_record import Provenance
from pipeline.results.reading import Parts, RowRef, iter_rows
from pipeline.results.selection import InstanceFilter

MAX_PIXELS = 100_000_000
THUMBNAIL_SIDE = 320
NAME_CHARS = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class RenderError(UserError):
    """A row whose overlay cannot be drawn (one line naming its path)."""


def draw_row(
    row: dict, instance_filter: InstanceFilter | None = None, max_pixels: int = MAX_PIXELS
) -> Image.Image:
    """The overlay of `row` (a dict of `pipeline.results.reading.ROW_COLUMNS`) as an RGB image of
    the row's `width x height`, showing the instances `instance_filter` keeps (all: None)."""
    path = row["path"]
    if row["error"] is not None:
        raise RenderError(f"{path}: an error row ({row['error']}), nothing to draw")
    try:
        pixels = decode_image(storage.read_bytes(path), max_pixels=max_pixels, orientation="apply")
    except (ImageDecodeError, storage.StorageError) as error:
        raise RenderError(f"{path}: cannot draw ({error})") from error
    height, width = row["height"], row["width"]
    if pixels.shape[:2] != (height, width):
        raise RenderError(
            f"{path}: the image is {pixels.shape[1]}x{pixels.shape[0]} but its row says {width}x{height} "
            "(changed since it was segmented?)"
        )
    kept = (instance_filter or InstanceFilter()).kept(row["scores"], row["categories"])
    masks = decode_masks([row["masks"][i].encode("ascii") for i in kept], height, width)
    boxes = np.array([row["boxes"][i] for i in kept], np.float32).reshape(-1, 4)
    captions = [f"{row['categories'][i]} {row['scores'][i]:.2f}" for i in kept]
    return draw_instances(pixels, masks, boxes, captions)


def thumbnail(image: Image.Image, side: int = THUMBNAIL_SIDE) -> Image.Image:
    """`image` scaled down to fit `side x side` (never up)."""
    small = image.copy()
    small.thumbnail((side, side), Image.Resampling.LANCZOS)
    return small


def encoded(image: Image.Image, kind: str) -> bytes:
    """`image` as `"png"` or `"jpeg"` (quality 90) bytes."""
    buffer = io.BytesIO()
    if kind == "png":
        image.save(buffer, "PNG")
    else:
        image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


class OverlayNames:
    """A file name per path, safe in a URL and on any disk: the path's base name without its
    extension, other characters than letters, digits, `.`, `_` and `-` as `_`; a name given
    already in this run gets 8 hex digits of the path's sha1 added."""

    def __init__(self, extension: str) -> None:
        self.extension = extension
        self._given: set[str] = set()

    def __call__(self, path: str) -> str:
        stem = _UNSAFE.sub("_", posixpath.splitext(posixpath.basename(path))[0])[:NAME_CHARS] or "image"
        name = f"{stem}.{self.extension}"
        if name in self._given:
            name = f"{stem}-{hashlib.sha1(path.encode()).hexdigest()[:8]}.{self.extension}"
        self._given.add(name)
        return name


def pixel_limit(made: Provenance) -> int:
    """The pixel limit of the images of an output: its own `--max-pixels`, else `MAX_PIXELS`."""
    limit = (made.record or {}).get("max_pixels")
    return limit if isinstance(limit, int) and limit > 0 else MAX_PIXELS


def draw_rows(
    parts: Parts, refs: Iterable[RowRef], instance_filter: InstanceFilter, max_pixels: int
) -> Iterator[tuple[dict, Image.Image | None, str | None]]:
    """`(row, overlay, None)` for each row at `refs`, or `(row, None, why)` when it cannot be
    drawn; one part file's rows in memory at a time, one image decoded at a time."""
    for row in iter_rows(parts, refs):
        try:
            yield row, draw_row(row, instance_filter, max_pixels), None
        except RenderError as error:
            yield row, None, str(error)
