"""COCO files of a segmentation output: an instances file to train the next model on or to open in
other tools (`export_coco`), and the results list COCO's tools and Detectron2 write
(`export_results`).

Both stream: rows come from the committed part files one by one (`pipeline.segment.output.scan_parts`)
and the JSON is written item by item into a local file (the instances file's annotations into a
second one, appended after its images), which is published whole at the end: on local disk a
hidden file beside the target renamed into place, on S3 one upload that appears when it completes.
Memory holds the rows in flight and the categories, never the output. Error rows are skipped and
counted; instances below `min_score` are dropped.

Orientation: the rows describe the displayed image (EXIF applied), but `jobs.train` reads images
as stored by default (`--exif-orientation stored`, as COCO was annotated) and `jobs.evaluate`
scores rows against annotations of the stored pixels. With `orientation="stored"` (the default of
both) each row's image is read for its EXIF tag and the masks, boxes and size of a rotated or
flipped image are mapped to the stored pixels (`mrcnn.orientation`); "apply" keeps the rows as
they are. Only the header is read where it holds the tag (JPEG and TIFF: the first `HEAD_BYTES`;
a PNG whose tag may follow its pixels and other formats are read whole), `THREADS` images at a
time and at most `IN_FLIGHT` rows ahead of the writer. A row whose image is gone is skipped and
counted: nothing can tell its stored orientation.

Images get ids 1..N in the order of the rows, annotations 1..M. `file_name` is the row's path
relative to `images_root` (a path outside it is an `ExportError` naming it), or the path itself
without one. Categories are the model's (`_JOB.json` names it, `mrcnn.model_spec.load_spec` reads
it; torchvision's unused "N/A" ids left out) plus any id a row holds that the model lacks; when
the model cannot be read, those of the rows, with a note. The results list matches rows to the
images of a COCO file as `jobs.evaluate` does: by `IMAGES_ROOT/file_name`, or without a root by
the `file_name` a path ends with (at a `/`).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from PIL import Image

from mrcnn import rle, storage
from mrcnn.coco import read_coco
from mrcnn.errors import UserError, one_line
from mrcnn.model_spec import load_spec
from mrcnn.orientation import boxes_to_stored, exif_orientation, mask_to_stored, stored_size
from pipeline.results.publish import staged
from pipeline.segment import output, provenance

FORMATS = ("coco", "coco-results")
COLUMNS = ["path", "width", "height", "category_ids", "categories", "scores", "boxes", "masks", "error"]
# Bytes read first from each image: the EXIF segment of a JPEG sits before its pixels, well inside.
HEAD_BYTES = 64 << 10
THREADS = 8
IN_FLIGHT = 4 * THREADS
_UNUSED_NAME = "N/A"  # torchvision's name for the COCO ids its 91 labels keep unused
_MISSING = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
T = TypeVar("T")
R = TypeVar("R")


class ExportError(UserError):
    """Predictions, annotations or an output that cannot be exported; the message is one line."""


@dataclass(frozen=True)
class ExportSummary:
    """What an export wrote: `images` (rows exported), `instances` (annotations or results),
    and what it left out: error rows, instances under the score, rows whose image is gone
    (`first_missing` names one), rows matching no annotated image (results)."""

    output: str
    format: str
    orientation: str
    images: int
    instances: int
    error_rows: int
    below_min_score: int
    reoriented: int
    missing_images: int
    unmatched_rows: int
    categories: int
    first_missing: str | None = None
    first_unmatched: str | None = None
    notes: tuple[str, ...] = ()

    def line(self) -> str:
        kind = "annotations" if self.format == "coco" else "results"
        text = f"{self.images} images, {self.instances} {kind}"
        if self.format == "coco":
            text += f", {self.categories} categories"
        text += f" -> {self.output} ({self.format}, {self.orientation} orientation"
        text += f", {self.reoriented} images turned to their stored pixels)" if self.reoriented else ")"
        left_out = [
            f"{self.error_rows} error rows",
            f"{self.below_min_score} instances below --min-score",
            f"{self.missing_images} rows whose image is gone"
            + (f" (e.g. {self.first_missing})" if self.first_missing else ""),
        ]
        if self.format == "coco-results":
            left_out.append(f"{self.unmatched_rows} rows not in the annotations")
        return f"{text}; skipped: {', '.join(left_out)}"


@dataclass
class _Counts:
    images: int = 0
    instances: int = 0
    error_rows: int = 0
    below_min_score: int = 0
    reoriented: int = 0
    missing_images: int = 0
    unmatched_rows: int = 0
    first_missing: str | None = None
    first_unmatched: str | None = None
    categories: dict[int, str] = field(default_factory=dict)

    def count(self, converted: _Converted | None, path: str) -> bool:
        """Count one converted row (None: its image is gone); True when it is to be written."""
        if converted is None:
            self.missing_images += 1
            self.first_missing = self.first_missing or path
            return False
        self.images += 1
        self.instances += len(converted.instances)
        self.below_min_score += converted.below_min_score
        self.reoriented += converted.orientation != 1
        return True


@dataclass(frozen=True)
class _Converted:
    """One row in the orientation asked for: `instances` are dicts with `category_id`, `name`,
    `score`, `bbox` [x, y, w, h], `segmentation` {"size": [h, w], "counts": str} and `area`."""

    path: str
    width: int
    height: int
    orientation: int
    instances: list[dict]
    below_min_score: int


def export_coco(
    predictions_uri: str,
    output_uri: str,
    images_root: str | None = None,
    min_score: float = 0.0,
    orientation: str = "stored",
) -> ExportSummary:
    """Write the COCO instances file of the output at `predictions_uri` to `output_uri`."""
    prefix = _root_prefix(images_root)
    record = _job_record(predictions_uri)
    model_categories, notes = _model_categories(record.get("model"))
    counts = _Counts()
    with staged(output_uri) as (local, folder):
        annotations_path = os.path.join(folder, "annotations.part")
        with open(local, "w") as out, open(annotations_path, "w+") as annotations:
            info = {"description": f"jobs.export of {predictions_uri}", "model": record.get("model"),
                    "version": provenance.project_version(), "orientation": orientation}  # fmt: skip
            out.write(f'{{"info": {json.dumps(info)}, "licenses": [], "images": [')
            rows = _rows(predictions_uri, counts)
            for row, converted in _in_order(rows, lambda row: _convert(row, orientation, min_score)):
                if not counts.count(converted, row["path"]):
                    continue
                image = {"id": counts.images, "file_name": _file_name(row["path"], prefix),
                         "width": converted.width, "height": converted.height}  # fmt: skip
                _write_item(out, counts.images, image)
                first = counts.instances - len(converted.instances)
                for number, instance in enumerate(converted.instances, start=first + 1):
                    counts.categories.setdefault(instance["category_id"], instance.pop("name"))
                    annotation = {"id": number, "image_id": counts.images, **instance, "iscrowd": 0}
                    _write_item(annotations, number, annotation)
            out.write('\n], "annotations": [')
            annotations.seek(0)
            shutil.copyfileobj(annotations, out)
            categories = _merge_categories(model_categories, counts.categories)
            out.write(f'\n], "categories": {json.dumps(categories)}}}\n')
    return _summary(output_uri, "coco", orientation, counts, len(categories), notes)


def export_results(
    predictions_uri: str,
    output_uri: str,
    annotations_uri: str,
    images_root: str | None = None,
    min_score: float = 0.0,
    orientation: str = "stored",
    strict: bool = False,
) -> ExportSummary:
    """Write the COCO results list of the output's rows that match an image of `annotations_uri`.

    Rows matching no annotated image are counted, or with `strict` an `ExportError` (nothing is
    written). A second row for one image, or a row whose size (in `orientation`) is not the
    image's, is an `ExportError`, as in `jobs.evaluate`.
    """
    index = _image_index(read_coco(annotations_uri, images_root="").ground_truth["images"], images_root)
    counts = _Counts()
    matched: set[int] = set()

    def matching(rows: Iterator[dict]) -> Iterator[dict]:
        for row in rows:
            image = _match(row["path"], index, by_suffix=images_root is None)
            if image is None:
                counts.unmatched_rows += 1
                counts.first_unmatched = counts.first_unmatched or row["path"]
                continue
            if image["id"] in matched:
                raise ExportError(f"{row['path']}: a second row for image {image['file_name']}")
            matched.add(image["id"])
            yield {**row, "image": image}

    with staged(output_uri) as (local, _), open(local, "w") as out:
        out.write("[")
        rows = matching(_rows(predictions_uri, counts))
        for row, converted in _in_order(rows, lambda row: _convert(row, orientation, min_score)):
            if not counts.count(converted, row["path"]):
                continue
            image = row["image"]
            if (converted.width, converted.height) != (image["width"], image["height"]):
                raise ExportError(
                    f"{row['path']}: the row is {converted.width}x{converted.height} in {orientation} "
                    f"orientation but {annotations_uri} says {image['width']}x{image['height']}"
                )
            first = counts.instances - len(converted.instances)
            for number, instance in enumerate(converted.instances, start=first + 1):
                result = {"image_id": image["id"], "category_id": instance["category_id"],
                          "bbox": instance["bbox"], "score": instance["score"],
                          "segmentation": instance["segmentation"]}  # fmt: skip
                _write_item(out, number, result)
        out.write("\n]\n")
        if strict and counts.unmatched_rows:
            raise ExportError(
                f"{counts.unmatched_rows} rows have no image in {annotations_uri} (first: "
                f"{counts.first_unmatched}); check --images-root, or leave out --strict to skip them"
            )
    return _summary(output_uri, "coco-results", orientation, counts, 0, ())


def _summary(output_uri, kind, orientation, counts: _Counts, categories: int, notes) -> ExportSummary:
    return ExportSummary(
        output=output_uri, format=kind, orientation=orientation, images=counts.images,
        instances=counts.instances, error_rows=counts.error_rows,
        below_min_score=counts.below_min_score, reoriented=counts.reoriented,
        missing_images=counts.missing_images, unmatched_rows=counts.unmatched_rows,
        categories=categories, first_missing=counts.first_missing,
        first_unmatched=counts.first_unmatched, notes=tuple(notes),
    )  # fmt: skip


def _rows(predictions_uri: str, counts: _Counts) -> Iterator[dict]:
    """The output's rows without its error rows (counted), part file by part file."""
    listed = output.part_files(predictions_uri)
    if not listed[1]:
        raise ExportError(f"{predictions_uri}: no segmentation output there (no part files)")
    for batch in output.scan_parts(predictions_uri, COLUMNS, listed):
        for row in batch.to_pylist():
            if row["error"] is not None:
                counts.error_rows += 1
                continue
            yield row


