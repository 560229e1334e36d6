"""DICOM pixels and the seed-000 exclusion rules, on real files (pydicom-data, ../shared) and on
files built here with pydicom."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxrtune import dicom, images
from cxrtune.data import importers, manifest
from cxrtune.data.importers import run_import
from cxrtune.dicom import (
    DicomHeader,
    NotAnImageError,
    parse_age_years,
    pseudonym,
    read_dicom,
    read_header,
)
from cxrtune.errors import CxrtuneError, ImageDecodeError, ImageTooLargeError
from tests.conftest import need_shared

SECRET_ID = "PATIENT-SECRET-4711"
SECRET_NAME = "Doe^Jane"
KEY = "0123456789abcdef0123456789abcdef"  # a study key for the tests (>= 16 characters)
SC = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage


@pytest.fixture
def study_key(monkeypatch):
    monkeypatch.setenv(dicom.PSEUDONYM_ENV, KEY)
    return KEY


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_uncompressed_and_jpeg2000_give_the_same_picture():
    a = read_dicom(get_testdata_file("RG1_UNCR.dcm"))
    b = read_dicom(get_testdata_file("RG1_J2KR.dcm"))
    assert a.pixels.shape == b.pixels.shape == (1955, 1841)
    assert a.header.bits_stored == 15 and a.header.photometric == "MONOCHROME1"
    assert corr(a.pixels, b.pixels) >= 0.99


def _save(ds: FileDataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def make_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **tags) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName = SECRET_ID, SECRET_NAME
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "DX", "PA", "CHEST"
    ds.AccessionNumber = generate_uid()[-12:]
    for k, v in tags.items():
        setattr(ds, k, v)
    if pixels is not None:
        bits = 16 if pixels.dtype == np.uint16 else 8
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, tags.get("BitsStored", bits), tags.get("BitsStored", bits) - 1
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.tobytes()
    return _save(ds, path)


def gradient(bits: int = 12) -> np.ndarray:
    y, x = np.mgrid[0:64, 0:48]
    return ((x + 2 * y) / (47 + 126) * (2**bits - 1)).astype(np.uint16)


def test_a_lateral_is_refused_for_scoring_and_read_for_the_view_model_without_the_header_rules(tmp_path):
    """Scoring refuses a DICOM whose ViewPosition says lateral; `calibrate --not-frontal` reads it
    (header_rules=False), with the pixel limits still in force."""
    from cxrtune.preprocessing import InputRefused, Limits, load_scan

    data = make_dicom(tmp_path / "lateral.dcm", (gradient() >> 4).astype(np.uint8), ViewPosition="LL").read_bytes()
    with pytest.raises(InputRefused, match=r"non-frontal view \(ViewPosition LL\)"):
        load_scan(data)
    scan = load_scan(data, header_rules=False)
    assert scan.format == "dicom" and (scan.height, scan.width) == (64, 48)
    with pytest.raises(ImageTooLargeError, match="over the pixel limit"):
        load_scan(data, Limits(max_pixels=1000), header_rules=False)


def test_monochrome1_with_inverted_values_is_the_same_picture(tmp_path):
    g = gradient()
    m2 = read_dicom(make_dicom(tmp_path / "m2.dcm", g, BitsStored=12))
    m1 = read_dicom(make_dicom(tmp_path / "m1.dcm", (4095 - g).astype(np.uint16), "MONOCHROME1", BitsStored=12))
    assert corr(m1.pixels, m2.pixels) >= 0.99
    assert np.allclose(m1.pixels, m2.pixels, atol=1e-6)


def test_modality_lut_and_window(tmp_path):
    g = gradient()
    windowed = read_dicom(make_dicom(tmp_path / "w.dcm", g, BitsStored=12, RescaleSlope=2,
                                     RescaleIntercept=-1000, WindowCenter=3000, WindowWidth=1000))
    # rescaled values run from -1000 to 7190: below 2500 black, above 3500 white
    hu = g.astype(float) * 2 - 1000
    assert np.all(windowed.pixels[hu < 2400] == 0)
    assert np.all(windowed.pixels[hu > 3600] == 1)
    mid = (hu > 2600) & (hu < 3400)
    assert np.all((windowed.pixels[mid] > 0) & (windowed.pixels[mid] < 1))


def test_real_siim_pair_honours_photometric_interpretation():
    """The two shared files carry byte-identical pixel data and differ only in the tag: a reader
    that honours MONOCHROME1 shows one as the negative of the other. Re-encoding the MONOCHROME2
    picture properly as MONOCHROME1 (stored values inverted) gives the same picture back."""
    root = need_shared("dicom")
    m1 = read_dicom(root / "siim-cr-chest-pa-monochrome1.dcm")
    m2 = read_dicom(root / "siim-cr-chest-pa-monochrome2.dcm")
    raw1 = pydicom.dcmread(root / "siim-cr-chest-pa-monochrome1.dcm").pixel_array
    raw2 = pydicom.dcmread(root / "siim-cr-chest-pa-monochrome2.dcm").pixel_array
    assert np.array_equal(raw1, raw2)
    assert corr(m1.pixels, m2.pixels) <= -0.99
    ds = pydicom.dcmread(root / "siim-cr-chest-pa-monochrome2.dcm")
    ds.decompress()
    ds.PixelData = (255 - ds.pixel_array).astype(np.uint8).tobytes()
    ds.PhotometricInterpretation = "MONOCHROME1"
    buf = __import__("io").BytesIO()
    ds.save_as(buf)
    assert corr(read_dicom(buf.getvalue()).pixels, m2.pixels) >= 0.99


def test_non_image_and_garbage_are_plain_errors(tmp_path):
    with pytest.raises(NotAnImageError):
        read_dicom(make_dicom(tmp_path / "sr.dcm", None))
    with pytest.raises(ImageDecodeError, match="not a DICOM"):
        read_dicom(b"hello" * 100)
    good = make_dicom(tmp_path / "t.dcm", gradient(), BitsStored=12).read_bytes()
    with pytest.raises(ImageDecodeError):
        read_dicom(good[: len(good) - 3000])  # truncated pixel data


def test_age_parsing():
    assert parse_age_years("045Y") == 45
    assert parse_age_years("006M") == 0.5
    assert parse_age_years("") is None and parse_age_years("abc") is None


def instance_id(path: Path, key: str = KEY) -> str:
    """The report's / output name's pseudonym of a file's SOPInstanceUID."""
    return pseudonym(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID), "instance", key)


