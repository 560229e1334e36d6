"""DICOM chest radiographs: correct pixels, safe metadata, and the seed-000 exclusion rules.

Pixels: stored values -> Modality LUT (rescale slope/intercept or LUT) -> VOI LUT or window ->
MONOCHROME1 inverted, so that bright = dense for every file. BitsStored 8-16 and the compressed
transfer syntaxes that pydicom's pylibjpeg plugins decode (JPEG Baseline/Extended/Lossless, JPEG-LS,
JPEG 2000) are supported.

Patient identifiers (PatientID, AccessionNumber, names, UIDs) never leave this module in clear: they
are replaced by keyed HMAC-SHA256 pseudonyms (key from ``CXRTUNE_PSEUDONYM_KEY``), so that patient-level
splits still work while logs, manifests and reports hold no identifier.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ImageDecodeError, ImageTooLargeError

PSEUDONYM_ENV = "CXRTUNE_PSEUDONYM_KEY"
_DEFAULT_KEY = "cxrtune-default-pseudonym-key"  # set CXRTUNE_PSEUDONYM_KEY for real deployments

FRONTAL_VIEWS = {"PA", "AP"}
RADIOGRAPHY_MODALITIES = {"CR", "DX", "RG", "DR"}
CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG", "TORSO", "PORT CHEST")


class NotAnImageError(ImageDecodeError):
    """A valid DICOM file that holds no image (a report, a PDF, a structured document)."""


def pseudonym(value: str | None, kind: str) -> str:
    """Keyed, stable pseudonym of an identifier; empty in, empty out."""
    if not value:
        return ""
    key = (os.environ.get(PSEUDONYM_ENV) or _DEFAULT_KEY).encode("utf-8")
    digest = hmac.new(key, f"{kind}:{value}".encode("utf-8"), hashlib.sha256).hexdigest()
    return f"{kind[:3]}-{digest[:16]}"


def parse_age_years(age: str | None) -> float | None:
    """DICOM AS value (``045Y``, ``006M``, ``012W``, ``003D``) -> years; None when absent/bad."""
    if not age:
        return None
    m = re.fullmatch(r"\s*(\d{1,3})\s*([DWMY]?)\s*", str(age).upper())
    if not m:
        return None
    n, unit = int(m.group(1)), m.group(2) or "Y"
    return n / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[unit]


@dataclass
class DicomHeader:
    """What cxrtune needs from a DICOM header, with identifiers already pseudonymised."""

    patient: str = ""
    accession: str = ""
    instance: str = ""
    modality: str = ""
    view: str = ""
    body_part: str = ""
    image_type: tuple[str, ...] = ()
    age_years: float | None = None
    sex: str = ""
    rows: int = 0
    columns: int = 0
    bits_stored: int = 0
    photometric: str = ""
    transfer_syntax: str = ""
    has_pixels: bool = False
    series_number: int = 0
    instance_number: int = 0
    acquired: str = ""

    def exclusion_reason(self, min_age: float = 18.0, drop_derived: bool = False) -> str | None:
        """The seed-000 rule this image breaks, or None to keep it.

        Post-processed images: ``SECONDARY`` images are always dropped; ``DERIVED\\PRIMARY`` is what
        many CR/DX units write for their routine processed-for-presentation image, so it is kept
        unless ``drop_derived`` (for sites that mark filtered copies as DERIVED).
        """
        if not self.has_pixels:
            return "no image: a DICOM without pixel data (report, document or structured data)"
        if self.modality and self.modality not in RADIOGRAPHY_MODALITIES:
            return f"not a radiograph (Modality {self.modality})"
        if self.body_part and not any(p in self.body_part for p in CHEST_BODY_PARTS):
            return f"not a chest image (BodyPartExamined {self.body_part})"
        if self.view and self.view not in FRONTAL_VIEWS:
            return f"non-frontal view (ViewPosition {self.view})"
        secondary = len(self.image_type) > 1 and self.image_type[1] == "SECONDARY"
        derived = bool(self.image_type) and self.image_type[0] == "DERIVED"
        if secondary or (drop_derived and derived):
            kind = "/".join(self.image_type[:2])
            return f"post-processed image (ImageType {kind})"
        if self.age_years is not None and self.age_years < min_age:
            return f"patient under {min_age:g} years"
        return None


def _str(ds, name: str) -> str:
    v = ds.get(name, "")
    return str(v).strip() if v is not None else ""


def _int(ds, name: str) -> int:
    try:
        return int(ds.get(name, 0) or 0)
    except (TypeError, ValueError):
        return 0


def header_of(ds) -> DicomHeader:
    """Extract the header fields, pseudonymising every identifier."""
    view = _str(ds, "ViewPosition").upper()
    image_type = tuple(str(v).upper() for v in (ds.get("ImageType") or ()))
    ts = ""
    if getattr(ds, "file_meta", None) is not None:
        ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    return DicomHeader(
        patient=pseudonym(_str(ds, "PatientID"), "patient"),
        accession=pseudonym(_str(ds, "AccessionNumber"), "accession"),
        instance=pseudonym(_str(ds, "SOPInstanceUID"), "instance"),
        modality=_str(ds, "Modality").upper(),
        view=view,
        body_part=_str(ds, "BodyPartExamined").upper(),
        image_type=image_type,
        age_years=parse_age_years(_str(ds, "PatientAge")),
        sex=_str(ds, "PatientSex").upper()[:1],
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        bits_stored=_int(ds, "BitsStored"),
        photometric=_str(ds, "PhotometricInterpretation").upper(),
        transfer_syntax=ts,
        # a header-only read stops before PixelData: an image has Rows and Columns, a report or
        # encapsulated PDF has neither; the full read still refuses a file with no pixel data
        has_pixels=("PixelData" in ds or "FloatPixelData" in ds or ("Rows" in ds and "Columns" in ds)),
        series_number=_int(ds, "SeriesNumber"),
        instance_number=_int(ds, "InstanceNumber"),
        acquired=_str(ds, "AcquisitionDateTime") or (_str(ds, "AcquisitionDate") + _str(ds, "AcquisitionTime")),
    )


def _dcmread(source, stop_before_pixels: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError

    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        raise ImageDecodeError("not a DICOM file (no DICM preamble)") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on junk
        raise ImageDecodeError(f"unreadable DICOM ({type(exc).__name__})") from None


def read_header(source: bytes | str | Path) -> DicomHeader:
    """Header only (no pixel decoding): cheap enough for a first pass over thousands of files."""
    return header_of(_dcmread(str(source) if isinstance(source, Path) else source, True))


@dataclass
class DicomImage:
    pixels: np.ndarray  # float32 [0, 1], bright = dense
    header: DicomHeader


def pixels_of(ds) -> np.ndarray:
    """Decoded, display-ready pixels: modality LUT, VOI LUT/window, MONOCHROME1 inversion."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            arr = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - missing plugin, truncated data, bad syntax
            msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise ImageDecodeError(f"cannot decode DICOM pixel data: {msg}") from None
    if arr.ndim == 3 and int(ds.get("SamplesPerPixel", 1) or 1) == 1:
        arr = arr[0]  # multi-frame: the first frame
    if arr.ndim == 3:  # colour secondary capture: luminance
        arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        values = arr
    else:
        values = apply_modality_lut(arr, ds)
        if "VOILUTSequence" in ds or "WindowCenter" in ds:
            try:
                values = apply_voi_lut(values, ds, index=0, prefer_lut=True)
            except Exception:  # noqa: BLE001 - malformed VOI attributes: fall back to full range
                pass
    values = np.asarray(values, dtype=np.float32)
    lo, hi = float(np.min(values)), float(np.max(values))
    out = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    if _str(ds, "PhotometricInterpretation").upper() == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32)


def read_dicom(source: bytes | str | Path, limits=None) -> DicomImage:
    """Read one DICOM file completely; raises :class:`ImageDecodeError` with a plain reason."""
    from .images import Limits

    limits = limits or Limits()
    ds = _dcmread(str(source) if isinstance(source, Path) else source, False)
    header = header_of(ds)
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise NotAnImageError("DICOM holds no image (no PixelData)")
    if header.rows * header.columns > limits.max_pixels:
        raise ImageTooLargeError(f"DICOM is {header.columns}x{header.rows}, over the pixel limit")
    if header.bits_stored and not 1 <= header.bits_stored <= 16:
        raise ImageDecodeError(f"BitsStored {header.bits_stored} is not supported (8-16)")
    return DicomImage(pixels_of(ds), header)
