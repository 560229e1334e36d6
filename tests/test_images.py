import struct
import zlib

import cv2
import numpy as np
import pytest

from cxrtune import dicom, images
from cxrtune.errors import ImageDecodeError, ImageTooLargeError, UnsupportedFormatError


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size but carries no real pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return images.PNG_MAGIC + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


def test_8_and_16_bit_png_keep_their_levels():
    g8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    g16 = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
    assert np.allclose(images.decode_image(images.encode_png(g8)), g8 / 255.0)
    assert np.allclose(images.decode_image(images.encode_png(g16)), g16 / 65535.0)


def test_jpeg_and_rgb_become_grey():
    rgb = np.full((32, 32, 3), 128, np.uint8)
    ok, jpg = cv2.imencode(".jpg", rgb)
    out = images.decode_image(jpg.tobytes())
    assert out.shape == (32, 32) and abs(out.mean() - 128 / 255) < 0.02


def test_hostile_inputs_get_clear_errors():
    with pytest.raises(UnsupportedFormatError):
        images.decode_image(b"GIF89a....")
    with pytest.raises(ImageDecodeError, match="empty"):
        images.decode_image(b"")
    good = images.encode_png(np.zeros((64, 64), np.uint8))
    with pytest.raises(ImageDecodeError):
        images.decode_image(good[:40])
    with pytest.raises(ImageTooLargeError, match="MP"):
        images.decode_image(png_header_only(100_000, 100_000))
    with pytest.raises(ImageTooLargeError, match="MB"):
        images.decode_image(good, dicom.Limits(max_bytes=10))


def test_mask_is_bool():
    m = np.zeros((8, 8), bool)
    m[2:4, 2:4] = True
    assert np.array_equal(images.decode_mask(images.encode_png(m)), m)