def test_dicom_import_applies_exclusion_rules_without_leaking_identifiers(tmp_path, caplog, study_key):
    src = tmp_path / "pacs" / SECRET_NAME.replace("^", "_")
    src.mkdir(parents=True)
    g = gradient()
    made = {
        "keep": make_dicom(src / "keep.dcm", g, BitsStored=12, AccessionNumber="ACC1", InstanceNumber=1,
                           PatientAge="045Y"),
        "second": make_dicom(src / "second.dcm", g, BitsStored=12, AccessionNumber="ACC1", InstanceNumber=2),
        "lateral": make_dicom(src / "lateral.dcm", g, BitsStored=12, ViewPosition="LL"),
        "child": make_dicom(src / "child.dcm", g, BitsStored=12, PatientAge="010Y"),
        "secondary": make_dicom(src / "secondary.dcm", g, BitsStored=12, ImageType=["DERIVED", "SECONDARY"]),
        "capture": make_dicom(src / "capture.dcm", g, BitsStored=12, SOPClassUID=SC),
        "derived_primary": make_dicom(src / "derived_primary.dcm", g, BitsStored=12,
                                      ImageType=["DERIVED", "PRIMARY"]),
        "ct": make_dicom(src / "ct.dcm", g, BitsStored=12, Modality="CT"),
        "report": make_dicom(src / "report.dcm", None),
        "eight": make_dicom(src / "eight.dcm", (g >> 4).astype(np.uint8)),
        "trunc": make_dicom(src / "trunc.dcm", g, BitsStored=12),
    }
    (src / "trunc.dcm").write_bytes(made["trunc"].read_bytes()[:-3000])
    (src / "junk.dcm").write_bytes(b"not dicom at all")
    ids = {name: instance_id(path) for name, path in made.items()}
    ids["junk"] = pseudonym("junk.dcm", "file", KEY)  # unreadable: keyed pseudonym of the relative path
    out = tmp_path / "out" / "manifest.csv"
    with caplog.at_level(logging.DEBUG):
        result = run_import("dicom", str(src), str(out), progress=False, default_label="covid")
    by_id = {v: k for k, v in ids.items()}
    reasons = {by_id[e["file"]]: e["reason"] for e in result.excluded}
    assert set(reasons) == {"second", "lateral", "child", "secondary", "capture", "ct", "report", "junk", "trunc"}
    assert "first image of its accession" in reasons["second"]
    assert "non-frontal" in reasons["lateral"] and "under 18" in reasons["child"]
    assert reasons["secondary"].startswith("post-processed image (ImageType DERIVED/SECONDARY")
    assert reasons["capture"].startswith(f"secondary capture (SOPClassUID {SC}")
    assert "not a radiograph" in reasons["ct"]
    assert "no image" in reasons["report"] and reasons["junk"].startswith("unreadable")
    assert reasons["trunc"].startswith("unreadable")
    assert result.summary() == "imported 3, excluded 7, failed 2"
    assert pd.read_csv(out).image.str.startswith("images/ins-").all()  # relative: the folder can move
    df = manifest.load_manifest(str(out))
    assert len(df) == 3 and set(df.label) == {"covid"}
    # output names: the instance pseudonym plus a content hash, DERIVED\PRIMARY kept
    stems = sorted(Path(p).name.rsplit("-", 1)[0] for p in df.image)
    assert stems == sorted(ids[k] for k in ("keep", "derived_primary", "eight"))
    assert all(len(Path(p).stem.rsplit("-", 1)[1]) == 12 for p in df.image)
    sixteen = [images.decode_raster(Path(p).read_bytes()) for p in df.image]
    assert sorted(a.dtype.name for a in sixteen) == ["uint16", "uint16", "uint8"]
    report_path = tmp_path / "out" / "manifest.excluded.csv"
    report = pd.read_csv(report_path)
    assert list(report.columns) == ["file", "reason"] and len(report) == 9
    assert report.file.str.fullmatch(r"(ins|fil)-[0-9a-f]{16}").all()
    for text in (out.read_text(), caplog.text, report_path.read_text()):
        assert SECRET_ID not in text and "Doe" not in text and "ACC1" not in text and "pacs" not in text
        assert ".dcm" not in text


