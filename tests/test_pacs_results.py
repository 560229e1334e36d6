"""Results as DICOM (issue 22, item 1): the TID 1500 SR and the binary SEG of a record, read back
with highdicom and checked with dicom3tools' dciodvfy against the source they describe.

The source is a copy of pydicom-data's CR chest PA (RG1_UNCR.dcm) with new UIDs and patient; the
records are built by the scoring policy's own ``build_record`` from masks drawn at the scan's
working size, so each value read back has a known answer."""

import dataclasses
import io
import re
import shutil
import subprocess

import cv2
import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from cxrtune import zones
from cxrtune.errors import CxrtuneError
from cxrtune.pacs.results import (
    DISEASE_PROBABILITY,
    LUNG_OPACITY_PERCENT,
    SCHEME,
    SCORE,
    STATUS,
    THRESHOLDS,
    ZONE_AFFECTED,
    ZONE_OPACITY_FRACTION,
    ZONES,
    AlgorithmIdentity,
    derived_uid,
    dicom_results,
    to_bytes,
)
from cxrtune.preprocessing import load_scan
from cxrtune.scoring.overlay import render_overlay
from cxrtune.scoring.scorer import build_record

MODELS = {"lung": "FPN/resnet18", "disease": "Unet/resnet18", "cls_threshold": 0.4, "opacity_threshold": 0.3,
          "lung_threshold": 0.45, "bundle": "cpu-accuracy", "bundle_hash": "0123456789abcdef", "created": "2026-12-03T00:00:00Z",
          "stage_bundles": {"lung": "0123456789abcdef", "disease": "0123456789abcdef"},
          "stage_runtimes": {"lung": "onnx-int8", "disease": "onnx-int8"}}


def source_copy(patient: str = "CXRTUNE^TEST", seed: int = 0, name: str = "RG1_UNCR.dcm") -> pydicom.Dataset:
    """pydicom-data's CR chest PA ``name`` (RG1_UNCR, or RG1_J2KR in JPEG 2000) with new study,
    series and instance UIDs and a new patient: a distinct instance."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID = patient, f"PID{seed:04d}"
    return ds


def drawn_record(ds: pydicom.Dataset, lungs: str = "both", status_reason: str | None = None):
    """(record dict, Detail) for two (or one) drawn lungs with opacity low in the right lung."""
    scan = load_scan(to_bytes(ds))
    h, w = scan.image.shape
    lung = np.zeros((h, w), np.uint8)
    if lungs in ("both", "right"):  # the patient's right lung: the image's left
        cv2.ellipse(lung, (int(w * 0.3), int(h * 0.45)), (int(w * 0.13), int(h * 0.25)), 0, 0, 360, 1, -1)
    if lungs == "both":
        cv2.ellipse(lung, (int(w * 0.7), int(h * 0.45)), (int(w * 0.13), int(h * 0.25)), 0, 0, 360, 1, -1)
    opacity = np.zeros((h, w), bool)
    opacity[int(h * 0.5):int(h * 0.7), : int(w * 0.5)] = True
    record, detail = build_record(lung.astype(bool), None if lungs == "none" else opacity, 0.91, 0.1, MODELS, scan,
                                  reason=status_reason)
    return record.to_dict(), detail


def content_items(ds) -> list[tuple[str, object]]:
    """(concept name meaning, value) of every item of an SR's content tree, depth first."""
    out = []
    for item in ds.get("ContentSequence", []):
        name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
        value = (item.get("TextValue") or (item.ConceptCodeSequence[0].CodeMeaning if "ConceptCodeSequence" in item
                                           else None))
        out.append((name, value))
        out += content_items(item)
    return out


def read_groups(path) -> dict[str, hd.sr.MeasurementsAndQualitativeEvaluations]:
    """The SR's measurement groups by tracking identifier (``image``, ``zone A``...)."""
    sr = hd.sr.srread(path)
    return {str(g.tracking_identifier): g for g in sr.content.get_image_measurement_groups()}


def measured(group, code) -> list[float]:
    return [m.value for m in group.get_measurements(name=code)]


def evaluated(group, code) -> list[str]:
    return [q.value.meaning for q in group.get_qualitative_evaluations(name=code)]


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    ds = source_copy()
    record, detail = drawn_record(ds)
    out = tmp_path_factory.mktemp("dicom-results")
    results = dicom_results(to_bytes(ds), record, detail, overlay_of=load_scan(to_bytes(ds)).image)
    (out / "source.dcm").write_bytes(to_bytes(ds))
    (out / "sr.dcm").write_bytes(to_bytes(results.sr))
    (out / "seg.dcm").write_bytes(to_bytes(results.seg))
    (out / "overlay.dcm").write_bytes(to_bytes(results.overlay))
    return ds, record, detail, results, out


