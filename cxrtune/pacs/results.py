"""A score record as DICOM: a Comprehensive 3D SR holding a TID 1500 measurement report, and a
binary SEG of the lungs and the opacity, each in its own new series of the source image's study.

Written with highdicom, which builds the templates, the patient and study modules (copied from
the source) and the references; what is cxrtune's own is the content: which codes, which
groups, and UIDs that a resend of the same result reproduces (docs/pacs.md has the content tree).

* **Codes.** Standard codes where they exist: SNOMED CT for the procedure, the lungs and yes/no,
  DCM for opacity, the device observer and the algorithm family, UCUM for units. cxrtune's
  equal-area zones A-F, its score (affected zones, 0-6; not a Brixia score, whose zones follow
  anatomical landmarks), its status and its thresholds have no standard code: they are in the
  private scheme ``99CXRTUNE``, declared in the Coding Scheme Identification Sequence.
* **Groups (TID 1501).** One for the image: the status (coded), the score when the record is
  ``scored`` (never a 0 for an unscored one), p(disease), the opacity percent of each lung found,
  and the four thresholds used (T, T_cls, opacity, Stage I lung); then one per zone that exists: affected (yes/no) and its opacity
  fraction. Each names the algorithm (TID 4019: bundle name; version = bundle content hash,
  runtime and cxrtune version), as IHE AI Results asks.
* **Overlay (optional, off by default).** For viewers that show neither SEG on CR/DX nor TID 1500:
  a Secondary Capture in a third series, the overlay picture of ``scoring/overlay.py`` (lungs,
  zones, opacity, the score) with "NOT FOR DIAGNOSTIC USE" burned in and Burned In Annotation YES.
* **UIDs.** Series and instance UIDs are name-based UUIDs (``2.25.``, PS3.5 B.2) of the source SOP
  Instance UID, the bundle's content hash, the runtime and the object's kind.
"""

from __future__ import annotations

import email.parser
import io
import logging
import uuid
import warnings
from dataclasses import dataclass

import cv2
import highdicom as hd
import numpy as np
from pydicom import Dataset, dcmread, valuerep
from pydicom.charset import convert_encodings
from pydicom.sr.codedict import codes

from .. import __version__
from ..errors import CxrtuneError
from ..scoring.overlay import render_overlay
from ..scoring.scorer import Detail
from ..zones import ZONE_LETTERS

# highdicom logs each source's UIDs and attribute names at INFO and DEBUG: quiet beside patient data
logging.getLogger("highdicom").setLevel(logging.WARNING)

SCHEME = "99CXRTUNE"  # private coding scheme: cxrtune's zones, score, status and thresholds
SCHEME_NAME = "cxrtune result codes"
MANUFACTURER = "cxrtune"
UID_NAMESPACE = uuid.UUID("7d4f2c3e-8c1a-5b0e-9f6a-63787274756e")  # cxrtune's, for its derived UIDs
SR_SERIES_NUMBER, SEG_SERIES_NUMBER, OVERLAY_SERIES_NUMBER = 9101, 9102, 9103  # after the modality's series
NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSTIC USE"


def _private(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value, SCHEME, meaning)


SCORE = _private("score", "Affected equal-area lung zones (0-6)")
STATUS = _private("status", "cxrtune result status")
STATUS_VALUES = {s: _private(f"status-{s}", f"cxrtune result {s}") for s in ("scored", "partial", "unscored")}
ZONE_AFFECTED = _private("zone-affected", "Zone opacity fraction at or above the zone threshold")
ZONE_OPACITY_FRACTION = _private("zone-opacity-fraction", "Zone opacity fraction")
LUNG_OPACITY_PERCENT = _private("lung-opacity-percent", "Opacity percent of lung")
DISEASE_PROBABILITY = _private("disease-probability", "Probability of disease (not normal)")
THRESHOLDS = {"threshold": _private("zone-threshold", "Zone threshold T"),
              "cls_threshold": _private("cls-threshold", "Disease probability threshold T_cls"),
              "opacity_threshold": _private("opacity-threshold", "Opacity probability threshold"),
              "lung_threshold": _private("lung-threshold", "Lung probability threshold")}
_ZONE_PLACE = {"A": "right upper", "B": "right middle", "C": "right lower",
               "D": "left upper", "E": "left middle", "F": "left lower"}
ZONES = {z: _private(f"zone-{z}", f"cxrtune equal-area lung zone {z} ({_ZONE_PLACE[z]})") for z in ZONE_LETTERS}

