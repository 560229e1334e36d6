import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrtune import images
from cxrtune.data import manifest
from cxrtune.data.importers import run_import
from cxrtune.data.pseudonymised import file_pseudonym
from cxrtune.dicom import pseudonym
from cxrtune.errors import CxrtuneError
from tests.conftest import STUDY_KEY, cli_in_process, need_shared
from tests.conftest import cli as run_cli


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


def test_folder_layout(tmp_path, study_key):
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
    # a DICOM among the PNGs bypasses the DICOM rules here: left out, its name unsaid
    (src / "images" / "Doe_Jane.dcm").write_bytes(b"\0" * 128 + b"DICM")
    (src / "images" / "Roe_Richard").write_bytes(b"\0" * 128 + b"DICM")  # DICOM often has no extension
    (src / "images" / "notes.txt").write_text("not an image")
    out = tmp_path / "m.csv"
    result = run_import("folder", str(src), str(out), progress=False, default_label="normal")
    df = manifest.load_manifest(str(out))
    assert list(df.label) == ["normal", "covid", "normal"]
    assert list(df.patient_id) == [pseudonym(p, "patient", study_key) for p in ("P1", "P1", "c")]
    # copies under pseudonyms beside the manifest, stored relative to it; the masks follow their image
    assert pd.read_csv(out).image.str.startswith("images/fil-").all()
    first = file_pseudonym(src / "images" / "a.png", src, study_key)
    assert Path(df.image.iloc[0]).name.startswith(first + "-")
    assert Path(df.lung_mask.iloc[0]).parent == tmp_path / "lung_masks"
    assert Path(df.lung_mask.iloc[0]).name.startswith(first + "-")
    assert Path(df.image.iloc[0]).read_bytes() == (src / "images" / "a.png").read_bytes()
    assert df.opacity_mask.iloc[0] != "" and df.opacity_mask.iloc[1] == ""
    assert "Doe_Jane" not in json.dumps(result.excluded) and "Roe_Richard" not in json.dumps(result.excluded)
    assert not df.image.str.contains("Doe_Jane|Roe_Richard|notes").any()
    assert {"file": "2 DICOM file(s) in images/", "reason": result.excluded[-2]["reason"]} == result.excluded[-2]
    assert "--format dicom" in result.excluded[-2]["reason"]
    assert result.excluded[-1]["file"] == "1 other file(s) in images/"
    result = run_import("folder", str(src), str(out), progress=False)
    reasons = {e["file"]: e["reason"] for e in result.excluded}
    assert "no label" in reasons[file_pseudonym(src / "images" / "c.png", src, study_key)]
    assert "no such image" in reasons["labels.csv row 4"]  # ghost.png: named by its row, never its name
    assert len(list((tmp_path / "images").iterdir())) == 3  # the second import reused the copies


def test_folder_import_needs_the_study_key_and_another_folder(tmp_path, monkeypatch):
    src = tmp_path / "site"
    (src / "images").mkdir(parents=True)
    images.write_png(str(src / "images" / "a.png"), np.full((32, 32), 7, np.uint8))
    monkeypatch.delenv("CXRTUNE_PSEUDONYM_KEY", raising=False)
    with pytest.raises(CxrtuneError, match="pseudonym key"):
        run_import("folder", str(src), str(tmp_path / "m.csv"), progress=False, default_label="normal")
    monkeypatch.setenv("CXRTUNE_PSEUDONYM_KEY", STUDY_KEY)
    with pytest.raises(CxrtuneError, match="source folder itself"):
        run_import("folder", str(src), str(src / "m.csv"), progress=False, default_label="normal")
    assert sorted(p.name for p in (src / "images").iterdir()) == ["a.png"]


def test_relative_source_gives_a_loadable_manifest(tmp_path, monkeypatch, study_key):
    src = tmp_path / "site"
    (src / "images").mkdir(parents=True)
    images.write_png(str(src / "images" / "a.png"), np.full((32, 32), 7, np.uint8))
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    run_import("folder", "../site", "m.csv", progress=False, default_label="normal")
    df = manifest.load_manifest(str(tmp_path / "out" / "m.csv"))
    assert Path(df.image.iloc[0]).parent == tmp_path / "out" / "images"
    assert Path(df.image.iloc[0]).read_bytes() == (src / "images" / "a.png").read_bytes()