def test_the_sr_reads_back_to_the_record(scored):
    ds, record, _, results, out = scored
    assert record["status"] == "scored" and record["score"] == 2  # B and C: the drawn opacity
    groups = read_groups(out / "sr.dcm")
    image = groups["image"]
    assert measured(image, SCORE) == [2.0] and evaluated(image, STATUS) == ["cxrtune result scored"]
    for letter in zones.ZONE_LETTERS:
        zone, group = record["zones"][letter], groups[f"zone {letter}"]
        assert group.finding_sites[0].value.value == ZONES[letter].value
        assert evaluated(group, ZONE_AFFECTED) == ["Yes" if zone["affected"] else "No"]
        assert measured(group, ZONE_OPACITY_FRACTION) == [pytest.approx(zone["opacity_fraction"])]
    items = content_items(pydicom.dcmread(out / "sr.dcm"))
    identity = AlgorithmIdentity.of_record(record)
    assert ("Algorithm Name", "cpu-accuracy") in items and ("Image Library", None) in items
    assert ("Algorithm Version", "0123456789abcdef onnx-int8 cxrtune-" + identity.version) in items
    sr = pydicom.dcmread(out / "sr.dcm")
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert evidence.ReferencedSOPInstanceUID == ds.SOPInstanceUID
    # the source's patient and study, in a new series; the private scheme is declared
    assert (sr.PatientID, sr.PatientName, sr.StudyInstanceUID) == (ds.PatientID, ds.PatientName, ds.StudyInstanceUID)
    assert sr.SeriesInstanceUID not in (ds.SeriesInstanceUID, results.seg.SeriesInstanceUID) and sr.Modality == "SR"
    assert [i.CodingSchemeDesignator for i in sr.CodingSchemeIdentificationSequence] == [SCHEME]
    assert "Brixia" not in str(sr)
    # per lung opacity %, p(disease) and the thresholds used
    image = groups["image"]
    right, left = image.get_measurements(name=LUNG_OPACITY_PERCENT)
    assert [m.finding_sites[0].value.value for m in (right, left)] == ["3341006", "44029006"]
    assert (right.value, left.value) == (pytest.approx(record["lungs"]["right"]["opacity_percent"]),
                                         pytest.approx(record["lungs"]["left"]["opacity_percent"]))
    assert right.value > 0 and left.value == 0  # the drawn opacity is in the right lung only
    assert measured(image, DISEASE_PROBABILITY) == [pytest.approx(record["disease_probability"])]
    assert (measured(image, THRESHOLDS["threshold"]), measured(image, THRESHOLDS["cls_threshold"]),
            measured(image, THRESHOLDS["opacity_threshold"]), measured(image, THRESHOLDS["lung_threshold"])) \
        == ([pytest.approx(record["threshold"])], [0.4], [0.3], [0.45])


def test_the_seg_on_the_source_grid_is_the_records_masks(scored):
    ds, record, detail, results, out = scored
    seg = hd.seg.segread(out / "seg.dcm")
    assert [seg.get_segment_description(n).segment_label for n in (1, 2)] == ["lung", "opacity"]
    assert seg.StudyInstanceUID == ds.StudyInstanceUID and seg.Modality == "SEG"
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[ds.SOPInstanceUID], segment_numbers=[1, 2])[0]
    assert pixels.shape == (ds.Rows, ds.Columns, 2)
    h, w = detail.lung.shape
    back = [cv2.resize(pixels[..., i], (w, h), interpolation=cv2.INTER_NEAREST).astype(bool) for i in (0, 1)]
    for got, want in zip(back, (detail.lung, detail.opacity & detail.lung)):
        assert 2 * (got & want).sum() / (got.sum() + want.sum()) >= 0.99
    again = zones.score_lungs(zones.split_lungs(back[0]), back[1], record["threshold"])
    groups = read_groups(out / "sr.dcm")
    assert again["score"] == measured(groups["image"], SCORE)[0]
    for letter in zones.ZONE_LETTERS:
        affected = evaluated(groups[f"zone {letter}"], ZONE_AFFECTED) == ["Yes"]
        assert again["zones"][letter]["affected"] == affected, letter