PROCEDURE = hd.sr.CodedConcept("399208008", "SCT", "Plain X-ray of chest")
RIGHT_LUNG = hd.sr.CodedConcept("3341006", "SCT", "Right lung")
LEFT_LUNG = hd.sr.CodedConcept("44029006", "SCT", "Left lung")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
PERCENT = hd.sr.CodedConcept("%", "UCUM", "Percent")


@dataclass(frozen=True)
class AlgorithmIdentity:
    """Which algorithm made a result (IHE AIR): the bundle's name and content hash, the runtime
    that ran Stage II (Stage I's when Stage II did not run) and cxrtune's version."""
    bundle: str
    bundle_hash: str
    runtime: str
    version: str = __version__

    @classmethod
    def of_record(cls, record: dict) -> "AlgorithmIdentity":
        models = record.get("models") or {}
        runtimes = models.get("stage_runtimes") or {}
        if not models.get("bundle_hash"):
            raise CxrtuneError("a record without its bundle's content hash cannot be written as DICOM")
        return cls(str(models.get("bundle") or "cxrtune"), str(models["bundle_hash"]),
                   str(runtimes.get("disease") or runtimes.get("lung") or "torch"))

    def algorithm_version(self) -> str:
        return f"{self.bundle_hash} {self.runtime} cxrtune-{self.version}"


@dataclass(frozen=True)
class DicomResults:
    """The DICOM objects of one record: the SR always, the SEG for a scored or partial record, and
    the overlay (a Secondary Capture) when asked for one."""
    sr: Dataset
    seg: Dataset | None
    overlay: Dataset | None = None

    def objects(self) -> list[Dataset]:
        return [o for o in (self.sr, self.seg, self.overlay) if o is not None]


def derived_uid(source_uid: str, identity: AlgorithmIdentity, kind: str) -> str:
    """A UID that the same source, bundle, runtime, cxrtune version and object kind always give (a
    resend of a result is the same object, so a PACS stores it once). The version is in it because
    a new cxrtune may score the same image differently (a changed rule), and one UID must never
    name two different objects: a PACS that keeps the first copy would keep the stale one."""
    name = "|".join((str(source_uid), identity.bundle_hash, identity.runtime, kind, identity.version))
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, name).int}"  # a UUID-derived UID (PS3.5 B.2), name-based


def coding_scheme() -> Dataset:
    """The Coding Scheme Identification Sequence item that declares ``99CXRTUNE``."""
    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = "cxrtune project"
    return item


def _tracking(source_uid: str, identity: AlgorithmIdentity, name: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=derived_uid(source_uid, identity, f"tracking-{name}"), identifier=name)


def _image_group(source: Dataset, record: dict, identity: AlgorithmIdentity,
                 algorithm: hd.sr.AlgorithmIdentification) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    status = record["status"]
    measurements = []
    if status == "scored" and record.get("score") is not None:
        measurements.append(hd.sr.Measurement(SCORE, float(record["score"]), NO_UNITS))
    if record.get("disease_probability") is not None:
        measurements.append(hd.sr.Measurement(DISEASE_PROBABILITY, float(record["disease_probability"]), NO_UNITS))
    for side, site in (("right", RIGHT_LUNG), ("left", LEFT_LUNG)):
        lung = (record.get("lungs") or {}).get(side)
        if lung is not None:
            measurements.append(hd.sr.Measurement(LUNG_OPACITY_PERCENT, float(lung["opacity_percent"]), PERCENT,
                                                  finding_sites=[hd.sr.FindingSite(site)]))
    models = record.get("models") or {}
    for key, code in THRESHOLDS.items():
        value = record.get(key) if key == "threshold" else models.get(key)
        if value is not None:
            measurements.append(hd.sr.Measurement(code, float(value), NO_UNITS))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(source.SOPInstanceUID, identity, "image"), finding_type=codes.DCM.Opacity,
        algorithm_id=algorithm, finding_sites=[hd.sr.FindingSite(codes.SCT.Lung)], measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(STATUS, STATUS_VALUES[status])],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)])