def test_keep_derived_keeps_secondary_images_and_captures(tmp_path, study_key):
    g = gradient()
    (tmp_path / "src").mkdir()
    make_dicom(tmp_path / "src" / "sec.dcm", g, BitsStored=12, ImageType=["DERIVED", "SECONDARY"])
    make_dicom(tmp_path / "src" / "sc.dcm", g, BitsStored=12, SOPClassUID=SC + ".4")  # multi-frame SC family
    dropped = run_import("dicom", str(tmp_path / "src"), str(tmp_path / "a.csv"), progress=False)
    assert dropped.summary() == "imported 0, excluded 2, failed 0"
    kept = run_import("dicom", str(tmp_path / "src"), str(tmp_path / "b.csv"), progress=False, keep_derived=True)
    assert kept.summary() == "imported 2, excluded 0, failed 0"


def test_post_processing_rules_on_headers():
    def reason(**kw):
        return DicomHeader(has_pixels=True, modality="DX", **kw).exclusion_reason(min_age=0)

    assert reason(image_type=("DERIVED", "PRIMARY")) is None  # routine processed CR/DX output
    assert reason(image_type=("ORIGINAL", "PRIMARY")) is None
    assert reason(image_type=("DERIVED", "SECONDARY")).startswith("post-processed")
    assert reason(image_type=("ORIGINAL", "SECONDARY")).startswith("post-processed")
    assert reason(sop_class=SC).startswith("secondary capture")
    assert reason(sop_class=SC + ".2").startswith("secondary capture")
    assert reason(sop_class="1.2.840.10008.5.1.4.1.1.77.1.4") is None  # VL photographic: a prefix, not SC
    assert reason(sop_class="1.2.840.10008.5.1.4.1.1.1.1") is None  # DX for presentation
    assert reason(sop_class="1.2.840.10008.5.1.4.1.1.1.1.1").startswith("an image for processing")  # raw detector data
    header = DicomHeader(has_pixels=True, image_type=("DERIVED", "SECONDARY"), sop_class=SC)
    assert header.exclusion_reason(min_age=0, keep_derived=True) is None