def test_no_name_from_a_file_reaches_manifest_report_or_log(tmp_path):
    """Files named after a patient (``DOE_JOHN_MRN123``) through `cxrtune data import` of a folder
    and of reader grades: the name is in no manifest, exclusion report, output file name or log."""
    planted = "DOE_JOHN_MRN123"
    site = tmp_path / "site"
    for sub in ("images", "lung_masks"):
        (site / sub).mkdir(parents=True)
    for name in (f"{planted}.png", f"{planted}_2.png", f"{planted}_unlabelled.png", "DOE.JOHN_MRN123"):
        images.write_png(str(site / "images" / name), np.full((32, 32), 90, np.uint8))
        images.write_png(str(site / "lung_masks" / name), np.ones((32, 32), bool))
    (site / "labels.csv").write_text(f"image,label,patient_id\n{planted}.png,covid,{planted}\n"
                                     f"{planted}_2.png,normal,\n{planted}_gone.png,covid,{planted}\n"
                                     "DOE.JOHN_MRN123,normal,\n")  # a PNG whose "extension" is a name
    grades = ",".join(f"S_{z}" for z in "ABCDEF")
    (site / "scores.csv").write_text(f"image,patient_id,{grades}\nimages/{planted}.png,{planted},0,1,2,3,0,0\n"
                                     f"images/{planted}_2.png,,0,1,2,9,0,0\n{planted}_gone.png,,0,0,0,0,0,0\n"
                                     "images/DOE.JOHN_MRN123,,0,0,0,0,0,0\n")
    out = tmp_path / "out"
    env = {"CXRTUNE_PSEUDONYM_KEY": STUDY_KEY}
    runs = [run_cli("-v", "data", "import", "--format", "folder", str(site), "--out", str(out / "folder.csv"), env=env,
                    check=False),
            run_cli("-v", "data", "import", "--format", "readers", str(site), "--out", str(out / "readers.csv"),
                    env=env, check=False)]
    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    assert [r.stdout.strip() for r in runs] == ["imported 3, excluded 2, failed 0", "imported 1, excluded 3, failed 0"]
    written = {p.relative_to(out).as_posix(): p for p in out.rglob("*") if p.is_file()}
    assert {"folder.csv", "folder.excluded.csv", "readers.csv", "readers.excluded.csv"} <= set(written)
    assert len([k for k in written if k.startswith("images/")]) == 3  # the readers' image is the folder's copy
    texts = [r.stdout + r.stderr for r in runs] + [p.read_text() for p in written.values() if p.suffix == ".csv"]
    texts += list(written)  # the names of the files written
    assert [t for t in texts if "DOE" in t.upper() or "MRN" in t.upper()] == []
    assert "labels.csv row 4" in written["folder.excluded.csv"].read_text()  # the missing file, by row
    assert "scores.csv row 3" in written["readers.excluded.csv"].read_text()  # the bad grade, by row


def test_unknown_format_and_wrong_folder_are_plain_errors(tmp_path):
    with pytest.raises(CxrtuneError, match="unknown --format"):
        run_import("nifti", str(tmp_path), str(tmp_path / "m.csv"))
    with pytest.raises(CxrtuneError, match="Infection Segmentation Data"):
        run_import("covid-qu-ex", str(tmp_path), str(tmp_path / "m.csv"))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxrtune.cli", *args], capture_output=True, text=True)


def test_cli_phantom_split_validate(tmp_path):
    r = cli_in_process("data", "phantom", "--n", "12", "--size", "64", "--out", str(tmp_path / "ph"), "-q", check=False)
    assert r.returncode == 0, r.stderr
    m = str(tmp_path / "ph" / "manifest.parquet")
    r = cli_in_process("data", "split", m, "--val", "0.2", "--test", "0.2", "--folds", "2", "--tuning-fraction", "0.5",
                       check=False)
    assert r.returncode == 0, r.stderr
    df = pd.read_parquet(m)
    assert not df.image.iloc[0].startswith("/")  # still relative: the folder can move
    assert (df.fold >= -1).all() and df.tuning.any()
    assert cli_in_process("data", "validate", m, check=False).returncode == 0


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
    r = cli_in_process(*base, "--out", str(tmp_path / "a.csv"), check=False)
    assert r.returncode == 0 and r.stdout.strip() == "imported 1, excluded 1, failed 0", r.stderr
    assert pd.read_csv(tmp_path / "a.csv", keep_default_na=False).label.tolist() == [""]
    r = cli_in_process(*base, "--out", str(tmp_path / "b.csv"), "--keep-derived", "--default-label", "covid", check=False)
    assert r.returncode == 0 and r.stdout.strip() == "imported 2, excluded 0, failed 0", r.stderr
    assert pd.read_csv(tmp_path / "b.csv").label.tolist() == ["covid", "covid"]
    r = cli_in_process(*base, "--out", str(tmp_path / "c.csv"), "--drop-derived", check=False)
    assert r.returncode == 2 and "unrecognized arguments: --drop-derived" in r.stderr


def test_label_and_grade_csvs_from_excel_are_read_or_refused_by_name(tmp_path, study_key):
    """Excel writes "CSV UTF-8" with a byte-order mark (read), and plain "CSV" in a Windows code
    page (refused, saying how to save it); an empty or ragged CSV is refused by name, never a
    pandas traceback."""
    src = tmp_path / "site"
    (src / "images").mkdir(parents=True)
    images.write_png(str(src / "images" / "a.png"), np.full((32, 32), 100, np.uint8))
    labels = src / "labels.csv"
    labels.write_bytes("image,label,site\na.png,covid,Clínica\n".encode("utf-8-sig"))
    df = run_import("folder", str(src), str(tmp_path / "m.csv"), progress=False).manifest
    assert list(df.label) == ["covid"] and list(df.site) == ["Clínica"]
    for content, why in (("image,label,site\na.png,covid,Clínica\n".encode("cp1252"), "not UTF-8 .*save it as CSV UTF-8"),
                         (b"", "EmptyDataError"), (b'image,label\n"a.png,covid\n', "ParserError")):
        labels.write_bytes(content)
        with pytest.raises(CxrtuneError, match=f"labels.csv: not a readable CSV table.*{why}"):
            run_import("folder", str(src), str(tmp_path / "m.csv"), progress=False)
    (src / "scores.csv").write_bytes("image,S_A\na.png,1\n".encode("cp1252") + "é\n".encode("cp1252"))
    with pytest.raises(CxrtuneError, match="scores.csv: not a readable CSV table: not UTF-8"):
        run_import("readers", str(src), str(tmp_path / "r.csv"), progress=False)