def _zone_groups(source: Dataset, record: dict, identity: AlgorithmIdentity,
                 algorithm: hd.sr.AlgorithmIdentification) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    groups = []
    for letter in ZONE_LETTERS:
        zone = (record.get("zones") or {}).get(letter)
        if not zone or zone.get("affected") is None:  # a lung not found: its zones do not exist
            continue
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(source.SOPInstanceUID, identity, f"zone {letter}"),
            finding_type=codes.DCM.Opacity, algorithm_id=algorithm, finding_sites=[hd.sr.FindingSite(ZONES[letter])],
            measurements=[hd.sr.Measurement(ZONE_OPACITY_FRACTION, float(zone["opacity_fraction"]), NO_UNITS)],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                ZONE_AFFECTED, codes.SCT.Yes if zone["affected"] else codes.SCT.No)],
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)]))
    return groups


def _header_copy(ds: Dataset) -> Dataset:
    """A new dataset holding ``ds``'s elements before the pixel data, and its file meta."""
    header = Dataset()
    header.update({elem.tag: elem for elem in ds if elem.tag < 0x7FE00000})
    if hasattr(ds, "file_meta"):
        header.file_meta = ds.file_meta
    return header


def _library_entry(source: Dataset) -> list[Dataset] | None:
    """The source as the Image Library (TID 1600) describes it. highdicom's projection-radiograph
    entry reads Patient Orientation (two values) and Imager Pixel Spacing; a CR may carry its
    spacing as Pixel Spacing only (pydicom-data's does), which then stands for it. Without an
    orientation the report has no library (highdicom cannot write the entry)."""
    if len(source.get("PatientOrientation") or []) != 2:
        return None
    header = _header_copy(source)  # a copy: the spacing below is the library's, not the source's
    if "ImagerPixelSpacing" not in header and "PixelSpacing" in header:
        header.ImagerPixelSpacing = header.PixelSpacing
    return [header] if "ImagerPixelSpacing" in header else None


def measurement_report(source: Dataset, record: dict, identity: AlgorithmIdentity) -> Dataset:
    """The Comprehensive 3D SR of ``record`` (a score record's dict) about ``source``."""
    algorithm = hd.sr.AlgorithmIdentification(name=identity.bundle, version=identity.algorithm_version(),
                                              family=codes.cid7162.ArtificialIntelligence, manufacturer=MANUFACTURER)
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("device", identity, "device"), name=MANUFACTURER,  # one per bundle, runtime, version
            manufacturer_name=MANUFACTURER, model_name=identity.bundle, serial_number=identity.bundle_hash))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device), procedure_reported=PROCEDURE,
        imaging_measurements=[_image_group(source, record, identity, algorithm),
                              *_zone_groups(source, record, identity, algorithm)],
        referenced_images=_library_entry(source))
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source], content=report[0],
        series_instance_uid=derived_uid(source.SOPInstanceUID, identity, "sr-series"), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derived_uid(source.SOPInstanceUID, identity, "sr"), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, series_description="cxrtune lung opacity score")
    sr.CodingSchemeIdentificationSequence = [coding_scheme()]
    return sr


def _on_source_grid(mask: np.ndarray, source: Dataset) -> np.ndarray:
    rows, columns = int(source.Rows), int(source.Columns)
    return cv2.resize(mask.astype(np.uint8), (columns, rows), interpolation=cv2.INTER_NEAREST).astype(bool)


def segmentation(source: Dataset, lung: np.ndarray, opacity: np.ndarray, identity: AlgorithmIdentity) -> Dataset:
    """The binary SEG (segments 1 ``lung``, 2 ``opacity``) of working-size masks, on the source
    image's grid."""
    algorithm = hd.AlgorithmIdentificationSequence(name=identity.bundle, family=codes.cid7162.ArtificialIntelligence,
                                                   version=identity.algorithm_version(), source=MANUFACTURER)
    segments = [
        hd.seg.SegmentDescription(1, "lung", codes.SCT.AnatomicalStructure, codes.SCT.Lung,
                                  hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm),
        hd.seg.SegmentDescription(2, "opacity", codes.SCT.MorphologicallyAbnormalStructure, codes.DCM.Opacity,
                                  hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm),
    ]
    pixels = np.stack([_on_source_grid(lung, source), _on_source_grid(opacity, source)], axis=-1)[None]
    seg = hd.seg.Segmentation(
        source_images=[source], pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=derived_uid(source.SOPInstanceUID, identity, "seg-series"), series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=derived_uid(source.SOPInstanceUID, identity, "seg"), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=identity.bundle, software_versions=f"cxrtune {identity.version}",
        device_serial_number=identity.bundle_hash, series_description="cxrtune lungs and opacity",
        omit_empty_frames=False)
    # the General Image module's Type 2C orientation: a projection radiograph has no plane
    # position, so the source's (or an empty) Patient Orientation stands
    seg.PatientOrientation = source.get("PatientOrientation", "")
    # Pixel Measures is required only with a frame of reference, which a projection radiograph's
    # results do not carry (:func:`_usable_source`); copied from one it holds the source's Pixel
    # Spacing (zero in pydicom-data's CR) without a Slice Thickness: dciodvfy refuses it, and
    # highdicom cannot read such a SEG back
    if "FrameOfReferenceUID" not in source:
        for group in seg.SharedFunctionalGroupsSequence:
            if "PixelMeasuresSequence" in group:
                del group.PixelMeasuresSequence
    return seg


