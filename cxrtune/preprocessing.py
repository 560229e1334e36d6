"""How an image becomes a model input, shared by training and inference.

* :func:`load_scan` is the first step of the scoring policy for every caller (``cxrtune score``,
  ``evaluate``, ``calibrate``, the Serve ingress): decode (keeping the DICOM header), input checks
  (size, blank, DICOM exclusion rules) and the downscale to the working size.
* :class:`Preprocessing` turns a working image into a tensor at a model's size; it is stored with
  every checkpoint and bundle.
* :func:`extract_roi` is seed 004's ROI step, applied to the *cleaned* lungs
  (:func:`cxrtune.zones.clean_lungs`) in training (reference masks) and in use (Stage I masks),
  so Stage II sees in use what it saw in training.

Imports no training code: the scorer and Serve stand on this module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np
import torch

from .dicom import Limits, read_dicom
from .errors import ImageDecodeError, ImageTooLargeError, InputRefused
from .images import decode_image, sniff_format
from .zones import clean_lungs

IMAGENET_MEAN = 0.449  # grey equivalent of ImageNet's RGB mean/std, for 1-channel input
IMAGENET_STD = 0.226
WORK_SIZE = 1024  # long side of the working copy, CLI and Serve alike: zones are scale-invariant
MIN_SIDE = 32  # a smaller image is not a radiograph


@dataclass
class Preprocessing:
    """How an image becomes a model input; stored with every checkpoint and bundle."""

    size: int = 256
    in_channels: int = 1
    mean: float = IMAGENET_MEAN
    std: float = IMAGENET_STD

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(**{k: d[k] for k in ("size", "in_channels", "mean", "std") if k in d})

    def to_tensor(self, image: np.ndarray) -> torch.Tensor:
        """HxW at model size, float [0, 1] or uint8 -> C x H x W normalised tensor."""
        image = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else np.ascontiguousarray(image, np.float32)
        x = torch.from_numpy((image - self.mean) / self.std)[None]
        return x.expand(self.in_channels, -1, -1).contiguous() if self.in_channels > 1 else x


def lung_box(lung: np.ndarray, margin: float = 0.05) -> tuple[int, int, int, int] | None:
    """``(y0, y1, x0, x1)``: the lungs' bounding box grown by ``margin`` of its size, or None."""
    ys, xs = np.nonzero(lung)
    if len(ys) == 0:
        return None
    h, w = lung.shape
    my, mx = int(margin * (ys.max() - ys.min() + 1)), int(margin * (xs.max() - xs.min() + 1))
    return (max(0, ys.min() - my), min(h, ys.max() + 1 + my), max(0, xs.min() - mx), min(w, xs.max() + 1 + mx))


def extract_roi(image: np.ndarray, lung: np.ndarray, *masks: np.ndarray):
    """Seed 004's ROI step on the cleaned lungs: image AND lungs, cropped to the lungs' box (masks
    cropped alike). Returns ``(image, masks, box)``; with no lungs the whole image is kept and box
    is None."""
    lungs = clean_lungs(lung)
    box = lung_box(lungs)
    if box is None:
        return image, list(masks), None
    y0, y1, x0, x1 = box
    roi = (image * lungs)[y0:y1, x0:x1]
    return roi, [m[y0:y1, x0:x1] for m in masks], box


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)


def to_working_size(image: np.ndarray, work_size: int = WORK_SIZE) -> np.ndarray:
    """Downscale (never upscale) so the long side is at most ``work_size``; float32 out."""
    h, w = image.shape
    scale = work_size / max(h, w)
    if scale < 1:
        image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image, dtype=np.float32)


@dataclass
class Scan:
    """One input, ready for Stage I: the working image and what the record says about the input."""

    image: np.ndarray  # float32 [0, 1], long side <= the working size
    format: str  # png, jpeg or dicom
    width: int  # the file's own size
    height: int
    dicom: object | None = None  # the DicomHeader (pseudonymous fields only), for DICOM input


def check_image(image: np.ndarray) -> None:
    """The input rules for any decoded image: big enough, not blank."""
    h, w = image.shape
    if min(h, w) < MIN_SIDE:
        raise InputRefused(f"image is {w}x{h}: too small to be a radiograph")
    if float(image.std()) < 1e-3:
        raise InputRefused("blank image: every pixel has the same value")


def load_scan(data: bytes, limits=None, work_size: int = WORK_SIZE, header_rules: bool = True) -> Scan:
    """Bytes (PNG 8/16-bit, JPEG, DICOM) -> a checked :class:`Scan` at the working size.
    ``header_rules=False`` reads a DICOM that the header rules would refuse (a lateral view: the
    not-frontal radiographs that ``cxrtune calibrate --not-frontal`` fits on); the limits hold.

    Raises UnsupportedFormatError (not an image), ImageTooLargeError (bytes or pixels over
    ``limits``), ImageDecodeError (corrupt) or :class:`InputRefused` (rules)."""
    limits = limits or Limits()
    if not data:
        raise ImageDecodeError("empty file")
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(f"file is {len(data) / 1e6:.1f} MB, over the limit of {limits.max_bytes / 1e6:.1f} MB")
    fmt = sniff_format(data)
    header = None
    if fmt == "dicom":
        dcm = read_dicom(data, limits=limits)
        reason = dcm.header.exclusion_reason(min_age=0) if header_rules else None  # age refuses no score
        if reason:
            raise InputRefused(f"DICOM not scorable: {reason}")
        image, header = dcm.pixels, dcm.header
    else:
        image = decode_image(data, limits)
    check_image(image)
    h, w = image.shape
    # at 8-bit levels before any resampling, as the 8-bit training images were: a 12- or 16-bit
    # copy of an image then gets its 8-bit copy's record (resampled at full precision, sub-level
    # differences flip roundings in Stage II's input and moved a zone's opacity fraction by 0.07)
    return Scan(to_working_size(from_uint8(to_uint8(image)), work_size), fmt, w, h, header)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A [0, 1] float image (or probability map) as uint8: what moves between the ingress and the
    stages (a quarter of float32's bytes; the training images were 8-bit, and 1/255 is far finer
    than any threshold needs)."""
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def from_uint8(u8: np.ndarray) -> np.ndarray:
    """:func:`to_uint8`'s inverse: float32 in [0, 1]."""
    return u8.astype(np.float32) * np.float32(1 / 255)
