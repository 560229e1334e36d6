"""DICOM chest radiographs: correct pixels, safe metadata, and the seed-000 exclusion rules.

Pixels: stored values -> Modality LUT (rescale slope/intercept or LUT) -> VOI LUT or window ->
MONOCHROME1 inverted, so that bright = dense for every file. BitsStored 8-16 and the compressed
transfer syntaxes that pydicom's pylibjpeg plugins decode (JPEG Baseline/Extended/Lossless, JPEG-LS,
JPEG 2000) are supported.

Patient identifiers (PatientID, AccessionNumber, names, UIDs) never leave this module in clear. With
a study key (:func:`pseudonym_key`: ``CXRTUNE_PSEUDONYM_KEY`` or a key file) they are replaced by keyed
HMAC-SHA256 pseudonyms, so that patient-level splits still work while logs, manifests and reports hold
no identifier; the same key on two machines gives the same pseudonyms. There is no default key: an
import without one is refused. Without a key (scoring), the identifier fields are simply left empty.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import re
import struct
import threading
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CxrtuneError, ImageDecodeError, ImageTooLargeError

# Decode limits for every format (images.py, which reads PNG/JPEG and hands DICOM here, uses them too).
MAX_BYTES = int(os.environ.get("CXRTUNE_MAX_IMAGE_BYTES", 256 * 1024 * 1024))
# the largest CXR detectors are about 4,300 x 4,300 (18.5 MP); 32 MP leaves room and refuses the rest
MAX_PIXELS = int(os.environ.get("CXRTUNE_MAX_IMAGE_PIXELS", 32 * 1024 * 1024))
# what a Deflated DICOM may inflate to: a 32 MP 16-bit image is 64 MB, plus its header
MAX_DECODED_BYTES = int(os.environ.get("CXRTUNE_MAX_DECODED_BYTES", 72 * 1024 * 1024))


# At most this many pixel decodes at once per process (the Serve ingress decodes in threads): a
# 32 MP 16-bit decode holds ~0.3 GB, and six at once grew the ingress by ~1 GB.
DECODE_SLOTS = threading.BoundedSemaphore(int(os.environ.get("CXRTUNE_DECODE_CONCURRENCY", 2)))


@dataclass(frozen=True)
class Limits:
    """Byte and pixel limits for one decode (Serve tightens them per request).

    ``max_bytes`` bounds the file as it arrives, ``max_decoded_bytes`` what a Deflated DICOM
    inflates to (51 kB of zeros inflate to 52 MB), ``max_pixels`` the frame that is decoded, read
    from the header and from the compressed codestream's own size before any pixel is decoded."""

    max_bytes: int = MAX_BYTES
    max_pixels: int = MAX_PIXELS
    max_decoded_bytes: int = MAX_DECODED_BYTES

PSEUDONYM_ENV = "CXRTUNE_PSEUDONYM_KEY"
MIN_KEY_CHARS = 16
KEY_HOWTO = ("create one study key once, e.g. `openssl rand -hex 32 > study.key`, then pass "
             "`--pseudonym-key-file study.key` (or set CXRTUNE_PSEUDONYM_KEY to its content); use the "
             "same key on every machine importing for the same study, and keep it out of the data and "
             "out of version control")
SECONDARY_CAPTURE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # .7 and its multi-frame family .7.1-.7.4
# DX, mammography and intra-oral images "for processing": raw detector data, not for display
FOR_PROCESSING_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.2.1",
                              "1.2.840.10008.5.1.4.1.1.1.3.1"}

FRONTAL_VIEWS = {"PA", "AP"}
RADIOGRAPHY_MODALITIES = {"CR", "DX", "RG", "DR"}
CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG", "TORSO", "PORT CHEST")


class NotAnImageError(ImageDecodeError):
    """A valid DICOM file that holds no image (a report, a PDF, a structured document)."""