def overlay_capture(source: Dataset, image: np.ndarray, detail: Detail, record: dict,
                    identity: AlgorithmIdentity) -> Dataset:
    """The overlay as a Secondary Capture (RGB) in its own series of the source's study, with
    "NOT FOR DIAGNOSTIC USE" burned into the picture and said in its header.

    Args:
        image: the record's working image (``Scan.image``), which the overlay is drawn on."""
    picture = render_overlay(image, detail.lungs, detail.opacity, record, notice=f"{NOT_FOR_DIAGNOSIS} - cxrtune")
    sc = hd.sc.SCImage.from_ref_dataset(
        source, np.ascontiguousarray(picture[..., ::-1]), photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", instance_number=1, manufacturer=MANUFACTURER,
        series_instance_uid=derived_uid(source.SOPInstanceUID, identity, "overlay-series"),
        series_number=OVERLAY_SERIES_NUMBER, sop_instance_uid=derived_uid(source.SOPInstanceUID, identity, "overlay"),
        transfer_syntax_uid="1.2.840.10008.1.2.1", patient_orientation=("L", "F"))  # replaced below
    # the source's orientation as it is (highdicom takes single letters only), or empty (Type 2), as in the SEG
    sc.PatientOrientation = source.get("PatientOrientation", "")
    sc.BurnedInAnnotation = "YES"
    sc.BodyPartExamined = "CHEST"  # unpaired: no Laterality (General Series 2C)
    sc.SeriesDescription = f"cxrtune overlay - {NOT_FOR_DIAGNOSIS.lower()}"
    sc.ImageComments = f"{NOT_FOR_DIAGNOSIS}: cxrtune's lungs, zones and opacity drawn on a reduced copy of the image"
    sc.DerivationDescription = f"cxrtune overlay by {identity.bundle} ({identity.algorithm_version()})"
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    return sc


REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality", "Rows", "Columns")
# Type 2 patient and study attributes highdicom copies: a source without them, or with a value
# highdicom refuses, gets them empty, as Type 2 allows, rather than a failure
TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")
DEFAULT_REPERTOIRE = ("", "ISO_IR 6", "ISO 2022 IR 6")  # SpecificCharacterSet terms for plain ASCII
PATIENT_SEX = ("M", "F", "O")  # the standard's values; archives also hold "U", "X", lower case...
DATE_TIME_VRS = {"DA": valuerep.DA, "TM": valuerep.TM, "DT": valuerep.DT}


def _conformant(elem) -> bool:
    """Whether a date or time element's value reads as its VR says ("2024-01-01" in a DA does not)."""
    reader = DATE_TIME_VRS.get(elem.VR)
    if reader is None or elem.VM != 1 or not elem.value:
        return True
    try:
        reader(elem.value)
    except ValueError:
        return False
    return True


def _usable_source(ds: Dataset) -> Dataset:
    """The source's header (no pixel data) as the results copy it: its Type 2 patient and study
    attributes present, emptied where missing or not conformant (highdicom refuses a PatientSex
    of "U" or a StudyDate of "2024-01-01", and the image would get no results), the default
    character set unsaid (highdicom refuses "ISO_IR 6" said outright), and no frame of
    reference on a projection radiograph (no plane position): a SEG of it has none either.

    Raises:
        CxrtuneError: it lacks a UID, modality or size the results must reference."""
    missing = [name for name in REQUIRED if not ds.get(name)]
    if missing:
        raise CxrtuneError(f"DICOM results cannot reference this image: it has no {', '.join(missing)}")
    header = _header_copy(ds)
    for name in TYPE_2:
        if name not in header:
            setattr(header, name, "")
    sex = str(header.PatientSex).upper()
    header.PatientSex = sex if sex in PATIENT_SEX else ""
    for elem in list(header):
        if not _conformant(elem):
            elem.value = ""
    if header.get("SpecificCharacterSet") in DEFAULT_REPERTOIRE:  # said outright; highdicom takes it unsaid
        del header.SpecificCharacterSet
    if "ImagePositionPatient" not in header:
        for name in ("FrameOfReferenceUID", "PositionReferenceIndicator"):
            if name in header:
                delattr(header, name)
    return header