def _in_order(items: Iterator[T], work: Callable[[T], R]) -> Iterator[tuple[T, R]]:
    """`(item, work(item))` in the order of `items`, `THREADS` at a time, `IN_FLIGHT` at most ahead."""
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        pending: deque = deque()
        for item in items:
            pending.append((item, pool.submit(work, item)))
            if len(pending) >= IN_FLIGHT:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def _convert(row: dict, orientation: str, min_score: float) -> _Converted | None:
    """The row's instances of at least `min_score`, on the stored pixels (`orientation="stored"`)
    or as displayed; None when the stored orientation is asked for and the image is gone."""
    tag = 1
    if orientation == "stored":
        found = _read_orientation(row["path"])
        if found is None:
            return None
        tag = found
    width, height = row["width"], row["height"]
    stored_width, stored_height = stored_size(tag, width, height)
    boxes = boxes_to_stored(np.asarray(row["boxes"], np.float32), tag, width, height)
    names = row["categories"] or [str(category) for category in row["category_ids"]]
    instances = []
    for index, score in enumerate(row["scores"]):
        if score < min_score:
            continue
        counts = row["masks"][index]
        if tag != 1:
            counts = rle.encode_mask(mask_to_stored(rle.rle_to_mask(counts, height, width), tag)).decode()
        segmentation = {"size": [stored_height, stored_width], "counts": counts}
        x0, y0, x1, y1 = boxes[index].tolist()
        instances.append({
            "category_id": row["category_ids"][index], "name": names[index],
            "segmentation": segmentation, "area": rle.area(segmentation),
            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score,
        })  # fmt: skip
    dropped = len(row["scores"]) - len(instances)
    return _Converted(row["path"], stored_width, stored_height, tag, instances, dropped)