def pseudonym_key(key_file: str | Path | None = None) -> bytes:
    """The study's pseudonym key: the stripped content of ``key_file`` if given, else
    ``$CXRTUNE_PSEUDONYM_KEY``. Raises :class:`CxrtuneError` (saying how to make one) when there is
    none or it is shorter than :data:`MIN_KEY_CHARS` characters."""
    if key_file:
        try:
            key = Path(key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CxrtuneError(f"--pseudonym-key-file {key_file}: cannot read it "
                               f"({type(exc).__name__}); {KEY_HOWTO}") from None
        where = f"--pseudonym-key-file {key_file}"
    else:
        key = (os.environ.get(PSEUDONYM_ENV) or "").strip()
        where = PSEUDONYM_ENV
    if not key:
        raise CxrtuneError("a DICOM import needs the study's pseudonym key and none is set: "
                           f"{KEY_HOWTO}" if not key_file else f"{where} is empty; {KEY_HOWTO}")
    if len(key) < MIN_KEY_CHARS:
        raise CxrtuneError(f"{where}: the pseudonym key has {len(key)} characters, fewer than "
                           f"{MIN_KEY_CHARS}; a short key lets anyone recompute pseudonyms; {KEY_HOWTO}")
    return key.encode("utf-8")


def pseudonym(value: str | None, kind: str, key: bytes | str) -> str:
    """Keyed, stable pseudonym of an identifier (``key`` from :func:`pseudonym_key`); empty in,
    empty out."""
    if not value:
        return ""
    if not key:
        raise CxrtuneError(f"no pseudonym key; {KEY_HOWTO}")
    key = key.encode("utf-8") if isinstance(key, str) else bytes(key)
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
    sop_class: str = ""
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

    @property
    def secondary_capture(self) -> bool:
        """A Secondary Capture SOP class (1.2.840.10008.5.1.4.1.1.7 and .7.x): screenshots, scans."""
        uid = self.sop_class
        return uid == SECONDARY_CAPTURE_SOP_CLASS or uid.startswith(SECONDARY_CAPTURE_SOP_CLASS + ".")

    def exclusion_reason(self, min_age: float = 18.0, keep_derived: bool = False) -> str | None:
        """The seed-000 rule this image breaks, or None to keep it. Scoring uses it too (``min_age=0``).

        Post-processed images: ``SECONDARY`` in ImageType's second value (screenshots, reformats,
        ``DERIVED\\SECONDARY``) and the Secondary Capture SOP classes are dropped unless
        ``keep_derived``. ``DERIVED\\PRIMARY`` is what many CR/DX units write for their routine
        processed-for-presentation image: always kept.
        """
        if not self.has_pixels:
            return "no image: a DICOM without pixel data (report, document or structured data)"
        if self.modality and self.modality not in RADIOGRAPHY_MODALITIES:
            return f"not a radiograph (Modality {self.modality})"
        if self.body_part and not any(p in self.body_part for p in CHEST_BODY_PARTS):
            return f"not a chest image (BodyPartExamined {self.body_part})"
        if self.view and self.view not in FRONTAL_VIEWS:
            return f"non-frontal view (ViewPosition {self.view})"
        if self.sop_class in FOR_PROCESSING_SOP_CLASSES:
            return f"an image for processing, not for presentation (SOPClassUID {self.sop_class})"
        if not keep_derived:
            if self.secondary_capture:
                return f"secondary capture (SOPClassUID {self.sop_class}; --keep-derived keeps it)"
            if len(self.image_type) > 1 and self.image_type[1] == "SECONDARY":
                kind = "/".join(self.image_type[:2])
                return f"post-processed image (ImageType {kind}; --keep-derived keeps it)"
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


def drop_warnings() -> None:
    """Route Python warnings to logging and drop them, process-wide: pydicom's and highdicom's
    warnings quote DICOM values (highdicom's about a person name without a caret quotes the name).
    For the processes that handle patient data (the PACS listener and poller, the Serve ingress);
    call at their start."""
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)  # warnings are logged at WARNING: dropped
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # pydicom logs its value warnings as well


def header_of(ds, key: bytes | str | None = None) -> DicomHeader:
    """Extract the header fields. With ``key``, every identifier is pseudonymised; without one
    (scoring) ``patient``, ``accession`` and ``instance`` are left empty: never in clear."""
    with warnings.catch_warnings():  # pydicom's value warnings quote the values: never show them
        warnings.simplefilter("ignore")
        try:
            return _header_fields(ds, key)
        except CxrtuneError:
            raise
        except Exception as exc:  # noqa: BLE001 - a malformed element, converted on first access
            raise ImageDecodeError(f"unreadable DICOM header ({type(exc).__name__})") from None


