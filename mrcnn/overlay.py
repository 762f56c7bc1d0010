"""Draw instances on an image for people to look at: tinted masks, box outlines and labels."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

MASK_OPACITY = 0.5


def instance_colour(index: int) -> tuple[int, int, int]:
    """A bright colour per instance, spread around the hue circle by the golden ratio."""
    hue = (index * 0.618033988749895) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(red * 255), int(green * 255), int(blue * 255)


def draw_instances(
    image: np.ndarray,
    masks: np.ndarray,
    boxes: np.ndarray,
    captions: Sequence[str],
) -> Image.Image:
    """The image with each instance's mask tinted, its box outlined and its caption written.

    Args:
        image: uint8[H, W, 3] RGB.
        masks: uint8[N, H, W], 0/1.
        boxes: float[N, 4] x1, y1, x2, y2 in pixels of the image.
        captions: N strings, e.g. "circle 0.97".
    """
    if not len(masks) == len(boxes) == len(captions):
        raise ValueError(f"{len(masks)} masks, {len(boxes)} boxes and {len(captions)} captions")
    canvas = image.astype(np.float32)
    colours = [instance_colour(i) for i in range(len(masks))]
    for mask, colour in zip(masks, colours, strict=True):
        inside = mask.astype(bool)
        canvas[inside] = (1 - MASK_OPACITY) * canvas[inside] + MASK_OPACITY * np.array(colour, np.float32)
    result = Image.fromarray(canvas.round().astype(np.uint8))
    draw = ImageDraw.Draw(result)
    for box, caption, colour in zip(boxes, captions, colours, strict=True):
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=1)
        left, top, right, bottom = draw.textbbox((x1, y1), caption)
        draw.rectangle((left, top, right, bottom), fill=(0, 0, 0))
        draw.text((x1, y1), caption, fill=colour)
    return result
