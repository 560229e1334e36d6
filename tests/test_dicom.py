"""DICOM pixels and the seed-000 exclusion rules, on real files (pydicom-data, ../shared) and on
files built here with pydicom."""

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxrtune import images
from cxrtune.dicom import NotAnImageError, parse_age_years, read_dicom
from cxrtune.errors import ImageDecodeError
from cxrtune.importers import run_import
from tests.conftest import need_shared

SECRET_ID = "PATIENT-SECRET-4711"
SECRET_NAME = "Doe^Jane"


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


def test_dicom_import_applies_exclusion_rules_without_leaking_identifiers(tmp_path, caplog):
    src = tmp_path / "pacs" / SECRET_NAME.replace("^", "_")
    src.mkdir(parents=True)
    g = gradient()
    make_dicom(src / "keep.dcm", g, BitsStored=12, AccessionNumber="ACC1", InstanceNumber=1, PatientAge="045Y")
    make_dicom(src / "second.dcm", g, BitsStored=12, AccessionNumber="ACC1", InstanceNumber=2)
    make_dicom(src / "lateral.dcm", g, BitsStored=12, ViewPosition="LL")
    make_dicom(src / "child.dcm", g, BitsStored=12, PatientAge="010Y")
    make_dicom(src / "secondary.dcm", g, BitsStored=12, ImageType=["DERIVED", "SECONDARY"])
    make_dicom(src / "ct.dcm", g, BitsStored=12, Modality="CT")
    make_dicom(src / "report.dcm", None)
    (src / "junk.dcm").write_bytes(b"not dicom at all")
    make_dicom(src / "eight.dcm", (g >> 4).astype(np.uint8))
    truncated = make_dicom(src / "trunc.dcm", g, BitsStored=12).read_bytes()
    (src / "trunc.dcm").write_bytes(truncated[:-3000])
    out = tmp_path / "out" / "manifest.csv"
    with caplog.at_level(logging.DEBUG):
        result = run_import("dicom", str(src), str(out), progress=False, default_label="covid")
    reasons = {Path(e["file"]).name: e["reason"] for e in result.excluded}
    assert set(reasons) == {"second.dcm", "lateral.dcm", "child.dcm", "secondary.dcm", "ct.dcm",
                            "report.dcm", "junk.dcm", "trunc.dcm"}
    assert "first image of its accession" in reasons["second.dcm"]
    assert "non-frontal" in reasons["lateral.dcm"] and "under 18" in reasons["child.dcm"]
    assert "post-processed" in reasons["secondary.dcm"] and "not a radiograph" in reasons["ct.dcm"]
    assert "no image" in reasons["report.dcm"] and "unreadable" in reasons["junk.dcm"]
    assert "unreadable" in reasons["trunc.dcm"]
    assert result.summary() == "imported 2, excluded 6, failed 2"
    df = pd.read_csv(out)
    assert len(df) == 2 and set(df.label) == {"covid"}
    sixteen = [images.decode_raster(Path(p).read_bytes()) for p in df.image]
    assert sorted(a.dtype.name for a in sixteen) == ["uint16", "uint8"]
    report = (tmp_path / "out" / "manifest.excluded.csv").read_text()
    for text in (out.read_text(), caplog.text, " ".join(df.image)):
        assert SECRET_ID not in text and "Doe" not in text and "ACC1" not in text
    assert "ACC1" not in report and SECRET_ID not in report