def _header_fields(ds, key: bytes | str | None) -> DicomHeader:
    view = _str(ds, "ViewPosition").upper()
    raw_type = ds.get("ImageType") or ()
    image_type = (str(raw_type).upper(),) if isinstance(raw_type, str) else tuple(str(v).upper() for v in raw_type)
    ts, sop_class = "", _str(ds, "SOPClassUID")
    if getattr(ds, "file_meta", None) is not None:
        ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
        sop_class = sop_class or str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "").strip()

    def pseudo(name: str, kind: str) -> str:
        return pseudonym(_str(ds, name), kind, key) if key else ""

    return DicomHeader(
        patient=pseudo("PatientID", "patient"),
        accession=pseudo("AccessionNumber", "accession"),
        instance=pseudo("SOPInstanceUID", "instance"),
        modality=_str(ds, "Modality").upper(),
        view=view,
        body_part=_str(ds, "BodyPartExamined").upper(),
        image_type=image_type,
        sop_class=sop_class,
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


# how much of a Deflated dataset is inflated before its declared size is read from it, and what
# may follow the declared pixels (the header after Rows, trailing elements)
HEADER_PROBE_BYTES = 64 * 1024
HEADER_SLACK_BYTES = 1024 * 1024


def inflate_capped(data: bytes, cap: int, declared: Callable[[bytes], int | None] | None = None) -> bytes:
    """Raw DEFLATE ``data`` inflated through a stream that stops past ``cap`` bytes: a
    decompression bomb costs at most ``cap`` + 1 bytes before it is refused.

    Args:
        declared: called once with the first ``HEADER_PROBE_BYTES`` inflated; it may raise, or
            return a lower cap (what the dataset declares it holds), or None to keep ``cap``.

    Raises:
        ImageTooLargeError: it inflates to more than the cap.
        ImageDecodeError: not a DEFLATE stream, or one without its final block."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    pending = data
    probe = HEADER_PROBE_BYTES if declared else 0
    try:
        while pending and not inflater.eof:
            until = min(cap + 1, probe) if probe else cap + 1
            out += inflater.decompress(pending, until - len(out))
            pending = inflater.unconsumed_tail
            if probe and (len(out) >= probe or inflater.eof or not pending):
                probe = 0
                cap = min(cap, declared(bytes(out)) or cap)  # type: ignore[misc]
            if len(out) > cap:
                raise ImageTooLargeError(f"Deflated DICOM inflates to more than {cap / 1e6:.1f} MB "
                                         "(what its header declares, or CXRTUNE_MAX_DECODED_BYTES)")
    except zlib.error:
        raise ImageDecodeError("corrupt Deflated DICOM (not a DEFLATE stream)") from None
    if not inflater.eof:  # cut short, or never closed: pydicom, which inflates it again for results, refuses it
        raise ImageDecodeError("corrupt Deflated DICOM (its DEFLATE stream does not end)")
    return bytes(out)


def declared_dataset_bytes(prefix: bytes, max_pixels: int) -> int | None:
    """What an Explicit VR Little Endian dataset whose first bytes are ``prefix`` may hold, from
    the Rows, Columns, SamplesPerPixel, BitsAllocated and NumberOfFrames it declares: their pixels
    plus ``HEADER_SLACK_BYTES``. None when the prefix does not reach Rows and Columns.

    Raises:
        ImageTooLargeError: it declares a frame of more than ``max_pixels``."""
    from pydicom.filereader import data_element_generator

    found: dict[int, bytes] = {}
    wanted = {0x00280002, 0x00280008, 0x00280010, 0x00280011, 0x00280100}
    try:
        for elem in data_element_generator(io.BytesIO(prefix), False, True, stop_when=_pixel_data_tag,
                                           defer_size=HEADER_PROBE_BYTES):
            if elem.tag in wanted and isinstance(elem.value, bytes):
                found[int(elem.tag)] = elem.value
    except Exception:  # noqa: BLE001 - the prefix ends inside an element: keep what was read
        pass

    def us(tag: int, default: int) -> int:
        v = found.get(tag, b"")
        return int.from_bytes(v[:2], "little") if len(v) >= 2 else default
    rows, columns = us(0x00280010, 0), us(0x00280011, 0)
    if not rows or not columns:
        return None
    if rows * columns > max_pixels:
        raise ImageTooLargeError(f"Deflated DICOM declares {columns}x{rows}: over "
                                 f"{max_pixels / 1e6:.1f} MP (CXRTUNE_MAX_IMAGE_PIXELS)")
    try:
        frames = max(1, int(found.get(0x00280008, b"1").decode("ascii", "replace").strip("\0 ") or 1))
    except ValueError:
        frames = 1
    bits = max(1, us(0x00280100, 16))
    return rows * columns * us(0x00280002, 1) * -(-bits // 8) * frames + HEADER_SLACK_BYTES


def _inflated_dataset(fp, stop_before_pixels: bool, limits: Limits):
    """A Deflated Explicit VR Little Endian file read with its dataset inflated here, capped
    (:func:`inflate_capped`) by ``max_decoded_bytes`` and by what its header declares
    (:func:`declared_dataset_bytes`), instead of by pydicom, which inflates it whole before any
    check. None for any other transfer syntax (``fp`` rewound for pydicom)."""
    from pydicom.dataset import FileDataset
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    start = fp.tell()
    try:
        preamble = read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
    except Exception:  # noqa: BLE001 - not a file meta pydicom can read: dcmread gives the error
        fp.seek(start)
        return None
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        fp.seek(start)
        return None
    body = inflate_capped(fp.read(), limits.max_decoded_bytes,
                          lambda prefix: declared_dataset_bytes(prefix, limits.max_pixels))
    dataset = read_dataset(io.BytesIO(body), is_implicit_VR=False, is_little_endian=True,
                           stop_when=_pixel_data_tag if stop_before_pixels else None)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian  # what the inflated bytes are
    ds = FileDataset("", dataset, preamble=preamble, file_meta=meta)
    ds.set_original_encoding(False, True)
    return ds


def _pixel_data_tag(tag, vr, length) -> bool:
    return tag >= 0x7FE00010


def _dcmread(source, stop_before_pixels: bool, limits: Limits | None = None):
    import pydicom
    from pydicom.errors import InvalidDicomError

    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inflated = _inflated_dataset(fp, stop_before_pixels, limits or Limits())
            if inflated is not None:
                return inflated
            return pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels)
    except CxrtuneError:
        raise
    except InvalidDicomError:
        raise ImageDecodeError("not a DICOM file (no DICM preamble)") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on junk
        raise ImageDecodeError(f"unreadable DICOM ({type(exc).__name__})") from None
    finally:
        if not isinstance(source, (bytes, bytearray)):
            fp.close()


def read_header(source: bytes | str | Path, key: bytes | str | None = None) -> DicomHeader:
    """Header only (no pixel decoding): cheap enough for a first pass over thousands of files.
    ``key``: see :func:`header_of`."""
    return header_of(_dcmread(str(source) if isinstance(source, Path) else source, True), key)


@dataclass
class DicomImage:
    pixels: np.ndarray  # float32 [0, 1], bright = dense
    header: DicomHeader


def pixels_of(ds) -> np.ndarray:
    """Decoded, display-ready pixels of the first frame only (a multi-frame CXR is scored on its
    first frame; the others are never decoded): modality LUT, VOI LUT/window, MONOCHROME1
    inversion. Colour (RGB, or YBR that pydicom converts to RGB) becomes grey by one rule: the
    luminance 0.299 R + 0.587 G + 0.114 B, as for colour PNG and JPEG."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples not in (1, 3):
        raise ImageDecodeError(f"SamplesPerPixel {samples} is not supported (1 grey or 3 colour)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds.pixel_array_options(index=0)  # the first frame only
            arr = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - missing plugin, truncated data, bad syntax
            msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            fn = getattr(ds, "filename", None)
            if isinstance(fn, str) and fn:  # a message must never carry the file's path
                for part in (fn, Path(fn).name):
                    msg = msg.replace(part, "<file>")
            raise ImageDecodeError(f"cannot decode DICOM pixel data: {msg}") from None
    if arr.ndim == 3 and samples == 1:
        arr = arr[0]  # a decoder that ignored the frame index: the first frame
    elif arr.ndim == 4:
        arr = arr[0]
    if arr.ndim == 3:  # colour: luminance
        values = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    elif arr.ndim != 2:
        raise ImageDecodeError(f"unexpected DICOM pixel array of {arr.ndim} dimensions")
    else:
        try:
            values = apply_modality_lut(arr, ds)
        except Exception as exc:  # noqa: BLE001 - malformed Modality LUT or rescale attributes: a plain reason
            raise ImageDecodeError(f"malformed modality LUT or rescale attributes ({type(exc).__name__})") from None
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


def read_dicom(source: bytes | str | Path, limits=None, key: bytes | str | None = None) -> DicomImage:
    """Read one DICOM file completely; raises :class:`ImageDecodeError` with a plain reason (never
    the file's path). No key is needed: without one the header's identifier fields are empty."""
    limits = limits or Limits()
    ds = _dcmread(str(source) if isinstance(source, Path) else source, False, limits)
    try:
        return _image_of(ds, limits, key)
    except CxrtuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - a hostile header breaks pydicom in many ways: one plain reason
        raise ImageDecodeError(f"malformed DICOM ({type(exc).__name__})") from None


def _image_of(ds, limits: Limits, key: bytes | str | None) -> DicomImage:
    header = header_of(ds, key)
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise NotAnImageError("DICOM holds no image (no PixelData)")
    if header.rows * header.columns > limits.max_pixels:
        raise ImageTooLargeError(f"DICOM is {header.columns}x{header.rows}, over the pixel limit")
    if header.bits_stored and not 1 <= header.bits_stored <= 16:
        raise ImageDecodeError(f"BitsStored {header.bits_stored} is not supported (8-16)")
    check_codestream(ds, header.rows, header.columns, limits)
    with DECODE_SLOTS:
        return DicomImage(pixels_of(ds), header)


JPEG_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF,
                    0xF7}  # baseline ... lossless, arithmetic, and JPEG-LS's SOF55
JPEG_STANDALONE = {0x01, *range(0xD0, 0xD9)}  # TEM, RSTn, SOI: no length field


def codestream_size(frame: bytes) -> tuple[int, int] | None:
    """(height, width) that a compressed frame declares in its own headers: JPEG 2000's SIZ
    marker, or a JPEG / JPEG-LS start-of-frame. The decoder allocates what these say, whatever
    the DICOM header's Rows and Columns say. None when neither is found (RLE, other codecs).
    Hand-written: the codecs' Python bindings offer no header-only read."""
    siz = frame.find(b"\xff\x4f\xff\x51")  # SOC then SIZ
    if siz >= 0 and len(frame) >= siz + 24:
        xsiz, ysiz, xo, yo = struct.unpack(">IIII", frame[siz + 8:siz + 24])
        return max(ysiz - yo, 0), max(xsiz - xo, 0)
    if not frame.startswith(b"\xff\xd8"):
        return None
    pos = 2
    while pos + 4 <= len(frame):
        if frame[pos] != 0xFF:
            return None
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in JPEG_STANDALONE:
            pos += 2
            continue
        length = struct.unpack(">H", frame[pos + 2:pos + 4])[0]
        if marker in JPEG_SOF_MARKERS and pos + 9 <= len(frame):
            height, width = struct.unpack(">HH", frame[pos + 5:pos + 9])
            return height, width
        if marker == 0xDA:  # start of scan before any frame header
            return None
        pos += 2 + length
    return None


def check_codestream(ds, rows: int, columns: int, limits: Limits) -> None:
    """For encapsulated (compressed) pixel data: the first frame's codestream must declare the
    header's size, within the pixel limit, before the decoder sees it (a 4,096 x 4,096 JPEG 2000
    under a 64 x 64 header was decoded before it was refused)."""
    from pydicom.encaps import generate_frames

    transfer_syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if transfer_syntax is None or not transfer_syntax.is_encapsulated or "PixelData" not in ds:
        return
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))
    except Exception:  # noqa: BLE001 - malformed encapsulation: a plain reason
        raise ImageDecodeError("malformed encapsulated DICOM pixel data") from None
    size = codestream_size(frame)
    if size is None:
        return
    height, width = size
    if height * width > limits.max_pixels:
        raise ImageTooLargeError(f"DICOM codestream is {width}x{height}, over the pixel limit")
    if (height, width) != (rows, columns):
        raise ImageDecodeError(f"DICOM codestream is {width}x{height} but the header says {columns}x{rows}")
