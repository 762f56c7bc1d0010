"""Decode untrusted image bytes into RGB pixels, or fail with one line.

Used wherever image files enter the pipeline (training decode, bulk segmentation), so every
stage treats unusual modes and hostile files the same way. EXIF orientation is a choice of the
caller: bulk segmentation applies it (its rows describe what a person sees); annotated datasets
are read as stored by default, as COCO's annotators saw them and as torchvision's
`CocoDetection` reads them (`ORIENTATIONS`).
"""

from __future__ import annotations

import io
import posixpath
import warnings

import numpy as np
from PIL import Image, ImageOps

from mrcnn.errors import UserError, one_line

ORIENTATIONS: tuple[str, ...] = ("stored", "apply")
"""EXIF orientation: keep the stored pixel order, or apply the tag (the image as displayed)."""

SUPPORTED_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"})
"""File name extensions (lower case, no dot) that listings treat as images."""

# Pillow identifies files by content and can open dozens of formats, some through external
# programs (EPS runs Ghostscript). Untrusted bytes get only the formats we list above.
_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


class ImageDecodeError(UserError):
    """Bytes that are not a usable image: empty, unknown format, corrupt, truncated or too large."""


def is_image_path(path: str) -> bool:
    """True when `path` (a local path or URI) ends with one of `SUPPORTED_EXTENSIONS`, any case."""
    extension = posixpath.splitext(path)[1]
    return extension[1:].lower() in SUPPORTED_EXTENSIONS


def decode_image(data: bytes, max_pixels: int | None = None, orientation: str = "apply") -> np.ndarray:
    """Decode `data` into `uint8[H, W, 3]` RGB, by default as displayed: EXIF orientation applied.

    H and W are those of the displayed (rotated) image; with `orientation="stored"`, the pixels
    and H, W as stored in the file, the EXIF tag ignored. Conversions:
    - grayscale, bilevel, palette, CMYK and YCbCr go through Pillow's own conversion to RGB;
    - 16-bit samples (modes I;16*, and mode I, which Pillow uses for 16-bit files) are scaled
      to 8 bits with `round(v * 255 / 65535)`, keeping the full range instead of clipping at 255;
    - transparency (RGBA, LA, PA, a palette or colour key with a transparent entry) is
      composited over white, which is how the image looks on a page; dropping alpha instead
      would reveal whatever colour the encoder left under transparent pixels;
    - animated files (GIF, WebP, TIFF pages) give their first frame.

    The pixel count is checked against `max_pixels` from the header, before any pixel is
    decoded; Pillow's own decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`, warning and
    error alike) applies as well. Truncated files are errors (`LOAD_TRUNCATED_IMAGES` stays off).

    Raises `ImageDecodeError` with a one-line reason. The warnings filter that turns Pillow's
    bomb warning into an error is process-wide while it is set, so call this from one thread
    per process (as Ray tasks and actors do by default).
    """
    if orientation not in ORIENTATIONS:
        raise ValueError(f"unknown orientation {orientation!r} (choose from {', '.join(ORIENTATIONS)})")
    if not data:
        raise ImageDecodeError("empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=_FORMATS)
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageDecodeError(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
                )
            image.load()
            if orientation == "apply":
                image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
        except ImageDecodeError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ImageDecodeError(f"too large: {one_line(error)}") from error
        except Image.UnidentifiedImageError as error:
            supported = ", ".join(_FORMATS)
            raise ImageDecodeError(f"not a supported image ({supported})") from error
        # Decoders of hostile bytes fail in many ways (OSError for truncation, SyntaxError,
        # ValueError, struct.error, EOFError, ...); each is a bad file, never a crash.
        except Exception as error:
            raise ImageDecodeError(
                f"corrupt or truncated image: {type(error).__name__}: {one_line(error)}"
            ) from error


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in _UINT16_MODES or image.mode == "I":
        samples = np.asarray(image).astype(np.int64)
        if image.mode == "I":
            samples = np.clip(samples, 0, 65535)
        gray = ((samples * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.array(image.convert("RGB"), dtype=np.uint8)
