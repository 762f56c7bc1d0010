"""COCO run-length encoding (RLE): every encode and decode of a mask in the project, and the
pasting of per-RoI mask probabilities into image-resolution RLE, box by box.

The plain conversions wrap `pycocotools.mask` (which nothing else imports): binary masks to and
from compressed RLE `counts` (`encode_mask`, `encode_masks`, `rle_to_mask`, `decode_masks`), COCO
polygons and uncompressed RLE to compressed RLE (`polygons_to_rle`, `uncompressed_to_rle`), and an
RLE's area and box (`area`, `to_bbox`).

`masks_to_rle` gives, byte for byte, what torchvision's `paste_masks_in_image` followed by a
threshold and `pycocotools.mask.encode` give, without ever building an `H x W` mask: each mask is
resized to its (expanded, integer) box exactly as torchvision does it, the part inside the image is
thresholded, and the run lengths of the full image are read off that crop. Everything outside a box
is zero, so in COCO's column-major order the full image is one zero run before the first crop
column, a zero run between consecutive crop columns, and one after the last.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from pycocotools import mask as mask_util

if TYPE_CHECKING:
    import torch

# torch is imported by the functions that use it: the COCO reader and the shapes generator
# (`mrcnn.coco`, `mrcnn.shapes`) encode and decode RLE here in processes that never load torch.

# torchvision pastes masks with one pixel of zero padding around the M x M grid (and the box grown
# by the same factor), so that the mask falls off smoothly at the box border.
PASTE_PADDING = 1


def expand_boxes(boxes: torch.Tensor, scale: float) -> torch.Tensor:
    """float[N, 4] boxes grown about their centres by `scale`: torchvision's eager `expand_boxes`,
    operation for operation (so the pasted pixels match), kept here so that the CPU tasks that
    encode masks import torch but not torchvision."""
    import torch

    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    w_half *= scale
    h_half *= scale
    return torch.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], dim=1)


def masks_to_rle(
    mask_probs: torch.Tensor,
    boxes: torch.Tensor,
    height: int,
    width: int,
    threshold: float = 0.5,
) -> list[bytes]:
    """COCO compressed RLE `counts` of each detection's binary mask in an image of `height x width`.

    Args:
        mask_probs: float[N, 1, M, M] mask probabilities per RoI (float32, float64, or half on GPU).
        boxes: float[N, 4] boxes x1, y1, x2, y2 in pixels of the `height x width` image.
        height, width: the image size the masks are pasted into.
        threshold: a pixel is in the mask when its pasted probability is `> threshold`; at least 0,
            so that the zeros outside every box stay out of the mask.

    Returns:
        N `bytes` objects, equal to `pycocotools.mask.encode(np.asfortranarray(m))["counts"]` where
        `m = (paste_masks_in_image(mask_probs, boxes, (height, width)) > threshold)[i, 0]` (eager
        torchvision, on the device of `mask_probs`). A box whose pasted region lies wholly outside
        the image gives the empty mask (torchvision raises for most of those boxes).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"masks_to_rle: image size must be positive, got {height}x{width}")
    if not threshold >= 0:
        raise ValueError(f"masks_to_rle: threshold must be >= 0, got {threshold}")
    if mask_probs.shape[0] != boxes.shape[0]:
        raise ValueError(f"masks_to_rle: {mask_probs.shape[0]} masks but {boxes.shape[0]} boxes")
    if mask_probs.shape[0] == 0:
        return []
    import torch

    with torch.no_grad():
        return _paste_and_encode(mask_probs, boxes, height, width, threshold)


def _paste_and_encode(mask_probs, boxes, height: int, width: int, threshold: float) -> list[bytes]:
    import torch
    import torch.nn.functional as F

    # The scale and padding of torchvision's `expand_masks`, applied mask by mask below: ops on all N
    # masks at once are big enough for torch to run them on several threads, which for work this
    # small costs more than it saves, and far more on a busy machine.
    mask_size = mask_probs.shape[-1]
    scale = float(mask_size + 2 * PASTE_PADDING) / mask_size
    int_boxes = expand_boxes(boxes, scale).to(dtype=torch.int64).tolist()

    # One flat buffer holds, per detection, a leading 0, its visible crop in column-major order with
    # a 0 after each column (standing for the zeros between columns; left out when the crop spans
    # the full image height, because then columns touch), and a trailing 0. A change of value
    # anywhere in it is a run boundary of that detection's full-image RLE.
    layouts = []
    total = 0
    for x0, y0, x1, y1 in int_boxes:
        vx0, vx1 = max(x0, 0), min(x1 + 1, width)
        vy0, vy1 = max(y0, 0), min(y1 + 1, height)
        visible_w, visible_h = max(vx1 - vx0, 0), max(vy1 - vy0, 0)
        if visible_w == 0 or visible_h == 0:
            visible_w = visible_h = 0
        stride = visible_h + (1 if visible_h < height else 0)
        layouts.append((total, vx0, vy0, visible_w, visible_h, stride))
        total += 2 + visible_w * stride

    # numpy's zeros are pages the OS zero-fills on first touch: free for the parts never written.
    flat = torch.from_numpy(np.zeros(total, dtype=np.bool_)).to(mask_probs.device)
    for i, ((x0, y0, x1, y1), (start, vx0, vy0, vw, vh, stride)) in enumerate(
        zip(int_boxes, layouts, strict=True)
    ):
        if vw == 0:
            continue
        box_w, box_h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        padded = F.pad(mask_probs[i : i + 1], (PASTE_PADDING,) * 4)
        resized = F.interpolate(padded, size=(box_h, box_w), mode="bilinear", align_corners=False)[0, 0]
        crop = resized[vy0 - y0 : vy0 - y0 + vh, vx0 - x0 : vx0 - x0 + vw]
        columns = flat[start + 1 : start + 1 + vw * stride].view(vw, stride)[:, :vh]
        torch.gt(crop.t(), threshold, out=columns)

    bits = flat.cpu().numpy()
    changes = np.flatnonzero(bits[1:] != bits[:-1]) + 1
    return _counts_from_changes(changes, np.array(layouts, dtype=np.int64), height, width)


