"""The benchmark photos: real pixels from scikit-image's package data, at the asked size."""

from __future__ import annotations

import numpy as np

from benchmarks.photos import photos, write_photos
from mrcnn.images import decode_image


def test_photos_are_distinct_of_both_orientations_with_the_asked_short_side():
    images = list(photos(24, short_side=200, seed=1))
    assert all(image.dtype == np.uint8 and image.shape[2] == 3 for image in images)
    assert {min(image.shape[:2]) for image in images} == {200}
    portrait = sum(image.shape[0] > image.shape[1] for image in images)
    assert 0 < portrait < len(images)
    assert len({image.tobytes() for image in images}) == len(images)
    # Photos, not flat fills: many distinct colours in each.
    assert all(len(np.unique(image.reshape(-1, 3), axis=0)) > 1000 for image in images)


def test_written_photos_decode_to_their_size(tmp_path):
    paths = write_photos(str(tmp_path), 3, short_side=100)
    with open(paths[0], "rb") as file:
        assert min(decode_image(file.read()).shape[:2]) == 100
