"""Read and decode a batch of input images on CPU tasks, and shrink them to the model's input size.

Per-image failures become error rows, never exceptions: an input that is not there to read
(`mrcnn.storage.ObjectMissing`: missing, a folder, forbidden), and every `ImageDecodeError` of
`mrcnn.images.decode_image` (empty, not an image, corrupt, truncated, more than `max_pixels` pixels
by its header, checked before any pixel is decoded). A store that keeps failing after the retries
of `mrcnn.s3_retry` raises `mrcnn.storage.StorageError`, which stops the job with one line (a
re-run resumes) instead of recording a transient failure as a permanent error row.

Images larger than the model's input are resized here, on the decode task, with the size and the
bilinear filter of the model's own transform (torchvision's `GeneralizedRCNNTransform`: shorter
side to `min_size`, longer side at most `max_size`, output size `floor(side * scale)`), in uint8.
A 12-megapixel photo then travels to the inference actor as 3 MB instead of 36 MB, and the model's
transform finds an image already at its size (its own resize is then a scale of about 1): the
resize moves from the actor, which holds the accelerator, to a CPU task (figures in BENCHMARKS.md,
"Decode-time shrink"). Smaller images travel as they are and the model upsamples them.
"""

from __future__ import annotations

import numpy as np

from mrcnn import storage
from mrcnn.batching import input_size
from mrcnn.images import ImageDecodeError, decode_image

# The placeholder image of an error row: it keeps the batch's image column one array per row.
NO_IMAGE = np.zeros((0, 0, 3), np.uint8)


def decode_batch(
    batch: dict[str, np.ndarray], *, max_pixels: int, min_size: int, max_size: int
) -> dict[str, np.ndarray]:
    """Decode the images of `batch["path"]` (object[B] of URIs).

    Returns, per input row:
        path: object[B], unchanged.
        width, height: int32[B], the displayed size (EXIF orientation applied); 0 when unknown.
        error: object[B], "" when decoded, else a one-line reason.
        image: B arrays uint8[h, w, 3] RGB, the image at the model's input size (h, w <= height,
            width); `NO_IMAGE` in an error row.
    """
    paths = batch["path"]
    widths = np.zeros(len(paths), np.int32)
    heights = np.zeros(len(paths), np.int32)
    errors = np.full(len(paths), "", dtype=object)
    images = []
    for row, path in enumerate(paths):
        try:
            pixels = decode_image(storage.read_bytes(path), max_pixels=max_pixels)
        except (ImageDecodeError, storage.ObjectMissing) as error:
            errors[row] = unreadable(error)
            images.append(NO_IMAGE)
            continue
        heights[row], widths[row] = pixels.shape[:2]
        images.append(shrink_to_model_size(pixels, min_size, max_size))
    return {"path": paths, "width": widths, "height": heights, "error": errors, "image": images}


def unreadable(error: Exception) -> str:
    """The error row's reason for an input that could not be used (one line)."""
    if isinstance(error, storage.ObjectMissing):
        return f"cannot read: {error.reason}"
    return str(error)


def model_input_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """The size torchvision's transform resizes a `height x width` image to when it shrinks it
    (`mrcnn.batching.input_size`); the image's own size when the model would enlarge it."""
    size = input_size(height, width, min_size, max_size)
    return size if size[0] <= height and size[1] <= width else (height, width)


def shrink_to_model_size(pixels: np.ndarray, min_size: int, max_size: int) -> np.ndarray:
    """`pixels` uint8[H, W, 3] resized down to the model's input size (bilinear, as the model)."""
    height, width = pixels.shape[:2]
    size = model_input_size(height, width, min_size, max_size)
    if size == (height, width):
        return pixels
    # Imported here: the job's driver imports this module for `decode_batch` and never resizes.
    import torch
    import torch.nn.functional as F

    image = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)
    resized = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
    return resized[0].permute(1, 2, 0).contiguous().numpy()