def _counts_from_changes(changes: np.ndarray, layouts: np.ndarray, height: int, width: int) -> list[bytes]:
    """Compressed RLE per detection from the buffer indexes where the value changes.

    `layouts` is int64[N, 6]: buffer start, visible x0, y0, width, height, column stride.
    """
    starts = layouts[:, 0]
    owner = np.searchsorted(starts, changes, side="right") - 1
    offset = changes - starts[owner] - 1
    column, row = np.divmod(offset, layouts[owner, 5])
    positions = (layouts[owner, 1] + column) * height + layouts[owner, 2] + row
    area = height * width
    # The trailing 0 of a crop that ends in the image's last pixel maps to `area`: not a boundary.
    inside = positions < area
    positions, owner = positions[inside], owner[inside]
    # Each detection's run lengths are the differences of [0, its boundaries..., area]: frame every
    # detection's boundaries that way in one array (np.insert keeps equal indexes in the given order)
    # and take the differences inside each frame.
    n = len(layouts)
    bounds = np.searchsorted(owner, np.arange(n + 1))
    framed = np.insert(positions, np.repeat(bounds, 2)[1:-1], np.tile([0, area], n))
    runs = np.diff(framed).astype(np.uint32)
    first = bounds[:-1] + 2 * np.arange(n)
    last = bounds[1:] + 2 * np.arange(n) + 1
    uncompressed = [
        {"size": [height, width], "counts": runs[lo:hi]}
        for lo, hi in zip(first.tolist(), last.tolist(), strict=True)
    ]
    return [rle["counts"] for rle in mask_util.frPyObjects(uncompressed, height, width)]


def rle_to_mask(counts: bytes | str, height: int, width: int) -> np.ndarray:
    """Decode COCO compressed RLE `counts` into a uint8[height, width] mask of 0 and 1."""
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return mask_util.decode({"size": [height, width], "counts": counts})


def encode_rle(mask: np.ndarray) -> dict:
    """The COCO compressed RLE `{"size": [H, W], "counts": bytes}` of a uint8[H, W] 0/1 mask."""
    return mask_util.encode(np.asfortranarray(mask.astype(np.uint8, copy=False)))


def encode_mask(mask: np.ndarray) -> bytes:
    """The compressed RLE `counts` of a uint8[H, W] 0/1 mask."""
    return encode_rle(mask)["counts"]


def encode_masks(masks: np.ndarray) -> list[bytes]:
    """The compressed RLE `counts` of each mask of `masks` uint8[N, H, W] (N may be 0)."""
    if len(masks) == 0:
        return []
    encoded = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8, copy=False)))
    return [rle["counts"] for rle in encoded]


def decode_masks(counts: list[bytes] | np.ndarray, height: int, width: int) -> np.ndarray:
    """The masks of `encode_masks` back as uint8[N, H, W] (N may be 0)."""
    if len(counts) == 0:
        return np.zeros((0, height, width), dtype=np.uint8)
    rles = [{"size": [height, width], "counts": bytes(c)} for c in counts]
    return np.ascontiguousarray(mask_util.decode(rles).transpose(2, 0, 1))  # from uint8[H, W, N]


def decode_rle(rle: dict) -> np.ndarray:
    """The uint8[H, W] mask of a compressed RLE dict; `ValueError` when its counts do not add up
    to its size."""
    return mask_util.decode(rle)


def polygons_to_rle(polygons: list[np.ndarray], height: int, width: int) -> dict:
    """One compressed RLE of the union of COCO polygons (each [x1, y1, x2, y2, ...] in pixels)."""
    return mask_util.merge(mask_util.frPyObjects(polygons, height, width))


def uncompressed_to_rle(segmentation: dict, height: int, width: int) -> dict:
    """The compressed RLE of a COCO uncompressed RLE (`counts` a list of run lengths)."""
    return mask_util.frPyObjects(segmentation, height, width)


def area(rle: dict) -> int:
    """Pixels in the mask of a compressed RLE."""
    return int(mask_util.area(rle))


def to_bbox(rle: dict) -> list[float]:
    """The COCO box [x, y, width, height] of a compressed RLE's mask."""
    return [float(value) for value in mask_util.toBbox(rle)]
