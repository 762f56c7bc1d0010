"""A segmentation output made by hand, without Ray or a model: images written with PIL (one stored
sideways with EXIF orientation 6), rows whose masks and boxes are known exactly, error rows of
several reasons (one with a path full of HTML), committed as part files by
`pipeline.segment.output.commit_part` beside a job record and a success marker.

The folder is what `jobs.segment` leaves, so `jobs.report` and `jobs.render` read it as they read
a real one; a test then knows every instance and pixel it should find.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from mrcnn import storage
from mrcnn.rle import encode_mask
from pipeline.segment import output, provenance

CATEGORIES = {"circle": 3, "square": 7, "triangle": 8}
# The image stored sideways: 120 x 80 as stored, 80 x 120 as displayed (EXIF 6, a quarter turn).
ROTATED_STORED = (120, 80)
ROTATED_BOX = [10.0, 50.0, 70.0, 110.0]
PLAIN_SIZE = (80, 60)
ROWS_PER_PART = 4
HOSTILE_PATH = "/nowhere/<img src=x onerror=alert(1)>.png"
JOB = {
    "model": "s3://models/<b>hand-made</b>",
    "model_sha256": "ab" * 32,
    "model_json_sha256": "cd" * 32,
    "score_threshold": 0.3,
    "max_pixels": 1_000_000,
    "amp": "off",
    "schema_version": output.SCHEMA_VERSION,
    "project_version": "test",
}


@dataclass(frozen=True)
class HandMadeOutput:
    """Where it is, its rows, and the rotated image's path and displayed mask (uint8[120, 80])."""

    predictions: str
    rows: list[dict]
    rotated_path: str
    rotated_mask: np.ndarray


def pixels(width: int, height: int, seed: int) -> np.ndarray:
    """uint8[height, width, 3]: a gradient with noise, so that any turn or flip of it shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 200 // width, y * 200 // height, (x + y) % 50], axis=2)
    return (base + rng.integers(0, 50, base.shape)).astype(np.uint8)


def png(array: np.ndarray, orientation: int = 1) -> bytes:
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    Image.fromarray(array).save(buffer, "PNG", exif=exif.tobytes())
    return buffer.getvalue()


def displayed(data: bytes) -> np.ndarray:
    """What a person sees of the image `data` (EXIF applied), by PIL alone."""
    return np.array(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


def rotated_mask() -> np.ndarray:
    """An asymmetric mask inside `ROTATED_BOX`, below its caption, on the displayed image."""
    height, width = ROTATED_STORED[0], ROTATED_STORED[1]
    y, x = np.mgrid[0:height, 0:width]
    inside = (y >= 64) & (y < 108) & (x >= 12) & (x < 68) & ((x - 12) <= (y - 64) * 1.2)
    return inside.astype(np.uint8)


def _row(path: str, width: int | None, height: int | None, instances: list, error: str | None = None) -> dict:
    return {
        "path": path,
        "width": width,
        "height": height,
        "category_ids": [CATEGORIES[name] for name, _, _, _ in instances],
        "categories": [name for name, _, _, _ in instances],
        "scores": [score for _, score, _, _ in instances],
        "boxes": [box for _, _, box, _ in instances],
        "masks": [encode_mask(mask).decode("ascii") for _, _, _, mask in instances],
        "error": error,
        "model": JOB["model"],
    }


def _plain_instances(index: int) -> list:
    width, height = PLAIN_SIZE
    names = list(CATEGORIES)
    instances = []
    for k in range(index % 4):
        x0, y0 = 4 + 18 * k, 6 + 10 * k
        mask = np.zeros((height, width), np.uint8)
        mask[y0 + 2 : y0 + 20, x0 + 2 : x0 + 16] = 1
        box = [float(x0), float(y0), float(x0 + 18), float(y0 + 22)]
        instances.append(
            (names[(index + k) % 3], round(0.35 + 0.6 * ((index * 7 + k * 3) % 10) / 10, 2), box, mask)
        )
    return instances


def make_output(base: str, plain_images: int = 9) -> HandMadeOutput:
    """Write the images under `BASE/images` and the output under `BASE/predictions` (local or s3)."""
    images = storage.join(base, "images")
    rotated_path = storage.join(images, "rotated.png")
    storage.write_bytes(rotated_path, png(pixels(*ROTATED_STORED, seed=1), orientation=6))
    mask = rotated_mask()
    rows = [_row(rotated_path, ROTATED_STORED[1], ROTATED_STORED[0], [("circle", 0.95, ROTATED_BOX, mask)])]
    for index in range(plain_images):
        path = storage.join(images, f"plain-{index}.png")
        storage.write_bytes(path, png(pixels(*PLAIN_SIZE, seed=10 + index)))
        rows.append(_row(path, *PLAIN_SIZE, _plain_instances(index)))
    rows += [
        _row(storage.join(images, "gone-1.jpg"), None, None, [], "cannot read: not found"),
        _row(storage.join(images, "gone-2.jpg"), None, None, [], "cannot read: not found"),
        _row(
            storage.join(images, "huge-1.png"),
            None,
            None,
            [],
            "image is 2000x1000 = 2000000 pixels, over the limit of 1000000",
        ),
        _row(
            storage.join(images, "huge-2.png"),
            None,
            None,
            [],
            "image is 3000x2000 = 6000000 pixels, over the limit of 1000000",
        ),
        _row(HOSTILE_PATH, None, None, [], "not a supported image (<b>JPEG</b>, PNG)"),
    ]
    predictions = storage.join(base, "predictions")
    provenance.record_output(predictions, JOB)
    for start in range(0, len(rows), ROWS_PER_PART):
        output.commit_part(
            pa.Table.from_pylist(rows[start : start + ROWS_PER_PART], schema=output.SCHEMA), predictions
        )
    output.write_success(predictions, {"images": len(rows), "job": JOB})
    return HandMadeOutput(predictions, rows, rotated_path, mask)
