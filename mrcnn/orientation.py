"""EXIF orientation: read the tag, and map detections on the displayed image back to stored pixels.

Bulk segmentation describes what a person sees (EXIF applied); annotated datasets such as COCO
describe the stored pixels. To score such rows against such annotations, each detection is
mapped back through the inverse of the transpose that `PIL.ImageOps.exif_transpose` applied.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# The transpose `exif_transpose` applies for each orientation (2..8), and its inverse.
_APPLIED = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_INVERSE = {
    Image.Transpose.FLIP_LEFT_RIGHT: Image.Transpose.FLIP_LEFT_RIGHT,
    Image.Transpose.FLIP_TOP_BOTTOM: Image.Transpose.FLIP_TOP_BOTTOM,
    Image.Transpose.ROTATE_180: Image.Transpose.ROTATE_180,
    Image.Transpose.TRANSPOSE: Image.Transpose.TRANSPOSE,
    Image.Transpose.TRANSVERSE: Image.Transpose.TRANSVERSE,
    Image.Transpose.ROTATE_90: Image.Transpose.ROTATE_270,
    Image.Transpose.ROTATE_270: Image.Transpose.ROTATE_90,
}
# The same transposes of a numpy array as views: `mask_to_stored` copies once, straight into the
# column-major order COCO's RLE encoder reads (Pillow's transpose plus that reordering cost a
# 640 x 480 mask about ten times as much).
_AS_VIEW = {
    Image.Transpose.FLIP_LEFT_RIGHT: lambda array: array[:, ::-1],
    Image.Transpose.FLIP_TOP_BOTTOM: lambda array: array[::-1],
    Image.Transpose.ROTATE_180: lambda array: array[::-1, ::-1],
    Image.Transpose.TRANSPOSE: lambda array: array.T,
    Image.Transpose.TRANSVERSE: lambda array: array[::-1, ::-1].T,
    Image.Transpose.ROTATE_90: lambda array: np.rot90(array, 1),
    Image.Transpose.ROTATE_270: lambda array: np.rot90(array, -1),
}
_EXIF_ORIENTATION = 0x0112


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation tag of the image `data` (1..8), 1 when it has none or is unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            value = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a file decode_image refuses gets its error row elsewhere, not here
        return 1
    return value if value in _APPLIED else 1


def stored_size(orientation: int, width: int, height: int) -> tuple[int, int]:
    """(width, height) as stored of an image displayed at `width x height`."""
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def boxes_to_stored(boxes: np.ndarray, orientation: int, width: int, height: int) -> np.ndarray:
    """float32[N, 4] xyxy boxes on the displayed `width x height` image -> on the stored pixels."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if orientation not in _APPLIED:
        return boxes
    method = _INVERSE[_APPLIED[orientation]]
    x = boxes[:, [0, 2]]
    y = boxes[:, [1, 3]]
    w, h = float(width), float(height)
    # Where a point (x, y) of a `w x h` image lands under each transpose (pixel-edge coordinates).
    nx, ny = {
        Image.Transpose.FLIP_LEFT_RIGHT: (w - x, y),
        Image.Transpose.FLIP_TOP_BOTTOM: (x, h - y),
        Image.Transpose.ROTATE_180: (w - x, h - y),
        Image.Transpose.TRANSPOSE: (y, x),
        Image.Transpose.TRANSVERSE: (h - y, w - x),
        Image.Transpose.ROTATE_90: (y, w - x),
        Image.Transpose.ROTATE_270: (h - y, x),
    }[method]
    return np.stack([nx.min(1), ny.min(1), nx.max(1), ny.max(1)], axis=1).astype(np.float32)


def mask_to_stored(mask: np.ndarray, orientation: int) -> np.ndarray:
    """uint8[H, W] mask on the displayed image -> uint8 mask on the stored pixels (column-major)."""
    if orientation not in _APPLIED:
        return mask
    return np.asfortranarray(_AS_VIEW[_INVERSE[_APPLIED[orientation]]](mask))
