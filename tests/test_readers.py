"""Reader-score import (``--format readers``), reader columns in the manifest, agreement statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrtune.data import manifest
from cxrtune.data.importers import IMPORTERS
from cxrtune.dicom import pseudonym
from cxrtune.errors import CxrtuneError, ManifestError
from cxrtune.scoring import agreement
from tests.conftest import need_shared

ZONES = "ABCDEF"
pytestmark = pytest.mark.usefixtures("study_key")  # the importer pseudonymises with the study key


def import_readers(src, tmp_path, **options):
    """The readers importer with its copies in ``tmp_path/data``."""
    return IMPORTERS["readers"](str(src), data_dir=str(tmp_path / "data"), progress=False, **options)


def _png(path, value=128, suffix=".png"):
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((16, 12), value, np.uint8)
    assert cv2.imwrite(str(path), img)
    return path


def _row(image, s, j, **extra):
    row = {"image": image}
    row.update({f"S_{z}": v for z, v in zip(ZONES, s)})
    row.update({f"J_{z}": v for z, v in zip(ZONES, j)})
    row.update(extra)
    return row


@pytest.fixture
def reader_folder(tmp_path):
    """Five listed images: three good (one JPEG beside the CSV), one grade 4, one file missing,
    plus one with a wrong S_affected_0_6 and one with an empty grade."""
    root = tmp_path / "brixia-mini"
    _png(root / "images" / "a.png")
    _png(root / "images" / "b.png")
    _png(root / "c.jpg")
    _png(root / "images" / "d.png")
    _png(root / "images" / "e.png")
    _png(root / "images" / "f.png")
    rows = [
        _row("images/a.png", [0, 1, 2, 3, 0, 0], [1, 1, 2, 3, 0, 1], S_affected_0_6=3, sex="F", age="61"),
        _row("b.png", [3, 3, 3, 3, 3, 3], [2, 3, 3, 3, 3, 0], S_affected_0_6=6, sex="M", age=""),
        _row("c.jpg", [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], S_affected_0_6="", sex="", age="70"),
        _row("images/d.png", [0, 4, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], S_affected_0_6=1, sex="F", age=""),
        _row("images/e.png", [1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], S_affected_0_6=3, sex="F", age=""),
        _row("images/f.png", [1, "", 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], S_affected_0_6=1, sex="F", age=""),
        _row("images/missing.png", [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], S_affected_0_6=0, sex="", age=""),
    ]
    df = pd.DataFrame(rows)
    df["note"] = "ignored"
    df.to_csv(root / "scores.csv", index=False)
    return root


def test_import_two_readers(reader_folder, tmp_path, study_key):
    result = import_readers(reader_folder, tmp_path)
    df = result.manifest
    copies = [Path(p) for p in df["image"]]  # pseudonymised copies: no source name survives
    assert [p.parent for p in copies] == [tmp_path / "data" / "images"] * 3
    assert [p.name.split("-")[:2] == ["fil", pseudonym(rel, "file", study_key)[4:]]
            for p, rel in zip(copies, ["images/a.png", "images/b.png", "c.jpg"])] == [True] * 3
    assert [p.suffix for p in copies] == [".png", ".png", ".jpg"]
    assert copies[0].read_bytes() == (reader_folder / "images" / "a.png").read_bytes()
    assert list(df["patient_id"]) == [pseudonym(x, "patient", study_key) for x in "abc"]
    assert list(df["label"]) == ["", "", ""]
    assert list(df["source"]) == ["brixia-mini"] * 3
    assert list(df["view"]) == ["unknown"] * 3
    assert list(df["eval_only"]) == [True] * 3  # reference sets: calibration and evaluation only
    assert list(df["sex"]) == ["F", "M", ""]
    assert df["age"].tolist()[0] == 61 and np.isnan(df["age"].tolist()[1]) and df["age"].tolist()[2] == 70
    reader_cols = [f"reader_{r}_{z}" for r in "SJ" for z in ZONES]
    assert sorted(c for c in df.columns if c.startswith("reader_")) == sorted(reader_cols)
    assert all(str(df[c].dtype) == "Int64" for c in reader_cols)
    assert [int(df.at[0, f"reader_S_{z}"]) for z in ZONES] == [0, 1, 2, 3, 0, 0]
    assert [int(df.at[1, f"reader_J_{z}"]) for z in ZONES] == [2, 3, 3, 3, 3, 0]
    assert "note" not in df.columns and "S_affected_0_6" not in df.columns
    reasons = {e["file"]: e["reason"] for e in result.excluded}  # CSV rows by number: names can be a patient's
    assert sorted(reasons) == [f"scores.csv row {n}" for n in (5, 6, 7, 8)]
    assert "S_B='4'" in reasons["scores.csv row 5"] and "0-3" in reasons["scores.csv row 5"]
    assert reasons["scores.csv row 6"] == "reader S: S_affected_0_6='3' but 2 zone(s) graded above 0"
    assert "S_B=''" in reasons["scores.csv row 7"]
    assert reasons["scores.csv row 8"].startswith("image file not found")
    assert result.failed == []


def test_import_labels_and_options(reader_folder, tmp_path, study_key):
    table = pd.read_csv(reader_folder / "scores.csv", dtype=str, keep_default_na=False)
    table["label"] = ["covid", "", "normal", "", "", "", ""]
    table["patient_id"] = ["p1", "p1", "", "", "", "", ""]
    table["view"] = ["AP", "", "PA", "", "", "", ""]
    table.to_csv(reader_folder / "other.csv", index=False)
    result = import_readers(reader_folder, tmp_path, csv="other.csv", default_label="other_disease",
                            source="brixia")
    df = result.manifest
    assert list(df["label"]) == ["covid", "other_disease", "normal"]
    assert list(df["patient_id"]) == [pseudonym(x, "patient", study_key) for x in ("p1", "p1", "c")]
    assert list(df["view"]) == ["AP", "unknown", "PA"]
    assert list(df["source"]) == ["brixia"] * 3
    with pytest.raises(CxrtuneError, match="default-label"):
        import_readers(reader_folder, tmp_path, default_label="sick")
    table["label"] = ["flu", "", "", "", "", "", ""]
    table.to_csv(reader_folder / "bad.csv", index=False)
    result = import_readers(reader_folder / "bad.csv", tmp_path)
    assert {e["file"]: e["reason"] for e in result.excluded}["bad.csv row 2"].startswith("unknown label 'flu'")


def test_import_layout_errors(tmp_path):
    _png(tmp_path / "x.png")
    pd.DataFrame([{"image": "x.png", "S_A": 1, "S_B": 1}]).to_csv(tmp_path / "scores.csv", index=False)
    with pytest.raises(CxrtuneError, match="S has A, B"):
        import_readers(tmp_path, tmp_path / "out")
    pd.DataFrame([{"image": "x.png", "score": 1}]).to_csv(tmp_path / "scores.csv", index=False)
    with pytest.raises(CxrtuneError, match="no reader grade columns"):
        import_readers(tmp_path, tmp_path / "out")
    with pytest.raises(CxrtuneError, match="not found"):
        import_readers(tmp_path, tmp_path / "out", csv="nope.csv")


@pytest.mark.parametrize("name", ["m.parquet", "m.csv"])
def test_manifest_round_trip_keeps_reader_columns(reader_folder, tmp_path, name):
    df = import_readers(reader_folder, tmp_path, default_label="covid").manifest
    df.loc[2, "reader_J_C"] = pd.NA  # a missing grade survives as NA, not 0 or -1
    manifest.save_manifest(df, str(tmp_path / name))
    back = manifest.load_manifest(str(tmp_path / name))
    for r in "SJ":
        for z in ZONES:
            col = f"reader_{r}_{z}"
            assert str(back[col].dtype) == "Int64"
            assert back[col].tolist() == df[col].tolist()
    assert pd.isna(back.at[2, "reader_J_C"])
    assert manifest.readers_in(back) == ["J", "S"]


def test_reader_grades_shape_order_and_missing():
    df = pd.DataFrame({"image": ["a", "b"], "label": ["covid"] * 2, "patient_id": ["a", "b"],
                       **{f"reader_X_{z}": [i, 3 - i % 4] for i, z in zip([3, 2, 1, 0, 1, 2], "FEDCBA")},
                       "reader_Y_A": [1, 1], "zone_A": [1, 0]})
    df = manifest.new_manifest(df.to_dict("records"))
    df.loc[1, "reader_X_D"] = pd.NA
    assert manifest.readers_in(df) == ["X"]  # Y has one zone only
    grades = manifest.reader_grades(df)
    assert list(grades) == ["X"]
    assert grades["X"].shape == (2, 6) and grades["X"].dtype.kind == "i"
    assert grades["X"][0].tolist() == [2, 1, 0, 1, 2, 3]  # A..F, not column order
    assert grades["X"][1].tolist() == [1, 2, 3, -1, 1, 0]
    assert str(df["reader_Y_A"].dtype) == "Int64"


def test_validate_rejects_out_of_range_reader_grade(tmp_path):
    img = _png(tmp_path / "a.png")
    df = manifest.new_manifest([{"image": str(img), "label": "covid", "patient_id": "a",
                                 **{f"reader_S_{z}": 0 for z in ZONES}}])
    manifest.validate(df)
    df.loc[0, "reader_S_E"] = 5
    with pytest.raises(ManifestError, match="reader_S_E must be 0-3, got 5"):
        manifest.validate(df)


# --------------------------------------------------------------------------------------- agreement

def test_cross_validated_threshold_never_sees_held_out_fold():
    # Fold 0 separates at T in (0.25, 0.35], fold 1 at (0.55, 0.65]. Each fold's T comes from the
    # OTHER fold, so fold 0 is thresholded at 0.56 (all zones predicted clear) and fold 1 at 0.26
    # (all affected); a T chosen on all data (0.26, the smallest of tied optima) would predict
    # fold 0 perfectly.
    frac = np.repeat([[0.35], [0.25], [0.65], [0.55]], [4, 4, 4, 4], axis=0) * np.ones((1, 6))
    ref = np.repeat([[3], [0], [2], [0]], [4, 4, 4, 4], axis=0) * np.ones((1, 6), int)
    fold_ids = np.repeat([0, 1], 8)
    from cxrtune.scoring.scorer import sweep_threshold

    assert sweep_threshold(frac, (ref > 0).astype(int))["threshold"] == pytest.approx(0.26)
    pred, thresholds = agreement.cross_validated_predictions(frac, ref, fold_ids=fold_ids)
    assert thresholds == pytest.approx([0.56, 0.26])
    assert pred.dtype == bool and pred.shape == (16, 6)
    assert not pred[:8].any()
    assert pred[8:].all()


def test_cross_validated_default_folds_match_sweep_on_complement():
    from cxrtune.scoring.scorer import sweep_threshold

    rng = np.random.default_rng(3)
    ref = rng.integers(0, 4, size=(40, 6))
    frac = np.clip((ref > 0) * rng.uniform(0.2, 0.9, size=(40, 6)) + rng.uniform(0, 0.3, size=(40, 6)), 0, 1)
    fold_of = agreement.stratified_folds((ref > 0).sum(axis=1), folds=4, seed=7)
    assert sorted(np.bincount(fold_of).tolist()) == [10, 10, 10, 10]
    pred, thresholds = agreement.cross_validated_predictions(frac, ref, folds=4, seed=7)
    for k in range(4):
        t = sweep_threshold(frac[fold_of != k], (ref[fold_of != k] > 0).astype(int))["threshold"]
        assert thresholds[k] == t
        assert (pred[fold_of == k] == (frac[fold_of == k] >= t)).all()


def test_score_agreement_known_values():
    out = agreement.score_agreement(np.array([0, 1, 2, 3]), np.array([0, 1, 2, 5]), n_boot=200)
    assert out["n"] == 4
    assert out["mae"] == 0.5
    assert out["rmse"] == 1.0
    perfect = agreement.score_agreement(np.array([0, 2, 4, 6, 3]), np.array([0, 2, 4, 6, 3]), n_boot=200)
    assert perfect["kappa_quadratic"] == 1.0 and perfect["spearman"] == pytest.approx(1.0)
    assert perfect["mae"] == 0.0 and perfect["mae_ci"] == [0.0, 0.0]

    rng = np.random.default_rng(0)
    ref = rng.integers(0, 7, 80)
    pred = np.clip(ref + rng.integers(-2, 3, 80), 0, 6)
    noisy = agreement.score_agreement(pred, ref, n_boot=1000, seed=1)
    from scipy.stats import spearmanr
    from sklearn.metrics import cohen_kappa_score

    assert noisy["mae"] == pytest.approx(np.abs(pred - ref).mean())
    assert noisy["kappa_quadratic"] == pytest.approx(
        cohen_kappa_score(ref, pred, labels=list(range(7)), weights="quadratic"))
    assert noisy["spearman"] == pytest.approx(spearmanr(pred, ref)[0])
    assert noisy["pearson"] == pytest.approx(np.corrcoef(pred, ref)[0, 1])
    assert noisy["kappa_linear"] == pytest.approx(cohen_kappa_score(ref, pred, labels=list(range(7)), weights="linear"))
    for stat in ("mae", "rmse", "kappa_quadratic", "spearman"):
        lo, hi = noisy[f"{stat}_ci"]
        assert lo < noisy[stat] < hi, stat
    assert agreement.score_agreement(pred, ref, n_boot=1000, seed=1) == noisy  # seeded
    # the intervals are the 2.5/97.5 % percentiles of the statistic over resamples of the images
    idx = np.random.default_rng(1).integers(0, 80, size=(1000, 80))
    expected_mae = np.percentile(np.abs(pred[idx] - ref[idx]).mean(axis=1), [2.5, 97.5])
    assert noisy["mae_ci"] == pytest.approx(expected_mae)
    point = agreement.score_agreement(pred, ref, n_boot=0)
    assert not any(k.endswith("_ci") for k in point)
    assert {k: v for k, v in noisy.items() if not k.endswith("_ci")} == point


def test_agreement_of_one_image_or_no_resamples():
    """scipy's bootstrap needs two images and one resample: one image resamples to itself, and no
    resamples give no interval (the old hand-written bootstrap's answers)."""
    one = agreement.score_agreement(np.array([2]), np.array([3]), n_boot=200)
    assert one["mae"] == 1.0 and one["mae_ci"] == [1.0, 1.0] and one["n"] == 1
    zones = agreement.zone_agreement(np.array([[1, 0, 0, 0, 0, 0]], bool), np.array([[1, 0, 0, 0, 0, 0]]), n_boot=200)
    assert zones["overall"] == {"agreement": 1.0, "ci": [1.0, 1.0]}
    pred, ref = np.zeros((3, 6), bool), np.ones((3, 6))
    none = agreement.zone_agreement(pred, ref, n_boot=0)
    assert none["overall"]["agreement"] == 0.0 and np.isnan(none["overall"]["ci"]).all()


def test_score_agreement_interval_skips_undefined_resamples():
    """Kappa is undefined on a resample where both raters use one category; the interval comes
    from the other resamples instead of turning NaN."""
    pred, ref = np.array([0] * 9 + [6]), np.array([0] * 9 + [6])
    out = agreement.score_agreement(pred, ref, n_boot=500, seed=0)
    assert out["kappa_quadratic"] == 1.0 and out["kappa_quadratic_ci"] == [1.0, 1.0]


def test_zone_agreement_confusion():
    ref = np.array([[0, 0, 0, 0, 0, 0], [2, 0, 0, 0, 0, 0], [3, 1, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]])
    pred = np.array([[1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], bool)
    out = agreement.zone_agreement(pred, ref, n_boot=300)
    assert out["zones"]["A"]["agreement"] == 0.75
    assert out["zones"]["A"]["confusion"] == [[1, 1], [0, 2]]  # rows reference, cols predicted
    assert out["zones"]["B"]["confusion"] == [[2, 0], [1, 1]]
    assert out["zones"]["F"]["agreement"] == 1.0 and out["zones"]["F"]["ci"] == [1.0, 1.0]
    assert out["overall"]["agreement"] == pytest.approx(22 / 24)
    # images are resampled, not zones: with 4 images the mean of per-image agreements (5/6, 1, 1,
    # 5/6) runs from 5/6 (both imperfect images drawn) to 1
    assert out["overall"]["ci"] == [pytest.approx(5 / 6), 1.0]


def test_reader_report_pairs_baseline_and_groups():
    rng = np.random.default_rng(5)
    n = 24
    s = rng.integers(0, 4, size=(n, 6))
    j = s.copy()
    j[:6, 0] = np.where(s[:6, 0] > 0, 0, 2)  # the junior flips zone A on the first six images
    pred = s > 0
    pred[:12, 5] = ~pred[:12, 5]  # the model flips zone F on the first twelve
    groups = pd.DataFrame({"site": ["x"] * 20 + ["y"] * 4, "sex": ["F", "M"] * 12})
    report = agreement.reader_report(pred, {"S": s, "J": j}, groups=groups, by=["site", "sex"], n_boot=200)
    assert report["n_images"] == n
    assert sorted(report["readers"]) == ["J", "S"]
    assert report["readers"]["S"]["score"]["mae"] == pytest.approx(12 / n)
    assert report["readers"]["S"]["zones"]["zones"]["F"]["agreement"] == pytest.approx(12 / n)
    pair = report["pairs"]["J_vs_S"]
    assert pair["readers"] == ["J", "S"] and pair["reference"] == "S"
    s_count, j_count = (s > 0).sum(axis=1), (j > 0).sum(axis=1)
    assert pair["score"]["mae"] == pytest.approx(np.abs(s_count - j_count).mean())
    assert pair["score"]["mae"] == pytest.approx(6 / n)
    assert pair["zones"]["zones"]["A"]["agreement"] == pytest.approx(18 / n)
    maes = [np.abs(s_count - c).mean() for c in range(7)]
    assert report["readers"]["S"]["baseline"] == {"constant": int(np.argmin(maes)), "mae": pytest.approx(min(maes))}
    assert report["readers"]["S"]["baseline"]["mae"] > 0
    by_site = report["readers"]["S"]["by"]["site"]
    assert list(by_site) == ["x"] and by_site["x"]["n"] == 20
    assert by_site["x"]["score"]["mae"] == pytest.approx(12 / 20)
    assert sorted(report["readers"]["J"]["by"]["sex"]) == ["F", "M"]
    assert report["pairs"]["J_vs_S"]["by"]["sex"]["F"]["n"] == 12
    skipped = sorted((e["comparison"], e["by"], e["value"], e["n"]) for e in report["skipped"])
    assert skipped == [("J_vs_S", "site", "y", 4), ("model_vs_J", "site", "y", 4), ("model_vs_S", "site", "y", 4)]
    assert all(e["reason"] == "fewer than 5 images" for e in report["skipped"])


def test_reader_report_drops_missing_grades_and_is_json_safe():
    import json

    s = np.array([[1, 1, 0, 0, 0, 0]] * 6)
    j = s.copy()
    j[0, 2] = -1
    report = agreement.reader_report(s > 0, {"S": s, "J": j}, n_boot=50)
    assert report["readers"]["J"]["n"] == 5 and report["readers"]["J"]["n_missing"] == 1
    assert report["readers"]["S"]["n"] == 6
    assert report["readers"]["S"]["score"]["kappa_quadratic"] is None  # constant raters: undefined
    json.dumps(report, allow_nan=False)


def test_one_readers_gaps_take_no_image_from_another_readers_figures(tmp_path, monkeypatch):
    """Reader J left zone A of images 5-9 ungraded, the very images the model gets wrong: the model
    against S is still judged on all ten images S graded, scored or not counted alike, and the
    per-image file leaves J's score empty there."""
    from cxrtune.scoring.evaluation import _reader_figures

    n = 10
    rows = pd.DataFrame({f"reader_{r}_{z}": [1] * n for r in "JS" for z in "ABCDEF"}, dtype="Int64")
    rows.loc[5:, "reader_J_A"] = pd.NA
    fractions = np.ones((n, 6))
    fractions[5:, :3] = 0.0  # images 5-9: the model misses the right lung (3 zones)
    info = _reader_figures(rows, fractions, 0.5, ["J", "S"], (), None, 3, 0, str(tmp_path))
    assert info["n"] == n and info["n_incomplete_grades"] == {"J": 5, "S": 0}
    assert info["readers"]["S"]["score"]["n"] == n and info["readers"]["S"]["score"]["mae"] == pytest.approx(1.5)
    assert info["readers"]["J"]["score"]["n"] == 5 and info["readers"]["J"]["score"]["mae"] == 0.0
    assert info["mae_counting_not_scored"] == {"J": 0.0, "S": pytest.approx(1.5)}
    per_image = pd.read_csv(tmp_path / "reader_scores.csv")
    assert per_image["reader_S"].tolist() == [6] * n and per_image["reader_J"].isna().tolist() == [False] * 5 + [True] * 5
    cv = _reader_figures(rows, fractions, 0.5, ["J", "S"], (), "reader:J", 2, 0, str(tmp_path / "cv"))
    assert cv["n"] == 5 and cv["readers"]["S"]["score"]["n"] == 5  # J's cross-validation predicts J's images only
    assert cv["cv_folds_by"] == "image"
    real, folds_used = agreement.cross_validated_predictions, []

    def recorded(*args, fold_ids=None, **kwargs):
        folds_used.append(fold_ids)
        return real(*args, fold_ids=fold_ids, **kwargs)

    monkeypatch.setattr(agreement, "cross_validated_predictions", recorded)
    twins = _reader_figures(rows.assign(patient_id=[f"p{i // 2}" for i in range(n)]), fractions, 0.5, ["J", "S"], (),
                            "reader:S", 2, 0, str(tmp_path / "twins"))
    assert twins["cv_folds_by"] == "patient"
    (fold_ids,) = folds_used  # a patient's two films are held out together, and both folds hold out some
    assert all(fold_ids[2 * k] == fold_ids[2 * k + 1] for k in range(n // 2)) and set(fold_ids) == {0, 1}


def test_best_constant():
    assert agreement.best_constant(np.array([6, 6, 6, 0, 1])) == {"constant": 6, "mae": pytest.approx(11 / 5)}
    assert agreement.best_constant(np.array([2, 3])) == {"constant": 2, "mae": 0.5}


def test_plot_reader_agreement(tmp_path):
    rng = np.random.default_rng(1)
    s = rng.integers(0, 4, size=(15, 6))
    j = np.clip(s + rng.integers(-1, 2, size=s.shape), 0, 3)
    written = agreement.plot_reader_agreement(s > 0, {"S": s, "J": j}, str(tmp_path / "plots"))
    assert [w.rsplit("/", 1)[-1] for w in written] == ["score_agreement.png", "zone_agreement.png"]
    for name in ("score_agreement.png", "zone_agreement.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="N x 6"):  # 0-6 scores would plot no model row in zone_agreement
        agreement.plot_reader_agreement((s > 0).sum(axis=1), {"S": s}, str(tmp_path / "scores_only"))


@pytest.mark.realdata
def test_brixia_dev_readers(tmp_path):
    root = need_shared("brixia-dev")
    result = import_readers(root, tmp_path)
    df = result.manifest
    assert len(df) == 89 and result.excluded == [] and df["eval_only"].all()
    assert manifest.readers_in(df) == ["J", "S"]
    grades = manifest.reader_grades(df)
    s_count, j_count = (grades["S"] > 0).sum(axis=1), (grades["J"] > 0).sum(axis=1)
    assert np.abs(s_count - j_count).mean() == pytest.approx(1.08, abs=0.01)
    report = agreement.reader_report(grades["S"] > 0, grades, n_boot=200)
    assert report["pairs"]["J_vs_S"]["score"]["mae"] == pytest.approx(1.08, abs=0.01)
    assert report["pairs"]["J_vs_S"]["zones"]["overall"]["agreement"] == pytest.approx(0.81, abs=0.01)


def test_run_import_writes_manifest_and_exclusion_report(reader_folder, tmp_path):
    from cxrtune.data.importers import report_uri, run_import

    out = str(tmp_path / "out" / "m.parquet")
    result = run_import("readers", str(reader_folder), out, progress=False, default_label="covid")
    assert len(result.manifest) == 3
    back = manifest.load_manifest(out)
    assert manifest.reader_grades(back)["J"][1].tolist() == [2, 3, 3, 3, 3, 0]
    report = pd.read_csv(report_uri(out))
    assert sorted(report["file"]) == [f"scores.csv row {n}" for n in (5, 6, 7, 8)]


def test_unlabelled_import_round_trips(reader_folder, tmp_path):
    from cxrtune.data.importers import run_import

    out = str(tmp_path / "m.csv")
    run_import("readers", str(reader_folder), out, progress=False)
    back = manifest.load_manifest(out)
    assert list(back["label"]) == ["", "", ""]
    assert manifest.reader_grades(back)["S"].tolist() == [[0, 1, 2, 3, 0, 0], [3] * 6, [0] * 6]
