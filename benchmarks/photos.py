"""Real photographs for benchmarks, at a model's input size, from the photos scikit-image ships.

scikit-image's wheel carries a few colour photos as package data (`skimage.data`: the astronaut,
the cat, a coffee cup, a rocket launch, a motorcycle, the Hubble deep field), read from disk with
no download. `photos` cuts landscape and portrait crops of several aspect ratios out of them,
mirrors some, and resizes each so its shorter side is `short_side` (800: the R50 presets'
`min_size`): a few dozen distinct images whose decode, resize and mask-encode costs are those of
real photos, not of flat synthetic shapes. scikit-image is an optional dependency (the `dev`
extra, which `make setup` installs); without it `photos` raises `PhotosUnavailable`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
from PIL import Image

# (height, width) ratios of the crops: 4:3, 3:2 and 16:9, landscape; portrait is the transpose.
ASPECTS: tuple[tuple[int, int], ...] = ((3, 4), (2, 3), (9, 16))


class PhotosUnavailable(RuntimeError):
    """scikit-image, which ships the photos, is not installed; the message says how to get it."""


def source_photos() -> list[np.ndarray]:
    """The colour photos bundled with scikit-image, as uint8[h, w, 3] RGB (300 to 1000 px sides)."""
    try:
        from skimage import data
    except ImportError as error:
        raise PhotosUnavailable(
            "the benchmark photos come from scikit-image: pip install scikit-image "
            "(or `pip install -e '.[dev]'`)"
        ) from error
    loaders = (data.astronaut, data.chelsea, data.coffee, data.rocket, data.hubble_deep_field)
    return [loader() for loader in loaders] + [data.stereo_motorcycle()[0]]


def photos(
    count: int, short_side: int = 800, portrait_fraction: float = 0.5, seed: int = 0
) -> Iterator[np.ndarray]:
    """`count` distinct photos, uint8[h, w, 3] RGB with min(h, w) == `short_side`, one at a time:
    at 800 px each is 2.5-3.4 MB, so a list of 6,000 would take 20 GB.

    Image i crops source photo `i mod 6` at a random place, with a random aspect of `ASPECTS`,
    portrait with probability `portrait_fraction` (else landscape), mirrored left-right at random;
    the crop is 75 to 100 % of the largest of that aspect that fits, resized with Pillow's bicubic filter.
    """
    rng = np.random.default_rng(seed)
    sources = source_photos()
    for index in range(count):
        source = sources[index % len(sources)]
        aspect_h, aspect_w = ASPECTS[rng.integers(len(ASPECTS))]
        if rng.random() < portrait_fraction:
            aspect_h, aspect_w = aspect_w, aspect_h
        height, width = source.shape[:2]
        # Between three quarters and all of the largest crop that fits, so that crops differ.
        unit = int(min(height // aspect_h, width // aspect_w) * rng.uniform(0.75, 1.0))
        crop_h, crop_w = unit * aspect_h, unit * aspect_w
        top = int(rng.integers(height - crop_h + 1))
        left = int(rng.integers(width - crop_w + 1))
        crop = source[top : top + crop_h, left : left + crop_w]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        scale = short_side / min(crop_h, crop_w)
        size = (round(crop_w * scale), round(crop_h * scale))
        image = Image.fromarray(np.ascontiguousarray(crop)).resize(size, Image.Resampling.BICUBIC)
        yield np.array(image)


def write_photos(folder: str, count: int, short_side: int = 800, seed: int = 0) -> list[str]:
    """Write `photos(count, short_side, seed=seed)` as JPEGs (quality 90) into a local `folder`;
    returns their paths, sorted."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for index, pixels in enumerate(photos(count, short_side, seed=seed)):
        path = os.path.join(folder, f"photo-{index:04d}.jpg")
        Image.fromarray(pixels).save(path, format="JPEG", quality=90)
        paths.append(path)
    return sorted(paths)
