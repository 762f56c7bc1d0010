"""Generate a synthetic COCO instances dataset of coloured shapes, locally or on S3.

Classes differ only by shape (circle, square, triangle, star); colours, sizes, rotations and
backgrounds are random and independent of the class, so a model must learn shape. Instances may
overlap: later shapes occlude earlier ones, and each annotation is the visible part, as an exact
compressed RLE taken from the rendered label map.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from mrcnn import rle, storage
from mrcnn.categories import Category

CATEGORIES = (
    Category(1, "circle"),
    Category(2, "square"),
    Category(3, "triangle"),
    Category(4, "star"),
)
MIN_SIZE = 32
MIN_INSTANCES, MAX_INSTANCES = 1, 5
# Shape diameters as a fraction of the image side.
MIN_DIAMETER, MAX_DIAMETER = 0.1, 0.5
# A shape is placed only if every earlier shape keeps this fraction of its area visible, so
# nothing in an image is an unannotated fragment and every object still shows its shape.
MIN_VISIBLE_FRACTION = 0.5
MIN_AREA_PIXELS = 12
PLACEMENT_ATTEMPTS = 30
# Colours closer than this (Euclidean RGB) to what lies under a shape are redrawn.
MIN_COLOUR_DISTANCE = 90.0


@dataclass(frozen=True)
class GeneratedShapes:
    """Where a generated dataset is: `read_coco(annotations_uri, images_root)` reads it."""

    annotations_uri: str
    images_root: str
    num_images: int
    num_annotations: int


ANNOTATIONS_FILE = "annotations.json"
IMAGES_DIR = "images"


def dataset_uris(out_uri: str) -> tuple[str, str]:
    """(annotations file, images folder) of the shapes dataset at `out_uri`."""
    return storage.join(out_uri, ANNOTATIONS_FILE), storage.join(out_uri, IMAGES_DIR)


def generate_shapes(out_uri: str, num_images: int, seed: int = 0, size: int = 128) -> GeneratedShapes:
    """Write `out_uri/annotations.json` and `out_uri/images/NNNNNN.png` (size x size RGB).

    `out_uri` is a local folder or `s3://bucket/prefix`. Image `k` depends only on `(seed, k)`,
    so the same arguments give the same bytes, and a larger `num_images` extends a smaller one.
    Image ids are 1..N, category ids 1..4; `annotations.json` is written last, so the dataset is
    complete once it exists. Raises `ValueError` for `num_images < 1` or `size < MIN_SIZE`.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} pixels, got {size}")
    annotations_uri, images_root = dataset_uris(out_uri)
    images, annotations = [], []
    for index in range(num_images):
        image_id = index + 1
        file_name = f"{image_id:06d}.png"
        pixels, masks, categories = render_image(np.random.default_rng([seed, index]), size)
        storage.write_bytes(storage.join(images_root, file_name), _png(pixels))
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for mask, category in zip(masks, categories, strict=True):
            encoded = rle.encode_rle(mask)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category.id,
                    "segmentation": {"size": [size, size], "counts": encoded["counts"].decode("ascii")},
                    "area": rle.area(encoded),
                    "bbox": rle.to_bbox(encoded),
                    "iscrowd": 0,
                }
            )
    ground_truth = {
        "info": {"description": f"synthetic shapes, seed {seed}, {size}x{size}"},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": category.id, "name": category.name, "supercategory": "shape"} for category in CATEGORIES
        ],
    }

    storage.write_bytes(annotations_uri, json.dumps(ground_truth).encode())
    return GeneratedShapes(annotations_uri, images_root, num_images, len(annotations))