def test_partial_records_carry_their_zones_and_unscored_ones_a_status_and_no_score():
    ds = source_copy("CXRTUNE^PARTIAL", 1)
    record, detail = drawn_record(ds, lungs="right")
    assert record["status"] == "partial"
    results = dicom_results(ds, record, detail)
    groups = {str(g.tracking_identifier): g for g in hd.sr.Comprehensive3DSR.from_dataset(results.sr)
              .content.get_image_measurement_groups()}
    assert set(groups) == {"image", "zone A", "zone B", "zone C"}  # the right lung's zones only
    assert measured(groups["image"], SCORE) == [] and evaluated(groups["image"], STATUS) == ["cxrtune result partial"]
    assert results.seg is not None

    record, detail = drawn_record(ds, lungs="none", status_reason="no lungs found")
    assert record["status"] == "unscored"
    results = dicom_results(ds, record)
    groups = {str(g.tracking_identifier): g for g in hd.sr.Comprehensive3DSR.from_dataset(results.sr)
              .content.get_image_measurement_groups()}
    assert set(groups) == {"image"} and measured(groups["image"], SCORE) == []  # never a 0
    assert evaluated(groups["image"], STATUS) == ["cxrtune result unscored"] and results.seg is None


def test_a_resend_of_the_same_result_is_the_same_object(scored):
    ds, record, detail, results, _ = scored
    again = dicom_results(ds, record, detail, overlay_of=load_scan(to_bytes(ds)).image)
    assert [(o.SeriesInstanceUID, o.SOPInstanceUID) for o in again.objects()] == \
        [(o.SeriesInstanceUID, o.SOPInstanceUID) for o in results.objects()]
    other_runtime = {**record, "models": {**MODELS, "stage_runtimes": {"lung": "torch", "disease": "torch"}}}
    changed = dicom_results(ds, other_runtime, detail)
    assert not {o.SOPInstanceUID for o in changed.objects()} & {o.SOPInstanceUID for o in results.objects()}
    assert len({o.SOPInstanceUID for o in results.objects()} | {ds.SOPInstanceUID}) == 4
    # another cxrtune version may score the image differently: its objects are new ones, never the old UIDs
    identity = AlgorithmIdentity.of_record(record)
    assert derived_uid(ds.SOPInstanceUID, identity, "sr") == results.sr.SOPInstanceUID
    assert derived_uid(ds.SOPInstanceUID, dataclasses.replace(identity, version="0.0.0"), "sr") != \
        results.sr.SOPInstanceUID


def test_a_source_without_type_2_attributes_gets_them_empty_and_one_without_uids_a_clear_error():
    ds = source_copy("CXRTUNE^SPARSE", 2)
    record, detail = drawn_record(ds)
    for name in ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID", "ReferringPhysicianName"):
        if name in ds:
            delattr(ds, name)
    results = dicom_results(ds, record, detail)
    assert results.sr.PatientBirthDate == "" and results.seg.StudyDate == ""
    del ds.StudyInstanceUID
    with pytest.raises(CxrtuneError, match="it has no StudyInstanceUID"):
        dicom_results(ds, record, detail)
    with pytest.raises(CxrtuneError, match="needs its lung and opacity masks"):
        dicom_results(source_copy(), record)


def test_archive_values_highdicom_refuses_are_emptied_and_a_radiographs_frame_of_reference_dropped(tmp_path):
    """Headers common in real archives (PatientSex "U", a StudyDate with dashes, a CR/DX that
    carries a frame of reference) get results, as the standard allows them: readable back, with
    no error dciodvfy does not also find in the source; a source without a modality, a clear error."""
    ds = source_copy("CXRTUNE^LEGACY", 3)
    record, detail = drawn_record(ds)
    ds.PatientSex, ds.StudyDate, ds.StudyTime, ds.PatientBirthDate = "U", "2024-01-01", "25:61", "19XX"
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator, ds.PixelSpacing = generate_uid(), "", [0.14, 0.14]
    results = dicom_results(ds, record, detail)
    for obj in (results.sr, results.seg):
        assert (obj.PatientSex, obj.StudyDate, obj.StudyTime, obj.PatientBirthDate) == ("", "", "", "")
        assert (obj.PatientID, obj.StudyInstanceUID) == (ds.PatientID, ds.StudyInstanceUID)
    assert "FrameOfReferenceUID" not in results.seg
    assert hd.seg.segread(io.BytesIO(to_bytes(results.seg))).number_of_segments == 2
    if shutil.which("dciodvfy"):
        for name, obj in (("source.dcm", ds), ("sr.dcm", results.sr), ("seg.dcm", results.seg)):
            (tmp_path / name).write_bytes(to_bytes(obj))
        source = _dciodvfy_errors(tmp_path / "source.dcm")
        for name in ("sr.dcm", "seg.dcm"):
            assert _dciodvfy_errors(tmp_path / name) - source == set(), name
    del ds.Modality
    with pytest.raises(CxrtuneError, match="it has no Modality"):
        dicom_results(ds, record, detail)