def _read_orientation(uri: str) -> int | None:
    """The EXIF orientation of the image at `uri` (1: none), from its header where that holds the
    tag; None when the image is not there to read."""
    filesystem, path = storage.resolve(uri)
    try:
        with filesystem.open_input_file(path) as file:
            data = file.read(HEAD_BYTES)
            if len(data) == HEAD_BYTES and not _header_holds_tag(data):
                data += file.read()
    except _MISSING:
        return None
    except OSError as error:
        raise storage.StorageError(f"{uri}: cannot read ({one_line(error)})") from error
    return exif_orientation(data)


def _header_holds_tag(head: bytes) -> bool:
    """Whether the first bytes of an image hold its EXIF orientation, if it has one: a JPEG's or
    TIFF's tags are parsed when it opens; a PNG's eXIf chunk may follow its pixels."""
    try:
        with Image.open(io.BytesIO(head)) as image:
            return image.format in ("JPEG", "MPO", "TIFF") or (image.format == "PNG" and "exif" in image.info)
    except Exception:  # a header Pillow cannot open: read the whole file, as decoding does
        return False


def _write_item(out, number: int, item: dict) -> None:
    """Item `number` (1, 2, ...) of a JSON array being written, one per line."""
    out.write(("\n" if number == 1 else ",\n") + json.dumps(item, separators=(",", ":")))