def render_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[np.ndarray], list[Category]]:
    """One image: `uint8[size, size, 3]` RGB, the visible masks `uint8[size, size]` (0/1) of
    its instances in drawing order, and their categories."""
    # Pixel coordinates in [0, 1), shared by the background and the shading of each shape.
    grid = np.mgrid[0:size, 0:size] / size
    pixels = _background(rng, grid)
    label_map = np.zeros((size, size), dtype=np.int32)
    full_areas: list[int] = []
    colours: list[np.ndarray] = []
    categories: list[Category] = []
    wanted = int(rng.integers(MIN_INSTANCES, MAX_INSTANCES + 1))
    for _ in range(PLACEMENT_ATTEMPTS):
        if len(categories) == wanted:
            break
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        shape = _shape_mask(rng, category.name, size)
        area = int(shape.sum())
        if area < MIN_AREA_PIXELS:
            continue
        candidate = label_map.copy()
        candidate[shape] = len(categories) + 1
        visible = np.bincount(candidate.ravel(), minlength=len(categories) + 2)[1 : len(categories) + 1]
        if any(visible < MIN_VISIBLE_FRACTION * np.asarray(full_areas)):
            continue
        uncovered = shape & (label_map == 0)
        under = [pixels[uncovered].mean(axis=0)] if uncovered.any() else []
        under += [colours[i - 1] for i in np.unique(label_map[shape]) if i > 0]
        colour = _distinct_colour(rng, under)
        pixels[shape] = colour * _shading(rng, grid)[shape][:, None]
        label_map = candidate
        full_areas.append(area)
        colours.append(colour)
        categories.append(category)
    noise = rng.uniform(2.0, 10.0) * rng.standard_normal(pixels.shape, dtype=np.float32)
    image = np.clip(np.rint(pixels + noise), 0, 255).astype(np.uint8)
    masks = [(label_map == i).astype(np.uint8) for i in range(1, len(categories) + 1)]
    return image, masks, categories


def _shape_mask(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
    """bool[size, size]: a randomly sized, placed and rotated shape lying fully in the image."""
    radius = rng.uniform(MIN_DIAMETER, MAX_DIAMETER) * size / 2
    cx, cy = rng.uniform(radius, size - radius, 2)
    angle = rng.uniform(0.0, 2 * math.pi)
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if name == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=1)
    else:
        radii = {"square": [radius] * 4, "triangle": [radius] * 3, "star": [radius, 0.45 * radius] * 5}[name]
        steps = len(radii)
        points = [
            (
                cx + r * math.cos(angle + 2 * math.pi * k / steps),
                cy + r * math.sin(angle + 2 * math.pi * k / steps),
            )
            for k, r in enumerate(radii)
        ]
        draw.polygon(points, fill=1)
    return np.asarray(canvas, dtype=bool)


def _background(rng: np.random.Generator, grid: np.ndarray) -> np.ndarray:
    """float64[size, size, 3]: a gradient, stripes or smooth blotches between two colours."""
    first, second = rng.uniform(0, 255, (2, 3))
    y, x = grid
    size = x.shape[0]
    kind = int(rng.integers(3))
    if kind == 0:
        angle = rng.uniform(0, 2 * math.pi)
        t = (x * math.cos(angle) + y * math.sin(angle) + 1.5) / 3
    elif kind == 1:
        angle, period = rng.uniform(0, math.pi), rng.uniform(0.08, 0.3)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period)
    else:
        coarse = Image.fromarray(rng.uniform(0, 255, (4, 4)).astype(np.uint8))
        t = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64) / 255
    return first + (second - first) * t[:, :, None]


def _shading(rng: np.random.Generator, grid: np.ndarray) -> np.ndarray:
    """float64[size, size]: a gentle linear light ramp (0.75..1.15) so fills are not flat."""
    y, x = grid
    angle = rng.uniform(0, 2 * math.pi)
    return 0.95 + 0.2 * (x * math.cos(angle) + y * math.sin(angle)) / math.sqrt(2)


def _distinct_colour(rng: np.random.Generator, neighbours: list[np.ndarray]) -> np.ndarray:
    """A random colour, redrawn a few times to stand out from the colours a shape covers."""
    best, best_distance = None, -1.0
    for _ in range(8):
        colour = rng.uniform(0, 255, 3)
        distance = min((float(np.linalg.norm(colour - n)) for n in neighbours), default=math.inf)
        if distance >= MIN_COLOUR_DISTANCE:
            return colour
        if distance > best_distance:
            best, best_distance = colour, distance
    return best


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()