def test_reading_for_scoring_needs_no_key(tmp_path, monkeypatch):
    monkeypatch.delenv(dicom.PSEUDONYM_ENV, raising=False)
    assert not hasattr(dicom, "_DEFAULT_KEY")
    path = make_dicom(tmp_path / "x.dcm", gradient(), BitsStored=12)
    img = read_dicom(path.read_bytes())
    assert img.pixels.shape == (64, 48) and img.header.exclusion_reason(min_age=0) is None
    # without a key no identifier is kept at all, not even in clear
    assert (img.header.patient, img.header.accession, img.header.instance) == ("", "", "")
    assert read_header(path).patient == ""
    assert images.decode_image(path.read_bytes()).shape == (64, 48)
    keyed = read_header(path, key=KEY)
    assert keyed.patient == pseudonym(SECRET_ID, "patient", KEY) and keyed.patient.startswith("pat-")
    # the scoring path (service and CLI): no key, same rules but age; a secondary capture is refused
    from cxrtune.preprocessing import InputRefused, load_scan

    scan = load_scan(path.read_bytes())
    assert scan.format == "dicom" and scan.dicom.patient == ""
    capture = make_dicom(tmp_path / "sc.dcm", gradient(), BitsStored=12, SOPClassUID=SC)
    with pytest.raises(InputRefused, match="secondary capture"):
        load_scan(capture.read_bytes())


def test_pseudonym_key_comes_from_env_or_file_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.delenv(dicom.PSEUDONYM_ENV, raising=False)
    with pytest.raises(CxrtuneError, match="openssl rand -hex 32") as err:
        dicom.pseudonym_key()
    assert "--pseudonym-key-file" in str(err.value) and dicom.PSEUDONYM_ENV in str(err.value)
    key_file = tmp_path / "study.key"
    key_file.write_text(f"  {KEY}\n")
    assert dicom.pseudonym_key(str(key_file)) == KEY.encode()
    monkeypatch.setenv(dicom.PSEUDONYM_ENV, "f" * 32)
    assert dicom.pseudonym_key() == b"f" * 32
    assert dicom.pseudonym_key(key_file) == KEY.encode()  # the file named on the command line wins
    (tmp_path / "short.key").write_text("abc\n")
    with pytest.raises(CxrtuneError, match="fewer than 16"):
        dicom.pseudonym_key(tmp_path / "short.key")
    with pytest.raises(CxrtuneError, match="cannot read"):
        dicom.pseudonym_key(tmp_path / "missing.key")
    assert pseudonym("P1", "patient", KEY) == pseudonym("P1", "patient", KEY.encode())
    assert pseudonym("P1", "patient", KEY) != pseudonym("P1", "patient", "f" * 32)
    assert pseudonym("", "patient", KEY) == ""