@pytest.mark.parametrize("charset, patient, bundle, declared", [
    (None, "CXRTUNE^TEST", "modèle-poumon", "ISO_IR 192"),  # the default repertoire holds no è
    ("ISO_IR 100", "Müller^Jürgen", "modèle-poumon", "ISO_IR 100"),  # Latin-1 holds both
    ("ISO_IR 100", "Müller^Jürgen", "肺モデル", "ISO_IR 192"),  # Latin-1 cannot hold the name
    ("ISO_IR 6", "CXRTUNE^TEST", "modèle-poumon", "ISO_IR 192"),  # the default repertoire, declared: ASCII only
])
def test_a_bundle_named_in_any_language_is_written_in_a_declared_character_set(charset, patient, bundle, declared):
    """A site names its bundle in its own language: the SR and SEG declare a character set that
    holds the name and the source's patient name alike, and both read back as they were."""
    ds = source_copy(patient)
    if charset:
        ds.SpecificCharacterSet = charset
    elif "SpecificCharacterSet" in ds:
        del ds.SpecificCharacterSet
    ds = pydicom.dcmread(io.BytesIO(to_bytes(ds)))
    record, detail = drawn_record(ds)
    record["models"] = {**record["models"], "bundle": bundle}
    results = dicom_results(ds, record, detail)
    for obj in (results.sr, results.seg):
        back = pydicom.dcmread(io.BytesIO(to_bytes(obj)))
        assert back.SpecificCharacterSet == declared and str(back.PatientName) == patient
        assert any(isinstance(e.value, str) and bundle in e.value for e in back.iterall())


def _dciodvfy_errors(path) -> set[tuple[str, str]]:
    """dciodvfy's errors as (attribute, message), without the path to the attribute: the SEG
    repeats a source attribute inside a functional group."""
    run = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, timeout=60)
    errors = set()
    for line in (run.stdout + run.stderr).splitlines():
        if line.startswith("Error"):
            found = re.search(r"([A-Za-z]+)\([0-9a-fA-F]{4},[0-9a-fA-F]{4}\)(?:\[\d+\])?> - (.*)$", line)
            errors.add((found.group(1), found.group(2)) if found else ("", line))
    return errors


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dicom3tools' dciodvfy is not installed (Debian package dicom3tools; .ci/run installs it)")
def test_dciodvfy_finds_no_error_in_either_object_that_the_source_does_not_have(scored):
    *_, out = scored
    source = _dciodvfy_errors(out / "source.dcm")
    assert source  # the check can see errors: RG1_UNCR's Pixel Spacing is zero
    for name in ("sr.dcm", "seg.dcm", "overlay.dcm"):
        assert _dciodvfy_errors(out / name) - source == set(), name


def test_the_overlay_is_a_secondary_capture_in_its_own_series_marked_not_for_diagnosis(scored):
    """Asked for, the overlay is an RGB Secondary Capture in a third series of the source's study:
    the overlay picture with "NOT FOR DIAGNOSTIC USE" burned in (the banner's second line), Burned
    In Annotation YES, referencing the source; without ``overlay_of`` there is none."""
    ds, record, detail, results, out = scored
    sc = pydicom.dcmread(out / "overlay.dcm")
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.PhotometricInterpretation == "RGB"
    assert sc.StudyInstanceUID == ds.StudyInstanceUID and sc.PatientID == ds.PatientID
    assert len({sc.SeriesInstanceUID, results.sr.SeriesInstanceUID, results.seg.SeriesInstanceUID,
                ds.SeriesInstanceUID}) == 4
    assert sc.BurnedInAnnotation == "YES" and "NOT FOR DIAGNOSTIC USE" in sc.ImageComments
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    image = load_scan(to_bytes(ds)).image
    plain = render_overlay(image, detail.lungs, detail.opacity, record)
    marked = render_overlay(image, detail.lungs, detail.opacity, record, notice="NOT FOR DIAGNOSTIC USE - cxrtune")
    assert np.array_equal(sc.pixel_array, marked[..., ::-1])  # RGB of what was drawn, notice included
    line = marked.shape[0] - plain.shape[0]  # the notice's line, between the score's and the image
    assert line > 0 and (marked[line + 4:2 * line + 8] > 200).sum() > 100  # white text burned in
    assert dicom_results(ds, record, detail).overlay is None  # off by default
    assert [o.Modality for o in results.objects()] == ["SR", "SEG", "OT"]  # OT: other, as a secondary capture

