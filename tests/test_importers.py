import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from cxrtune import images
from cxrtune.data import manifest
from cxrtune.data.importers import run_import
from cxrtune.errors import CxrtuneError
from tests.conftest import need_shared


@pytest.mark.realdata
def test_covid_qu_ex_counts(tmp_path):
    src = need_shared("covid-qu-ex")
    out = tmp_path / "cqe.parquet"
    result = run_import("covid-qu-ex", str(src), str(out), progress=False)
    df = manifest.load_manifest(str(out))
    assert len(df) == 4660 and result.summary() == "imported 4660, excluded 0, failed 0"
    assert df.label.value_counts().to_dict() == {"covid": 2330, "other_pneumonia": 1165, "normal": 1165}
    # Non-COVID: not annotated; Normal: annotated empty (a real, all-zero file)
    assert (df.loc[df.label == "other_pneumonia", "opacity_mask"] == "").all()
    normal = df[df.label == "normal"]
    assert (normal.opacity_mask != "").all()
    assert not images.read_mask(normal.opacity_mask.iloc[0]).any()
    assert df.split.value_counts().to_dict() == {"train": 3728, "val": 932}
    assert df.patient_id.is_unique


@pytest.mark.realdata
def test_jsrt_combines_lungs(tmp_path):
    src = need_shared("jsrt")
    out = tmp_path / "jsrt.parquet"
    run_import("jsrt", str(src), str(out), progress=False)
    df = manifest.load_manifest(str(out))
    assert len(df) == 247 and set(df.label) == {"normal", "nodule"}
    row = df.iloc[0]
    both = images.read_mask(row.lung_mask)
    right, left = images.read_mask(row.lung_mask_right), images.read_mask(row.lung_mask_left)
    assert np.array_equal(both, right | left)
    # the patient's right lung sits on the image's left
    assert np.nonzero(right)[1].mean() < np.nonzero(left)[1].mean()


def test_folder_layout(tmp_path):
    src = tmp_path / "site"
    for sub in ("images", "lung_masks", "opacity_masks"):
        (src / sub).mkdir(parents=True)
    img = np.full((32, 32), 100, np.uint8)
    for name in ("a.png", "b.png", "c.png"):
        images.write_png(str(src / "images" / name), img)
        images.write_png(str(src / "lung_masks" / name), img > 0)
    images.write_png(str(src / "opacity_masks" / "a.png"), np.zeros((32, 32), bool))
    (src / "labels.csv").write_text("image,label,patient_id,zone_A\na.png,normal,P1,0\nb.png,covid,P1,\n"
                                    "ghost.png,covid,P9,\nRoe_Richard,covid,P8,\n")
    # a DICOM among the PNGs bypasses the DICOM rules and pseudonyms here: left out, its name unsaid
    (src / "images" / "Doe_Jane.dcm").write_bytes(b"\0" * 128 + b"DICM")
    (src / "images" / "Roe_Richard").write_bytes(b"\0" * 128 + b"DICM")  # DICOM often has no extension
    (src / "images" / "notes.txt").write_text("not an image")
    out = tmp_path / "m.csv"
    result = run_import("folder", str(src), str(out), progress=False, default_label="normal")
    df = manifest.load_manifest(str(out))
    assert list(df.label) == ["normal", "covid", "normal"] and list(df.patient_id) == ["P1", "P1", "c"]
    assert df.opacity_mask.iloc[0] != "" and df.opacity_mask.iloc[1] == ""
    assert "Doe_Jane" not in json.dumps(result.excluded) and "Roe_Richard" not in json.dumps(result.excluded)
    assert not df.image.str.contains("Doe_Jane|Roe_Richard|notes").any()
    assert {"file": "2 DICOM file(s) in images/", "reason": result.excluded[-2]["reason"]} == result.excluded[-2]
    assert "--format dicom" in result.excluded[-2]["reason"]
    assert result.excluded[-1]["file"] == "1 other file(s) in images/"
    result = run_import("folder", str(src), str(out), progress=False)
    reasons = {e["file"].rsplit("/", 1)[-1]: e["reason"] for e in result.excluded}
    assert "no label" in reasons["c.png"] and "no such image" in reasons["ghost.png"]


def test_relative_source_gives_a_loadable_manifest(tmp_path, monkeypatch):
    src = tmp_path / "site"
    (src / "images").mkdir(parents=True)
    images.write_png(str(src / "images" / "a.png"), np.full((32, 32), 7, np.uint8))
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    run_import("folder", "../site", "m.csv", progress=False, default_label="normal")
    df = manifest.load_manifest(str(tmp_path / "out" / "m.csv"))
    assert df.image.iloc[0] == str(src / "images" / "a.png")


def test_unknown_format_and_wrong_folder_are_plain_errors(tmp_path):
    with pytest.raises(CxrtuneError, match="unknown --format"):
        run_import("nifti", str(tmp_path), str(tmp_path / "m.csv"))
    with pytest.raises(CxrtuneError, match="Infection Segmentation Data"):
        run_import("covid-qu-ex", str(tmp_path), str(tmp_path / "m.csv"))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxrtune.cli", *args], capture_output=True, text=True)


def test_cli_phantom_split_validate(tmp_path):
    r = cli("data", "phantom", "--n", "12", "--size", "64", "--out", str(tmp_path / "ph"), "-q")
    assert r.returncode == 0, r.stderr
    m = str(tmp_path / "ph" / "manifest.parquet")
    r = cli("data", "split", m, "--val", "0.2", "--test", "0.2", "--folds", "2", "--tuning-fraction", "0.5")
    assert r.returncode == 0, r.stderr
    df = pd.read_parquet(m)
    assert not df.image.iloc[0].startswith("/")  # still relative: the folder can move
    assert (df.fold >= -1).all() and df.tuning.any()
    assert cli("data", "validate", m).returncode == 0


def test_cli_errors_have_no_traceback(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("image,label,patient_id\nmissing.png,flu,p1\n")
    r = cli("data", "validate", str(bad))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "unknown label 'flu'" in r.stderr and "missing.png" in r.stderr
    r = cli("data", "import", "--format", "jsrt", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o.csv"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "nowhere" in r.stderr


def test_cli_dicom_flags(tmp_path):
    from tests.test_dicom import KEY, gradient, make_dicom

    src = tmp_path / "src"
    src.mkdir()
    make_dicom(src / "primary.dcm", gradient(), BitsStored=12, ImageType=["DERIVED", "PRIMARY"])
    make_dicom(src / "secondary.dcm", gradient(), BitsStored=12, ImageType=["DERIVED", "SECONDARY"])
    key = tmp_path / "study.key"
    key.write_text(KEY + "\n")
    base = ["data", "import", "--format", "dicom", str(src), "--pseudonym-key-file", str(key), "-q"]
    r = cli(*base, "--out", str(tmp_path / "a.csv"))
    assert r.returncode == 0 and r.stdout.strip() == "imported 1, excluded 1, failed 0", r.stderr
    assert pd.read_csv(tmp_path / "a.csv", keep_default_na=False).label.tolist() == [""]
    r = cli(*base, "--out", str(tmp_path / "b.csv"), "--keep-derived", "--default-label", "covid")
    assert r.returncode == 0 and r.stdout.strip() == "imported 2, excluded 0, failed 0", r.stderr
    assert pd.read_csv(tmp_path / "b.csv").label.tolist() == ["covid", "covid"]
    r = cli(*base, "--out", str(tmp_path / "c.csv"), "--drop-derived")
    assert r.returncode == 2 and "unrecognized arguments: --drop-derived" in r.stderr