def test_dicom_import_refuses_without_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv(dicom.PSEUDONYM_ENV, raising=False)
    (tmp_path / "src").mkdir()
    make_dicom(tmp_path / "src" / "a.dcm", gradient(), BitsStored=12)
    with pytest.raises(CxrtuneError, match="pseudonym key"):
        run_import("dicom", str(tmp_path / "src"), str(tmp_path / "out" / "m.csv"), progress=False)
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_same_key_same_pseudonyms_on_two_machines(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    make_dicom(src / "a.dcm", gradient(), BitsStored=12)
    monkeypatch.delenv(dicom.PSEUDONYM_ENV, raising=False)
    (tmp_path / "study.key").write_text(KEY + "\n")
    (tmp_path / "other.key").write_text("f" * 32 + "\n")

    def patient(machine: str, key_file: str | None) -> str:
        out = tmp_path / machine / "m.csv"
        run_import("dicom", str(src), str(out), progress=False,
                   pseudonym_key_file=str(tmp_path / key_file) if key_file else None)
        return manifest.load_manifest(str(out)).patient_id.iloc[0]

    one, two = patient("machine1", "study.key"), patient("machine2", "study.key")
    assert one == two == pseudonym(SECRET_ID, "patient", KEY)
    monkeypatch.setenv(dicom.PSEUDONYM_ENV, KEY)
    assert patient("machine3", "other.key") != one  # the key file wins over the environment
    assert patient("machine4", None) == one  # the same key from the environment


def test_dicom_without_default_label_is_unlabelled(tmp_path, study_key):
    (tmp_path / "src").mkdir()
    make_dicom(tmp_path / "src" / "a.dcm", gradient(), BitsStored=12)
    out = tmp_path / "m.parquet"
    run_import("dicom", str(tmp_path / "src"), str(out), progress=False)
    df = manifest.load_manifest(str(out))
    assert list(df.label) == [""] and not manifest.is_labelled(df.label.iloc[0])
    with pytest.raises(CxrtuneError, match="--default-label 'flu'"):
        run_import("dicom", str(tmp_path / "src"), str(out), progress=False, default_label="flu")


def test_two_imports_into_one_data_dir_never_overwrite(tmp_path, study_key):
    uid = generate_uid()
    g = gradient()
    for site, pixels in (("site1", g), ("site2", (4095 - g).astype(np.uint16))):
        (tmp_path / site).mkdir()
        # the same SOPInstanceUID at two sites (a re-sent study), different pixels
        make_dicom(tmp_path / site / "x.dcm", pixels, BitsStored=12, SOPInstanceUID=uid)
    data = tmp_path / "data"
    run_import("dicom", str(tmp_path / "site1"), str(tmp_path / "m1.csv"), data_dir=str(data), progress=False)
    first = Path(manifest.load_manifest(str(tmp_path / "m1.csv")).image.iloc[0])
    first_bytes = first.read_bytes()
    run_import("dicom", str(tmp_path / "site2"), str(tmp_path / "m2.csv"), data_dir=str(data), progress=False)
    second = Path(manifest.load_manifest(str(tmp_path / "m2.csv")).image.iloc[0])
    assert first != second and first.read_bytes() == first_bytes
    stem = pseudonym(uid, "instance", KEY)
    assert first.name.startswith(stem + "-") and second.name.startswith(stem + "-")
    a, b = images.decode_raster(first.read_bytes()), images.decode_raster(second.read_bytes())
    assert corr(a.astype(float), b.astype(float)) <= -0.99
    # importing site1 again reuses its identical file: no new file
    run_import("dicom", str(tmp_path / "site1"), str(tmp_path / "m3.csv"), data_dir=str(data), progress=False)
    assert Path(manifest.load_manifest(str(tmp_path / "m3.csv")).image.iloc[0]) == first
    assert sorted(p.name for p in (data / "images").iterdir()) == sorted([first.name, second.name])


def test_a_name_taken_by_different_bytes_gets_another_name(tmp_path, study_key):
    (tmp_path / "src").mkdir()
    make_dicom(tmp_path / "src" / "a.dcm", gradient(), BitsStored=12)
    data = tmp_path / "data"
    run_import("dicom", str(tmp_path / "src"), str(tmp_path / "m1.csv"), data_dir=str(data), progress=False)
    first = Path(manifest.load_manifest(str(tmp_path / "m1.csv")).image.iloc[0])
    first.write_bytes(b"someone else's file under this name")
    run_import("dicom", str(tmp_path / "src"), str(tmp_path / "m2.csv"), data_dir=str(data), progress=False)
    second = Path(manifest.load_manifest(str(tmp_path / "m2.csv")).image.iloc[0])
    assert second.name == first.stem + "-1.png"
    assert first.read_bytes() == b"someone else's file under this name"


PLANTED = "DOE^JOHN_1970"


def test_patient_named_folders_never_reach_outputs_or_logs(tmp_path, caplog, capsys, monkeypatch):
    """A folder named after a patient, holding excluded, unreadable and kept files: the name must
    not appear in the manifest, the exclusion report, stdout/stderr or the logs."""
    monkeypatch.delenv(dicom.PSEUDONYM_ENV, raising=False)
    src = tmp_path / "pacs" / PLANTED
    src.mkdir(parents=True)
    g = gradient()
    make_dicom(src / "DOE_JOHN_lateral.dcm", g, BitsStored=12, ViewPosition="LL")
    make_dicom(src / "DOE_JOHN_pa.dcm", g, BitsStored=12)
    (src / "DOE_JOHN_junk.dcm").write_bytes(b"DICM? no")
    good = make_dicom(tmp_path / "t.dcm", g, BitsStored=12).read_bytes()
    (src / "DOE_JOHN_trunc.dcm").write_bytes(good[:-3000])  # header fine, pixels unreadable
    key_file = tmp_path / "study.key"
    key_file.write_text(KEY + "\n")

    out = tmp_path / "out" / "m.csv"
    with caplog.at_level(logging.DEBUG):
        result = run_import("dicom", str(tmp_path / "pacs"), str(out), progress=True,
                            pseudonym_key_file=str(key_file))
    captured = capsys.readouterr()
    assert result.summary() == "imported 1, excluded 1, failed 2"
    report = out.with_name("m.excluded.csv")
    texts = {"manifest": out.read_text(), "report": report.read_text(), "stdout": captured.out,
             "stderr": captured.err, "logs": caplog.text}

    # the CLI, in a fresh process, with its progress bars and messages
    cli_out = tmp_path / "cli" / "m.csv"
    r = subprocess.run([sys.executable, "-m", "cxrtune.cli", "-v", "data", "import", "--format", "dicom",
                        str(tmp_path / "pacs"), "--out", str(cli_out), "--pseudonym-key-file", str(key_file)],
                       capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                            if k != dicom.PSEUDONYM_ENV})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "imported 1, excluded 1, failed 2"
    texts.update({"cli manifest": cli_out.read_text(), "cli report": cli_out.with_name("m.excluded.csv").read_text(),
                  "cli stdout": r.stdout, "cli stderr": r.stderr})
    for where, text in texts.items():
        for needle in ("DOE", "JOHN", "1970", "pacs"):
            assert needle not in text, f"{needle!r} leaked into the {where}"
    rep = pd.read_csv(report)
    assert sorted(rep.reason.str.split(" ").str[0]) == ["non-frontal", "unreadable:", "unreadable:"]
    assert rep.file.str.fullmatch(r"(ins|fil)-[0-9a-f]{16}").all()


