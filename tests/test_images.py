"""decode_image: displayed RGB for every mode we accept, one-line errors for bad files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mrcnn.images import ImageDecodeError, decode_image, is_image_path


def encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def rgb_pattern(height: int = 24, width: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("format", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_rgb_round_trips_exactly(format):
    pixels = rgb_pattern()
    options = {"lossless": True} if format == "WEBP" else {}
    decoded = decode_image(encode(Image.fromarray(pixels), format, **options))
    assert decoded.dtype == np.uint8
    assert decoded.shape == (24, 32, 3)
    np.testing.assert_array_equal(decoded, pixels)


def test_jpeg_decodes_to_rgb_of_its_size():
    decoded = decode_image(encode(Image.new("RGB", (40, 30), (200, 40, 10)), "JPEG", quality=95))
    assert decoded.shape == (30, 40, 3)
    assert np.abs(decoded.astype(int) - [200, 40, 10]).max() <= 3


def test_grayscale_becomes_three_equal_channels():
    gray = rgb_pattern()[:, :, 0]
    decoded = decode_image(encode(Image.fromarray(gray), "PNG"))
    for channel in range(3):
        np.testing.assert_array_equal(decoded[:, :, channel], gray)


def test_bilevel_image_is_black_and_white():
    bits = np.zeros((8, 8), dtype=bool)
    bits[:, 4:] = True
    decoded = decode_image(encode(Image.fromarray(bits), "PNG"))
    assert (decoded[:, :4] == 0).all()
    assert (decoded[:, 4:] == 255).all()


@pytest.mark.parametrize("format", ["PNG", "TIFF"])
def test_16_bit_grayscale_is_scaled_to_8_bits_not_clipped(format):
    samples = np.array([[0, 257, 32896, 65535, 1000]], dtype=np.uint16)
    image = Image.fromarray(samples)
    assert image.mode == "I;16"
    decoded = decode_image(encode(image, format))
    # round(v * 255 / 65535): full scale stays full scale; clipping would give 255 for all but 0.
    np.testing.assert_array_equal(decoded[0, :, 0], [0, 1, 128, 255, 4])
    np.testing.assert_array_equal(decoded[:, :, 0], decoded[:, :, 2])


def test_integer_mode_is_read_as_16_bit_samples():
    # Pillow opens signed 16-bit and 32-bit integer files in mode I; we read them as 16-bit
    # samples (negative values are black, beyond 16 bits is white).
    samples = np.array([[-5, 0, 32896, 65535, 70000]], dtype=np.int32)
    data = encode(Image.fromarray(samples), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    np.testing.assert_array_equal(decode_image(data)[0, :, 0], [0, 0, 128, 255, 255])


@pytest.mark.parametrize("format", ["TIFF", "JPEG"])
def test_cmyk_becomes_rgb(format):
    cmyk = Image.new("CMYK", (16, 8), (255, 0, 0, 0))  # pure cyan
    cmyk.paste((0, 0, 0, 255), (8, 0, 16, 8))  # pure black on the right half
    decoded = decode_image(encode(cmyk, format))
    assert decoded.shape == (8, 16, 3)
    assert np.abs(decoded[:, :6].astype(int) - [0, 255, 255]).max() <= 4
    assert decoded[:, 10:].max() <= 4


def test_palette_with_transparent_index_is_composited_on_white():
    indexes = np.array([[0, 1], [1, 0]], dtype=np.uint8)
    image = Image.fromarray(indexes, mode="P")
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    decoded = decode_image(encode(image, "PNG", transparency=0))
    np.testing.assert_array_equal(decoded[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(decoded[0, 1], [0, 0, 255])


def test_palette_without_transparency_uses_its_colours():
    image = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), mode="P")
    image.putpalette([255, 0, 0, 0, 128, 0] + [0] * 762)
    decoded = decode_image(encode(image, "PNG"))
    np.testing.assert_array_equal(decoded[0], [[255, 0, 0], [0, 128, 0]])


def test_rgba_is_composited_on_white():
    pixels = np.array([[[255, 0, 0, 0], [255, 0, 0, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    decoded = decode_image(encode(Image.fromarray(pixels, mode="RGBA"), "PNG"))
    np.testing.assert_array_equal(decoded[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(decoded[0, 1], [255, 0, 0])
    assert np.abs(decoded[0, 2].astype(int) - 127).max() <= 1


def test_gray_with_alpha_is_composited_on_white():
    pixels = np.array([[[0, 0], [0, 255], [200, 255]]], dtype=np.uint8)
    decoded = decode_image(encode(Image.fromarray(pixels, mode="LA"), "PNG"))
    np.testing.assert_array_equal(decoded[0], [[255, 255, 255], [0, 0, 0], [200, 200, 200]])


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (12, 10), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    decoded = decode_image(data)
    assert decoded.shape == (10, 12, 3)
    assert (decoded == [255, 0, 0]).all()


def test_exif_orientation_6_rotates_the_image_right():
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:6] = (255, 0, 0)  # red band along the stored top edge
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    decoded = decode_image(data)
    assert decoded.shape == (40, 20, 3)  # width and height swapped
    # The stored top edge is the displayed right edge after a clockwise turn.
    assert (decoded[:, -4:, 0] > 200).all()
    assert (decoded[:, :12, 0] < 50).all()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"hello, this is a text file, not an image\n" * 4, "not a supported image"),
        (b"P6\n2 2\n255\n" + bytes(12), "not a supported image"),  # PPM: a format we refuse
    ],
)
def test_non_images_fail_with_one_line(data, reason):
    with pytest.raises(ImageDecodeError, match=reason) as caught:
        decode_image(data)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("format", ["PNG", "JPEG"])
def test_truncated_files_fail(format):
    data = encode(Image.fromarray(rgb_pattern(64, 64)), format)
    with pytest.raises(ImageDecodeError, match="corrupt or truncated") as caught:
        decode_image(data[: len(data) // 2])
    assert "\n" not in str(caught.value)


def test_oversized_image_fails_from_its_header_before_decoding():
    data = encode(Image.new("1", (5000, 5000)), "PNG")
    assert len(data) < 100_000  # a small file that would decode to 25 Mpx
    with pytest.raises(ImageDecodeError, match="5000x5000 = 25000000 pixels"):
        decode_image(data, max_pixels=1_000_000)
    # The header alone gives the same answer: the check never needs the pixel data.
    with pytest.raises(ImageDecodeError, match="5000x5000"):
        decode_image(data[:64], max_pixels=1_000_000)


def test_image_at_the_limit_decodes():
    data = encode(Image.new("RGB", (40, 25)), "PNG")
    assert decode_image(data, max_pixels=1000).shape == (25, 40, 3)


@pytest.mark.parametrize("pixels", [30 * 40, 50 * 50])
def test_pillow_bomb_warning_and_error_are_errors(monkeypatch, pixels):
    # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; both must fail.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    side = int(pixels**0.5)
    data = encode(Image.new("RGB", (side, pixels // side)), "PNG")
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(data)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("photo.jpg", True),
        ("/data/a/B.JPEG", True),
        ("s3://bucket/x/scan.TiFf", True),
        ("s3://bucket/x/y.webp", True),
        ("a.png.txt", False),
        ("folder.png/readme", False),
        ("jpg", False),
        ("s3://bucket/x/y.heic", False),
    ],
)
def test_is_image_path(path, expected):
    assert is_image_path(path) is expected