def _character_set(source: Dataset, text: str) -> str | None:
    """The character set the results must declare to hold ``text`` (the bundle's name, which a
    site may write in any language) beside the source's own values: None where the source's
    (or the default repertoire, without one) holds it, else UTF-8 (ISO_IR 192), which holds both."""
    if text.isascii():
        return None
    declared = source.get("SpecificCharacterSet") or ""
    terms = [declared] if isinstance(declared, str) else list(declared)
    # one single-byte repertoire beyond ASCII, checked strictly (pydicom's own encoder replaces what
    # it cannot hold, and reads the default repertoire as Latin-1); code extensions (ISO 2022) and
    # ISO_IR 13 (half-width katakana, not Shift-JIS as its codec) are not judged: UTF-8 holds all
    if len(terms) == 1 and terms[0] not in (*DEFAULT_REPERTOIRE, "ISO_IR 13") \
            and not terms[0].startswith("ISO 2022"):
        try:
            text.encode(convert_encodings(terms[0])[0])
            return None
        except (UnicodeError, LookupError, ValueError):
            pass
    return "ISO_IR 192"


def dicom_results(source: Dataset | bytes, record: dict, detail: Detail | None = None,
                  overlay_of: np.ndarray | None = None) -> DicomResults:
    """The SR and (for a scored or partial record) the SEG of ``record``, made about the DICOM
    image ``source`` (its dataset or its bytes) that was scored.

    Args:
        detail: the record's masks at its working size; needed for the SEG.
        overlay_of: the record's working image: also write the overlay (scored or partial records;
            off by default).

    Raises:
        CxrtuneError: the record has no bundle hash, or a SEG is due and the masks are missing."""
    ds = _usable_source(dcmread(io.BytesIO(source), stop_before_pixels=True)
                        if isinstance(source, (bytes, bytearray)) else source)
    identity = AlgorithmIdentity.of_record(record)
    if record["status"] != "unscored" and detail is None:
        raise CxrtuneError("the SEG of a scored or partial record needs its lung and opacity masks")
    try:
        with warnings.catch_warnings():  # highdicom's and pydicom's warnings quote the source's values
            warnings.simplefilter("ignore")
            sr = measurement_report(ds, record, identity)
            seg = overlay = None
            if record["status"] != "unscored" and detail is not None:
                seg = segmentation(ds, detail.lung, detail.opacity, identity)
                if overlay_of is not None:
                    overlay = overlay_capture(ds, overlay_of, detail, record, identity)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:  # highdicom on a header it cannot use
        raise CxrtuneError(f"DICOM results cannot be written for this image ({type(exc).__name__})") from None
    charset = _character_set(ds, identity.bundle)
    for obj in (sr, seg, overlay):
        if charset and obj is not None:
            obj.SpecificCharacterSet = charset
    return DicomResults(sr, seg, overlay)


DICOM_RESULTS = 'multipart/related; type="application/dicom"'  # how the results travel over HTTP


def multipart_related(parts: list[bytes], boundary: str) -> bytes:
    """DICOM objects as one multipart/related body (RFC 2387, as DICOMweb sends instances). Written
    here: the standard library's email package would re-encode the binary parts."""
    out = bytearray()
    for part in parts:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii") + part + b"\r\n"
    out += f"--{boundary}--\r\n".encode("ascii")
    return bytes(out)


def parts_of(content_type: str, body: bytes) -> list[bytes]:
    """The parts of a ``multipart/related`` body (the standard library's email parser)."""
    message = email.parser.BytesParser().parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body)
    if not message.is_multipart():
        raise CxrtuneError(f"not a multipart body ({message.get_content_type()})")
    parts = [part.get_payload(decode=True) for part in message.walk() if not part.is_multipart()]
    return [part for part in parts if isinstance(part, bytes)]


def to_bytes(ds: Dataset) -> bytes:
    """A DICOM object as a Part 10 file."""
    buf = io.BytesIO()
    with warnings.catch_warnings():  # pydicom's value checks on writing may quote the values
        warnings.simplefilter("ignore")
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