def test_cli_refuses_a_dicom_import_without_a_key(tmp_path):
    (tmp_path / "src").mkdir()
    make_dicom(tmp_path / "src" / "a.dcm", gradient(), BitsStored=12)
    r = subprocess.run([sys.executable, "-m", "cxrtune.cli", "data", "import", "--format", "dicom",
                        str(tmp_path / "src"), "--out", str(tmp_path / "m.csv")], capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != dicom.PSEUDONYM_ENV})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "openssl rand -hex 32 > study.key" in r.stderr and "--pseudonym-key-file study.key" in r.stderr
    assert not (tmp_path / "m.csv").exists()


def test_error_messages_that_name_the_file_are_scrubbed(tmp_path, monkeypatch, study_key):
    """Whatever a reader's message says about the file, its path and names never reach the report."""
    src = tmp_path / PLANTED
    src.mkdir()
    make_dicom(src / "JOHN_DOE.dcm", gradient(), BitsStored=12)

    def failing_read(source, limits=None, key=None):
        raise ImageDecodeError(f"cannot decode {source} (in {Path(source).parent.name}/{Path(source).name})")

    monkeypatch.setattr(importers, "read_dicom", failing_read)  # the name the importer calls
    out = tmp_path / "out" / "m.csv"
    result = run_import("dicom", str(src), str(out), progress=False)
    assert result.summary() == "imported 0, excluded 0, failed 1"
    report = out.with_name("m.excluded.csv").read_text()
    assert "DOE" not in report and "JOHN" not in report and str(tmp_path) not in report
    assert "unreadable: cannot decode <file> (in <file>/<file>)" in report


