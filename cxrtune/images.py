"""Decode chest radiographs and masks from PNG, JPEG or DICOM bytes into arrays.

Images come out as 2-D ``float32`` in [0, 1] with the full precision of the file (16-bit PNG and
15-bit DICOM keep their levels), bright = dense, whatever the file's photometric convention.
Masks come out as 2-D ``bool``. Size limits are checked from the header before any pixel is decoded,
so a hostile file cannot make us allocate gigabytes.
"""

from __future__ import annotations

import io
import struct
import warnings

import cv2
import numpy as np
from PIL import Image

from . import storage
from .dicom import DECODE_SLOTS, Limits, read_dicom
from .errors import ImageDecodeError, ImageTooLargeError, InputRefused, UnsupportedFormatError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


def sniff_format(data: bytes) -> str:
    """``"png"``, ``"jpeg"`` or ``"dicom"`` from the file's magic bytes (extensions lie)."""
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    raise UnsupportedFormatError("not a PNG, JPEG or DICOM file (unrecognised leading bytes)")


PNG_SAMPLES = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # IHDR colour type -> samples decoded (a palette decodes to BGR)


def _header_size(data: bytes, fmt: str) -> tuple[int, int, int]:
    """(height, width, bytes the decoded array will take) read from the header only."""
    if fmt == "png":
        if len(data) < 26 or data[12:16] != b"IHDR":
            raise ImageDecodeError("unreadable PNG header (no IHDR)")
        width, height = struct.unpack(">II", data[16:24])
        depth, colour = data[24], data[25]
        return height, width, height * width * PNG_SAMPLES.get(colour, 4) * (2 if depth == 16 else 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return im.height, im.width, im.height * im.width * len(im.getbands())
    except Image.DecompressionBombError:
        raise ImageTooLargeError("image dimensions exceed the pixel limit") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on junk
        raise ImageDecodeError(f"unreadable {fmt.upper()} header ({type(exc).__name__})") from None


def _check_pixels(h: int, w: int, limits: Limits) -> None:
    if h * w > limits.max_pixels:
        raise ImageTooLargeError(
            f"image is {w}x{h} = {h * w / 1e6:.1f} MP, over the limit of "
            f"{limits.max_pixels / 1e6:.1f} MP (CXRTUNE_MAX_IMAGE_PIXELS)")


def png_significant_bits(data: bytes) -> int | None:
    """The grey significant bits of a PNG's ``sBIT`` chunk (the first byte: grey, or red for a
    colour PNG), or None without one. A chunk walk up to the first IDAT: neither OpenCV nor Pillow
    reports sBIT."""
    pos = len(PNG_MAGIC)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT" or length > len(data):
            return None
        if kind == b"sBIT" and length >= 1:
            bits = data[pos + 8]
            return bits if 1 <= bits <= 16 else None
        pos += 12 + length
    return None


def full_scale_16bit(arr: np.ndarray, significant_bits: int | None) -> float:
    """The value that means white in a 16-bit PNG, by one rule (docs/scoring.md):

    * with an ``sBIT`` chunk whose bits hold the stored maximum: 2^sBIT - 1 (12-bit data stored as
      it is, as PNG allows);
    * else 2^b - 1 for the smallest b of 8, 10, 12 and 14 bits that holds the stored maximum, when
      one does: a radiograph whose brightest pixel is under 1/4 of 16-bit full scale is unscaled
      8-14-bit data (8-bit values copied into a 16-bit file included), not a 16-bit image 94 % black;
    * else 65535 (a writer that scaled to 16 bits, as conforming ones do)."""
    peak = int(arr.max()) if arr.size else 0
    if significant_bits and peak <= (1 << significant_bits) - 1:
        return float((1 << significant_bits) - 1)
    for bits in (8, 10, 12, 14):
        if peak <= (1 << bits) - 1:
            return float((1 << bits) - 1)
    return 65535.0


def _to_unit_float(arr: np.ndarray, full_scale: float | None = None) -> np.ndarray:
    """Integer or float pixels -> float32 in [0, 1], by the dtype's range for integers (or
    ``full_scale`` for 16-bit data, :func:`full_scale_16bit`)."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return np.minimum(arr.astype(np.float32) / (full_scale or 65535.0), 1.0)
    arr = arr.astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def _to_gray(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        return arr
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.ndim == 3 and arr.shape[2] == 3:
        # cv2 decodes as BGR; radiographs are grey, so the channel order barely matters
        return cv2.cvtColor(arr, cv2.COLOR_BGR2GRAY)
    if arr.ndim == 3 and arr.shape[2] == 1:
        return arr[:, :, 0]
    raise ImageDecodeError(f"unexpected pixel array shape {arr.shape}")


# A colour image whose pixels stray this far from grey on average (a fraction of full scale) is a
# photograph, not a radiograph: real CXRs stored as RGB stay under 0.008 (brixia-dev's 89 JPEGs),
# a colour photograph is near 0.08 (bench/plausibility.py)
MAX_CHROMA = 0.03


def chroma(arr: np.ndarray) -> float:
    """How far a colour pixel array strays from grey: the mean absolute difference of each channel
    from the pixel's channel mean, as a fraction of full scale (0 for a grey image)."""
    if arr.ndim != 3 or arr.shape[2] < 3:
        return 0.0
    scale = 65535.0 if arr.dtype == np.uint16 else 255.0
    step = max(1, int(np.sqrt(arr.shape[0] * arr.shape[1] / 65536)))  # ~256 x 256 samples are plenty
    rgb = arr[::step, ::step, :3].astype(np.float32) / scale
    return float(np.abs(rgb - rgb.mean(axis=2, keepdims=True)).mean())


def decode_raster(data: bytes, limits: Limits = Limits(), max_chroma: float | None = None) -> np.ndarray:
    """PNG or JPEG bytes -> the raw pixel array (grey, original dtype).

    Args:
        max_chroma: refuse a colour image straying further from grey (:func:`chroma`): a
            photograph is not a radiograph. None: any colour becomes grey (masks).

    Raises:
        InputRefused: a colour photograph (only with ``max_chroma``)."""
    fmt = sniff_format(data)
    h, w, decoded = _header_size(data, fmt)
    _check_pixels(h, w, limits)
    if decoded > limits.max_decoded_bytes:  # e.g. a 16-bit RGBA PNG: 8 bytes a pixel
        raise ImageTooLargeError(f"image would decode to {decoded / 1e6:.0f} MB, over the limit of "
                                 f"{limits.max_decoded_bytes / 1e6:.0f} MB")
    # JPEG: 8-bit, with its EXIF orientation applied (IMREAD_UNCHANGED would ignore it);
    # PNG: as stored, 16-bit and alpha included
    flags = cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH if fmt == "jpeg" else cv2.IMREAD_UNCHANGED
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if arr is None or arr.size == 0:
        raise ImageDecodeError(f"corrupt or truncated {fmt.upper()} data")
    colour = chroma(arr) if max_chroma is not None else 0.0
    if max_chroma is not None and colour > max_chroma:
        raise InputRefused(f"a colour image (chroma {colour:.3f} > {max_chroma}): a photograph, not a radiograph")
    return _to_gray(arr)


def decode_image(data: bytes, limits: Limits = Limits()) -> np.ndarray:
    """Image bytes (PNG, JPEG, DICOM) -> 2-D float32 in [0, 1], bright = dense."""
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(f"file is {len(data) / 1e6:.1f} MB, over the limit of "
                                 f"{limits.max_bytes / 1e6:.1f} MB (CXRTUNE_MAX_IMAGE_BYTES)")
    if not data:
        raise ImageDecodeError("empty file")
    fmt = sniff_format(data)
    if fmt == "dicom":
        return read_dicom(data, limits=limits).pixels
    with DECODE_SLOTS:
        arr = decode_raster(data, limits, max_chroma=MAX_CHROMA)
    if arr.dtype == np.uint16:
        return _to_unit_float(arr, full_scale_16bit(arr, png_significant_bits(data)))
    return _to_unit_float(arr)


def decode_mask(data: bytes, limits: Limits = Limits()) -> np.ndarray:
    """Mask bytes -> 2-D bool. A mask of at most three levels (binary, or labelled: 0, one lung,
    the other) is inside wherever non-zero; one of more levels (a JPEG's ringing, anti-aliased
    edges) is inside from half its brightest level up, or its edges would swell the mask."""
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(f"mask file is {len(data) / 1e6:.1f} MB, over the limit")
    arr = decode_raster(data, limits)
    if len(np.unique(arr)) <= 3:
        return arr > 0
    return arr >= (int(arr.max()) + 1) // 2


def _read(uri: str, cache: storage.ContentCache | None, decode) -> np.ndarray:
    data = cache.read_bytes(uri) if cache else storage.read_bytes(uri)
    try:
        return decode(data)
    except (ImageDecodeError, ImageTooLargeError, UnsupportedFormatError) as exc:
        raise type(exc)(f"{uri}: {exc}") from None


def read_image(uri: str, cache: storage.ContentCache | None = None) -> np.ndarray:
    """Read an image from a local path or S3 URI; errors name the URI."""
    return _read(uri, cache, decode_image)


def read_mask(uri: str, cache: storage.ContentCache | None = None) -> np.ndarray:
    """A mask file (PNG/JPEG, local or s3://) as 2-D bool: any non-zero pixel is inside."""
    return _read(uri, cache, decode_mask)


def encode_png(arr: np.ndarray) -> bytes:
    """Lossless PNG: bool -> 0/255 8-bit, uint8/uint16 kept, float [0,1] -> 16-bit."""
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype.kind == "f":
        arr = np.round(np.clip(arr, 0.0, 1.0) * 65535.0).astype(np.uint16)
    elif arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"cannot write {arr.dtype} as PNG")
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def write_png(uri: str, arr: np.ndarray) -> None:
    storage.write_bytes(uri, encode_png(arr))