def _root_prefix(images_root: str | None) -> str | None:
    if images_root is None:
        return None
    filesystem, root = storage.resolve(images_root)
    return storage.to_uri(filesystem, root).rstrip("/") + "/"


def _file_name(path: str, prefix: str | None) -> str:
    if prefix is None:
        return path
    if not path.startswith(prefix):
        raise ExportError(f"{path}: not under --images-root {prefix.rstrip('/')}")
    return path[len(prefix) :]


def _image_index(images: list[dict], images_root: str | None) -> dict[str, dict]:
    """The key a row's path is looked up with -> the COCO image record (as `jobs.evaluate`)."""
    prefix = _root_prefix(images_root)
    if prefix is None:
        return {image["file_name"].lstrip("/"): image for image in images}
    return {prefix + image["file_name"]: image for image in images}


def _match(path: str, index: dict[str, dict], by_suffix: bool) -> dict | None:
    if not by_suffix:
        return index.get(path)
    parts = path.split("/")
    suffixes = ("/".join(parts[start:]) for start in range(len(parts)))
    return next((index[key] for key in suffixes if key in index), None)


def _job_record(predictions_uri: str) -> dict:
    """The output's `_JOB.json`, or {} for an output of a version that wrote none."""
    try:
        return provenance.read_record(predictions_uri) or {}
    except ValueError as error:
        uri = storage.join(predictions_uri, provenance.JOB_FILE)
        raise ExportError(f"{uri}: not a job record ({error})") from error


def _model_categories(model_uri: str | None) -> tuple[dict[int, str], list[str]]:
    """The model's categories by id, and a note when they cannot be read."""
    if not model_uri:
        return {}, ["categories from the rows (the output names no model)"]
    try:
        spec = load_spec(model_uri)
    except UserError as error:
        return {}, [f"categories from the rows (model {model_uri}: {one_line(error)})"]
    return {category.id: category.name for category in spec.categories}, []


def _merge_categories(model: dict[int, str], seen: dict[int, str]) -> list[dict]:
    merged = {id_: name for id_, name in model.items() if name != _UNUSED_NAME or id_ in seen}
    merged.update({id_: name for id_, name in seen.items() if id_ not in merged})
    return [{"id": id_, "name": name} for id_, name in sorted(merged.items())]