def test_multi_frame_colour_and_malformed_luts_are_one_files_error_or_read(tmp_path):
    """A colour multi-frame DX (a 4-D pixel array) is read from its first frame as luminance; a
    grey multi-frame one from its first frame; malformed rescale or LUT attributes are a plain
    ImageDecodeError, never a ValueError or AttributeError (a 500 over HTTP, a stopped batch)."""
    g = gradient(8).astype(np.uint8)
    rgb = np.stack([g, g // 2, 255 - g], axis=-1)  # 64 x 48 x 3
    frames = np.stack([rgb, np.zeros_like(rgb)])  # two frames; the second is black
    path = make_dicom(tmp_path / "colour.dcm", g)
    ds = pydicom.dcmread(path)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.NumberOfFrames = 2
    ds.PixelData = frames.tobytes()
    ds.save_as(path)
    colour = read_dicom(path).pixels
    luminance = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    assert colour.shape == g.shape and corr(colour, luminance) > 0.999

    grey = np.stack([gradient(), np.zeros_like(gradient())])
    path = make_dicom(tmp_path / "frames.dcm", gradient(), BitsStored=12)
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames, ds.PixelData = 2, grey.tobytes()
    ds.save_as(path)
    assert corr(read_dicom(path).pixels, gradient()) > 0.999  # the first frame, not the black one

    slope = make_dicom(tmp_path / "slope.dcm", gradient(), BitsStored=12, RescaleSlope="1.5", RescaleIntercept=0)
    data = slope.read_bytes()
    assert data.count(b"1.5 ") == 1
    with pytest.raises(ImageDecodeError, match="rescale"):  # as a modality wrote it: pydicom refuses to
        read_dicom(data.replace(b"1.5 ", b"DOE^"))          # set it, so the bytes are edited
    lut = make_dicom(tmp_path / "lut.dcm", gradient(), BitsStored=12)
    ds = pydicom.dcmread(lut)
    item = pydicom.Dataset()
    item.add_new(0x00283006, "US", [0, 1, 2])  # LUTData, and no LUTDescriptor
    ds.ModalityLUTSequence = [item]
    ds.save_as(lut)
    with pytest.raises(ImageDecodeError):
        read_dicom(lut)


def _counting_pixel_decoder(monkeypatch) -> list:
    """Every pixel decode pydicom is asked for, counted (the property cxrtune decodes through)."""
    calls: list = []
    original = pydicom.dataset.Dataset.pixel_array

    def counted(ds):
        calls.append(1)
        return original.fget(ds)
    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(counted))
    return calls


def _counting_inflater(monkeypatch) -> list[int]:
    """The bytes each DEFLATE call inflates, appended as cxrtune's inflater produces them."""
    produced: list[int] = []
    real = dicom.zlib.decompressobj

    class Counting:
        def __init__(self, *args):
            self._inflater = real(*args)

        def decompress(self, data, max_length=0):
            out = self._inflater.decompress(data, max_length)
            produced.append(len(out))
            return out

        def __getattr__(self, name):
            return getattr(self._inflater, name)
    monkeypatch.setattr(dicom.zlib, "decompressobj", Counting)
    return produced


def test_deflated_dicom_inflates_through_a_capped_stream(tmp_path, monkeypatch):
    """A Deflated DICOM is inflated here, through a stream that stops past max_decoded_bytes:
    pydicom would inflate it whole first (a 203 kB upload held 150 MB of zeros)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    zeros = np.zeros((1024, 1024), np.uint16)  # 2 MB of pixels that deflate to a few kB
    zeros[::7, ::5] = 4095
    plain = make_dicom(tmp_path / "plain.dcm", zeros, BitsStored=12)
    ds = pydicom.dcmread(plain)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    data = (tmp_path / "deflated.dcm").read_bytes()
    assert len(data) < 200_000
    assert np.array_equal(read_dicom(data).pixels, read_dicom(plain).pixels)  # within the default cap

    produced = _counting_inflater(monkeypatch)
    decoded = _counting_pixel_decoder(monkeypatch)
    cap = 500_000
    with pytest.raises(dicom.ImageTooLargeError, match="inflates to more than"):
        read_dicom(data, limits=dicom.Limits(max_decoded_bytes=cap))
    assert 0 < sum(produced) <= cap + 1 and decoded == []
    with pytest.raises(ImageDecodeError, match="DEFLATE"):
        dicom.inflate_capped(b"not deflate at all" * 10, cap)
    # a stream without its final block (flushed, never finished) inflates, but is not whole
    import zlib

    payload = b"\x00" * 1000
    unfinished = zlib.compressobj(wbits=-15)
    unfinished = unfinished.compress(payload) + unfinished.flush(zlib.Z_SYNC_FLUSH)
    with pytest.raises(ImageDecodeError, match="does not end"):
        dicom.inflate_capped(unfinished, cap)
    whole = zlib.compressobj(wbits=-15)
    assert dicom.inflate_capped(whole.compress(payload) + whole.flush(), cap) == payload


def test_a_deflated_dicom_inflates_no_further_than_its_header_declares(tmp_path, monkeypatch):
    """The inflated header is read after HEADER_PROBE_BYTES: a declared frame over max_pixels is
    refused there, and pixels beyond what Rows x Columns declare are never inflated (the cap is the
    declared size, not max_decoded_bytes)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    def deflated(name: str, rows: int, columns: int, pixel_bytes: int) -> bytes:
        ds = pydicom.dcmread(make_dicom(tmp_path / f"{name}.dcm", np.zeros((8, 8), np.uint16), BitsStored=12))
        ds.Rows, ds.Columns = rows, columns
        ds.PixelData = bytes(pixel_bytes)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(tmp_path / f"{name}.deflated.dcm", enforce_file_format=True)
        return (tmp_path / f"{name}.deflated.dcm").read_bytes()

    produced = _counting_inflater(monkeypatch)
    decoded = _counting_pixel_decoder(monkeypatch)
    huge = deflated("huge", 6000, 6000, 8 * 1024 * 1024)  # declares 36 MP; holds 8 MB of zeros
    with pytest.raises(dicom.ImageTooLargeError, match="declares 6000x6000"):
        read_dicom(huge)
    assert sum(produced) <= dicom.HEADER_PROBE_BYTES
    produced.clear()
    lying = deflated("lying", 64, 64, 16 * 1024 * 1024)  # declares 8 kB of pixels; holds 16 MB
    with pytest.raises(dicom.ImageTooLargeError, match="inflates to more than"):
        read_dicom(lying)
    assert sum(produced) <= 64 * 64 * 2 + dicom.HEADER_SLACK_BYTES + 1 and decoded == []
    honest = deflated("honest", 512, 512, 512 * 512 * 2)
    assert read_dicom(honest).pixels.shape == (512, 512)


def test_codestream_size_is_checked_before_any_pixel_is_decoded(tmp_path, monkeypatch):
    """The decoder allocates what the codestream declares, not what Rows x Columns say: a JPEG 2000
    or JPEG frame larger than its header is refused, and the pixel decoder is never called."""
    import io

    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    j2k = pydicom.dcmread(get_testdata_file("RG1_J2KR.dcm"))
    rows, columns = int(j2k.Rows), int(j2k.Columns)
    frame = next(pydicom.encaps.generate_frames(j2k.PixelData, number_of_frames=1))
    assert dicom.codestream_size(frame) == (rows, columns)
    j2k.Rows, j2k.Columns = 64, 64
    lying = tmp_path / "lying.dcm"
    j2k.save_as(lying)
    decoded = _counting_pixel_decoder(monkeypatch)
    with pytest.raises(ImageDecodeError, match=f"codestream is {columns}x{rows} but the header says 64x64"):
        read_dicom(lying)
    with pytest.raises(dicom.ImageTooLargeError, match="codestream"):
        read_dicom(lying, limits=dicom.Limits(max_pixels=rows * columns - 1))

    buf = io.BytesIO()
    Image.fromarray(np.full((300, 200), 128, np.uint8)).save(buf, format="JPEG")
    assert dicom.codestream_size(buf.getvalue()) == (300, 200)
    jpeg = make_dicom(tmp_path / "jpeg.dcm", gradient(8).astype(np.uint8))  # a 64 x 48 header
    ds = pydicom.dcmread(jpeg)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(jpeg)
    with pytest.raises(ImageDecodeError, match="codestream is 200x300"):
        read_dicom(jpeg)
    assert decoded == []


def test_a_decoder_crash_is_one_files_exclusion_and_the_accession_falls_back(tmp_path, monkeypatch, study_key):
    """Any failure decoding one file (here a crash inside the PNG encoder, as a 4-D array once gave
    'libpng error') excludes that file with a reason that quotes nothing of it; the next image of
    its accession is taken, and the import goes on."""
    src = tmp_path / "pacs"
    src.mkdir()
    g = gradient()
    first = make_dicom(src / "a.dcm", g, BitsStored=12, AccessionNumber="ACC9", InstanceNumber=1)
    make_dicom(src / "b.dcm", g, BitsStored=12, AccessionNumber="ACC9", InstanceNumber=2)
    make_dicom(src / "c.dcm", g, BitsStored=12, AccessionNumber="ACC8", InstanceNumber=1)
    real, calls = images.encode_png, []

    def encoder_that_fails_once(arr):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError(f"libpng error quoting {src}")
        return real(arr)
    monkeypatch.setattr(importers.images, "encode_png", encoder_that_fails_once)
    result = run_import("dicom", str(src), str(tmp_path / "m.csv"), progress=False)
    assert len(result.manifest) == 2 and len(result.failed) == 1
    assert result.failed[0] == {"file": instance_id(first), "reason": "unreadable: ValueError while decoding"}
