"""The scoring policy's pieces without models: lung cleanup, ROI, record statuses, thresholds,
bundle formats, and that inference stands below training."""

import json
import subprocess
import sys

import numpy as np
import pytest

from cxrtune import zones
from cxrtune.data.phantom import make_phantom
from cxrtune.preprocessing import extract_roi, lung_box
from cxrtune.scoring.evaluation import choose_cls_threshold
from cxrtune.scoring.scorer import build_record, score_error
from tests.conftest import bundle_with_blind_lungs


def two_lungs(size: int = 256) -> np.ndarray:
    lung = np.zeros((size, size), bool)
    lung[40:220, 30:110] = True  # image left: patient's right
    lung[40:220, 146:226] = True
    return lung


def test_small_fully_opaque_lung_survives_the_cleanup():
    """The white-out lung is the one Stage I under-segments: a small blob beside a full lung is a
    lung, not a speck (the old rule dropped blobs under 10 % of the largest)."""
    lung = np.zeros((256, 256), bool)
    lung[40:220, 30:110] = True  # 14,400 px
    lung[150:172, 170:200] = True  # 660 px: 4.6 % of the other lung, 1 % of the image
    cleaned = zones.clean_lungs(lung)
    assert cleaned.sum() == 14_400 + 660
    opacity = np.zeros_like(lung)
    opacity[150:172, 170:200] = True  # the small lung is fully opaque
    record = build_record(cleaned, opacity, 0.9, 0.1, {})[0].to_dict()
    assert record["status"] == "scored" and record["lungs_found"] == 2
    assert [record["zones"][z]["affected"] for z in "DEF"] == [True, True, True]
    assert record["lungs"]["left"]["opacity_percent"] == 100.0 and record["score"] == 3


def test_white_out_lung_of_a_phantom_survives_the_cleanup():
    """The phantom's lungs as Stage I sees a white-out: the opaque lung found only as a 9-row band
    of its middle (under 10 % of the other lung, under 1 % of the image). The cleanup keeps it and all
    three of its zones are affected; the old 10 %-of-the-largest rule would have dropped it."""
    import cv2

    phantom = make_phantom(256, "covid", seed=2)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(phantom.lung.astype(np.uint8))
    assert n == 3  # two lungs
    small, full = (1, 2) if stats[1, cv2.CC_STAT_LEFT] > stats[2, cv2.CC_STAT_LEFT] else (2, 1)  # image right: left lung
    top, height = stats[small, cv2.CC_STAT_TOP], stats[small, cv2.CC_STAT_HEIGHT]
    rows = np.arange(256)[:, None]
    band = (labels == small) & (rows >= top + height // 2 - 4) & (rows < top + height // 2 + 5)
    assert 0.05 < band.sum() / (labels == full).sum() < 0.10  # below the old rule's 10 %
    cleaned = zones.clean_lungs((labels == full) | band)
    assert np.array_equal(cleaned, (labels == full) | band)
    record = build_record(cleaned, band, 0.9, 0.1, {})[0].to_dict()
    assert record["status"] == "scored" and record["lungs_found"] == 2 and record["score"] == 3
    assert [record["zones"][z]["affected"] for z in "DEF"] == [True, True, True]
    assert record["lungs"]["left"]["opacity_percent"] == 100.0


def test_specks_and_fragments_are_dropped():
    lung = two_lungs()
    lung[2:6, 2:6] = True  # a 16-px speck in the corner
    lung[230:250, 60:80] = True  # 400 px below the right lung, in its columns: a fragment
    cleaned = zones.clean_lungs(lung)
    assert np.array_equal(cleaned, two_lungs())


def test_a_marker_beside_one_lung_is_not_a_second_lung():
    """A radiographer's marker or label beside a lone lung, above its rows, is not the other lung."""
    lung = np.zeros((256, 256), bool)
    lung[60:220, 30:110] = True
    lung[8:40, 180:220] = True  # 1,280 px: above the lung's rows, on the other side
    cleaned = zones.clean_lungs(lung)
    assert cleaned.sum() == 160 * 80
    record = build_record(cleaned, np.zeros_like(lung), 0.1, 0.1, {})[0].to_dict()
    assert record["status"] == "partial" and record["score"] is None


def test_shipped_serve_configs_use_the_cli_working_size():
    import yaml

    from cxrtune.preprocessing import WORK_SIZE
    from tests.conftest import ROOT

    for name in ("config.yaml", "config.cpu.yaml"):
        args = yaml.safe_load((ROOT / "serve" / name).read_text())["applications"][0]["args"]
        assert args.get("work_size", WORK_SIZE) == WORK_SIZE, name


def test_a_stray_speck_cannot_widen_the_crop():
    image = make_phantom(256, "covid", seed=3).image
    lung = two_lungs()
    speckled = lung.copy()
    speckled[250:254, 250:254] = True
    roi, _, box = extract_roi(image, speckled)
    clean_roi, _, clean_box = extract_roi(image, lung)
    assert box == clean_box == lung_box(lung)
    assert np.array_equal(roi, clean_roi)


def test_training_crop_uses_the_same_cleanup(tmp_path):
    """CXRDataset (training) crops reference masks with the same function: a speck in a reference
    lung mask changes nothing either."""
    from cxrtune import images
    from cxrtune.data import manifest
    from cxrtune.data.dataset import CXRDataset
    from cxrtune.preprocessing import Preprocessing

    ph = make_phantom(128, "covid", seed=1)
    speckled = ph.lung.copy()
    speckled[125:127, 125:127] = True
    rows = []
    for name, lung in (("clean", ph.lung), ("speck", speckled)):
        images.write_png(str(tmp_path / f"{name}.png"), (ph.image * 255).astype(np.uint8))
        images.write_png(str(tmp_path / f"{name}_lung.png"), lung)
        images.write_png(str(tmp_path / f"{name}_op.png"), ph.opacity)
        rows.append({"image": str(tmp_path / f"{name}.png"), "lung_mask": str(tmp_path / f"{name}_lung.png"),
                     "opacity_mask": str(tmp_path / f"{name}_op.png"), "label": "covid", "patient_id": name})
    ds = CXRDataset(manifest.new_manifest(rows), Preprocessing(size=64), roi=True)
    assert ds[0]["image"].equal(ds[1]["image"]) and ds[0]["opacity_mask"].equal(ds[1]["opacity_mask"])


def test_partial_and_unscored_records_never_read_as_healthy():
    one = two_lungs()
    one[:, 128:] = False
    record = build_record(one, np.zeros_like(one), 0.2, 0.1, {})[0].to_dict()
    assert record["status"] == "partial" and record["score"] is None
    assert "left" in record["reason"] and record["lungs"]["left"] is None
    assert [record["zones"][z]["affected"] for z in "ABCDEF"] == [False, False, False, None, None, None]
    none = np.zeros_like(one)
    record = build_record(none, None, None, 0.1, {})[0].to_dict()
    assert record["status"] == "unscored" and record["score"] is None and "no lungs" in record["reason"]
    assert record["zones"] is None and record["disease_probability"] is None
    record = build_record(two_lungs(), np.zeros_like(one), 0.2, 0.1, {})[0].to_dict()
    assert record["status"] == "scored" and record["score"] == 0 and record["reason"] is None
    # an image the model fails on counts as the worst error for its reference, never as no error
    assert [score_error(record, ref) for ref in (0, 2, 5)] == [0, 2, 5]
    assert [score_error({"status": status, "score": None}, ref) for status in ("partial", "unscored")
            for ref in (0, 2, 5)] == [6, 4, 5] * 2


def test_opacity_threshold_refinement_and_choice():
    """The opacity threshold cuts Stage II's map after Eq. 1-2 (a record refined away has no
    opacity at any threshold); calibration picks the threshold of maximum mean Dice, counting an
    image refined away as Dice 0."""
    from cxrtune.scoring.evaluation import choose_opacity_threshold
    from cxrtune.scoring.scorer import refine

    prob = np.array([[0.1, 0.3], [0.6, 0.9]], np.float32)
    assert refine(prob, 0.8, 0.5, threshold=0.5).tolist() == [[False, False], [True, True]]
    assert refine(prob, 0.8, 0.5, threshold=0.25).tolist() == [[False, True], [True, True]]
    assert not refine(prob, 0.4, 0.5, threshold=0.25).any()  # p(disease) < T_cls
    grid = np.array([0.3, 0.5, 0.7])
    # image 1: |ref| 10, at 0.3 it predicts 12 with 9 right, at 0.5 8 with 8, at 0.7 4 with 4
    one = (0.9, np.array([9.0, 8, 4]), np.array([12.0, 8, 4]), 10)
    two = (0.9, np.array([5.0, 5, 1]), np.array([20.0, 6, 1]), 6)  # over-segmented at 0.3
    choice = choose_opacity_threshold([one, two], cls_threshold=0.5, grid=grid)
    dice = [(18 / 22 + 10 / 26) / 2, (16 / 18 + 10 / 12) / 2, (8 / 14 + 2 / 7) / 2]
    assert choice["threshold"] == 0.5 and choice["dice"] == pytest.approx(dice[1]) and choice["n"] == 2
    assert [c["dice"] for c in choice["curve"]] == pytest.approx(dice)
    gated = choose_opacity_threshold([one, (0.2, *two[1:])], cls_threshold=0.5, grid=grid)
    assert gated["threshold"] == 0.5 and gated["dice"] == pytest.approx(16 / 18 / 2)  # image two counts 0


def test_calibration_refuses_the_test_split():
    import pandas as pd

    from cxrtune.errors import CxrtuneError
    from cxrtune.scoring.evaluation import CalibrateOptions, calibrate

    df = pd.DataFrame({"split": ["train", "val", "test"], "label": ["covid", "normal", "covid"]})
    for kw in ({"split": "val,test"}, {"cls_split": "test"}, {"split": "all"}, {"split": None},
               {"split": "val", "cls_split": "all"}):
        with pytest.raises(CxrtuneError, match="takes 1 test-split row.*test split is never calibrated on"):
            calibrate(None, df, CalibrateOptions(**kw))  # refused before any image is scored


def test_cls_threshold_operating_points():
    prob = np.array([0.1, 0.2, 0.35, 0.4, 0.6, 0.7, 0.8, 0.9])
    label = np.array([0, 0, 1, 0, 1, 1, 1, 1])
    best = choose_cls_threshold(prob, label)
    assert best["threshold"] == 0.35 and best["f1"] == pytest.approx(2 * 5 / (2 * 5 + 1))
    strict = choose_cls_threshold(prob, label, specificity=1.0)
    assert strict["threshold"] == 0.6 and strict["specificity"] == 1.0 and strict["sensitivity"] == 0.8


def test_normal_fp_limit_bounds_the_rate_from_above_and_raises_t_cls_past_the_normals_it_must_drop():
    from cxrtune.errors import CxrtuneError
    from cxrtune.scoring.evaluation import normal_fp_floor, normal_fp_upper

    assert normal_fp_upper(0, 30) == pytest.approx(1 - 0.05 ** (1 / 30))  # one-sided 95 %, exact
    assert [round(normal_fp_upper(k, 100), 4) for k in range(3)] == [0.0295, 0.0466, 0.0616]
    flagged = np.array([0.5, 0.8, 0.3, 0.9, 0.8])  # p of the Normals that score > 0 when refinement lets them
    assert normal_fp_floor(flagged, 100, 0.06) == 0.8  # one may stay (upper 0.047): T_cls > 0.8 keeps only 0.9
    assert normal_fp_floor(flagged, 100, 0.07) == 0.8  # two may (0.062), but the tie at 0.8 goes together
    assert normal_fp_floor(flagged, 100, 0.10) == 0.3  # four may (0.089), five may not (0.102)
    assert normal_fp_floor(flagged, 100, 0.11) == -np.inf
    assert normal_fp_floor(flagged[:0], 29, 0.10) == -np.inf
    with pytest.raises(CxrtuneError, match="28 Normal image.*cannot show an FP rate on Normal <= 0.1"):
        normal_fp_floor(flagged, 28, 0.10)  # even none flagged: upper 0.101


def test_max_zone_shares_say_when_the_scoring_policy_scores_a_normal_above_0():
    from cxrtune.scoring.evaluation import OPACITY_GRID, max_zone_shares
    from cxrtune.scoring.scorer import build_record

    rng = np.random.default_rng(0)
    cuts = OPACITY_GRID.tolist()
    for case in range(40):
        lung = np.zeros((64, 64), bool)
        lung[8:56, 6:28] = True
        if case % 4:  # else one lung (a quarter of the cases): a partial record, never a false positive
            lung[8 + case % 7:56, 36:58] = True
        prob = rng.random((64, 64)) ** (1 + case % 5)
        shares = max_zone_shares(lung, prob, cuts)
        for i in (0, 5, 9, 18):
            for t in (0.05, 0.2, 0.5):
                record, _ = build_record(lung, prob >= cuts[i], 0.9, t, None)
                assert (shares[i] >= t) == (record.score is not None and record.score > 0), (case, i, t)


def test_a_normal_fp_limit_takes_the_least_error_thresholds_that_meet_it():
    from cxrtune.errors import CxrtuneError
    from cxrtune.scoring.evaluation import CalibrateOptions, ZoneRows, _under_normal_fp_limit

    prob = np.array([0.1, 0.2, 0.35, 0.4, 0.6, 0.7, 0.8, 0.9])
    label = np.array([0, 0, 1, 0, 1, 1, 1, 1])
    assert choose_cls_threshold(prob, label, above=0.4)["threshold"] == 0.6  # max F1 (0.35) is not above
    with pytest.raises(CxrtuneError, match="exceed every p.disease.*above 0.9000 to meet --normal-fp-limit"):
        choose_cls_threshold(prob, label, above=0.9)
    # 40 Normals, share of their most opaque zone at two cuts; at the cut used (index 1): 0.5 for
    # the Normals with p 0.4 and 0.2, none elsewhere. At T 0.3 the max-F1 T_cls (0.35) lets the 0.4
    # one score > 0: 1 of 40 (upper 0.11 > limit 0.10), so T_cls must pass 0.4
    normals = [(0.4, np.array([0.9, 0.5])), (0.2, np.array([0.9, 0.5]))] + [(0.1, np.array([0.9, 0.0]))] * 38
    choice, sweep, fp = _under_normal_fp_limit(normals, 1, 0.3, (prob, label), 0.10, None)
    assert choice["threshold"] == 0.6 and sweep is None
    assert fp == {"normal_fp_limit": 0.10, "normal_fp_rate": 0.0, "normal_fp_upper": pytest.approx(1 - 0.05 ** (1 / 40)),
                  "n_normal": 40}
    choice, _, fp = _under_normal_fp_limit(normals, 1, 0.6, (prob, label), 0.10, None)  # T above both shares
    assert choice["threshold"] == 0.35 and fp["normal_fp_rate"] == 0.0  # max F1 holds: nothing to raise
    # T chosen again at the final T_cls: row A (p 0.5, no reference opacity) is refined away at 0.6
    # but not at 0.35, where it costs a third of the MAE at every T <= 0.3 (T 0.01 flags both
    # opaque Normals, and the one with p 0.4 is over 0.35)
    zone_rows = ZoneRows(fractions=np.array([[0.5, 0, 0, 0, 0, 0], [0.3, 0, 0, 0, 0, 0], [0.3, 0, 0, 0, 0, 0]]),
                         p=np.array([0.5, 0.7, 0.8]), refs=np.array([[0] * 6, [1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]),
                         reference="masks")
    assert zone_rows.sweep(0.35)["mae"] == pytest.approx(1 / 3) and zone_rows.sweep(0.35)["threshold"] == 0.01
    choice, sweep, fp = _under_normal_fp_limit(normals, 1, zone_rows, (prob, label), 0.10, None)
    assert choice["threshold"] == 0.6 and fp["normal_fp_rate"] == 0.0
    assert sweep == zone_rows.sweep(0.6) and sweep["mae"] == 0.0
    # a Normal whose p is the max-F1 T_cls itself scores > 0 there (p >= T_cls): T_cls must pass it
    tied = (np.array([0.1, 0.4, 0.4, 0.6]), np.array([0, 0, 1, 1]))
    assert choose_cls_threshold(*tied)["threshold"] == 0.4
    choice, _, fp = _under_normal_fp_limit(normals[:1] + normals[2:] + normals[2:3], 1, 0.3, tied, 0.10, None)
    assert choice["threshold"] == 0.6 and fp["normal_fp_rate"] == 0.0 and fp["n_normal"] == 40
    # where the limit binds, every (T_cls, T) pair is tried: here a stricter T costs no error at all,
    # while raising T_cls past the confident Normal (p 0.9, one zone 20 % opaque) would refine every
    # diseased zone row away (MAE 1)
    confident = (np.array([0.1, 0.2, 0.35, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95]), np.array([0, 0, 1, 0, 1, 1, 1, 0, 1]))
    diseased = ZoneRows(fractions=np.array([[0.6, 0, 0, 0, 0, 0]] * 2), p=np.array([0.5, 0.8]),
                        refs=np.array([[1, 0, 0, 0, 0, 0]] * 2), reference="masks")
    assert diseased.sweep(0.35)["threshold"] == 0.01 and diseased.sweep(0.96)["mae"] == 1.0
    for t_cls in (0.35, 0.5, 0.8, 0.96):  # every pair at once, as the sweep gives them (a row at p = T_cls stays)
        mae, rmse = diseased.error_surfaces(np.array([t_cls]))
        curve = diseased.sweep(t_cls)["curve"]
        assert mae[0].tolist() == [r["mae"] for r in curve] and rmse[0].tolist() == [r["rmse"] for r in curve]
    lone = [(0.9, np.array([0.9, 0.2]))] + [(0.1, np.array([0.9, 0.0]))] * 39
    choice, sweep, fp = _under_normal_fp_limit(lone, 1, diseased, confident, 0.10, None)
    assert choice == choose_cls_threshold(*confident) and choice["threshold"] == 0.35  # max F1 kept
    assert (sweep["threshold"], sweep["mae"], fp["normal_fp_rate"]) == (0.21, 0.0, 0.0)  # the least T past 0.2
    # never below the operating point: the lower T_cls (0.2) that would keep a diseased row of p 0.25
    # is not taken, though its error is lower (and a specificity target keeps its T_cls as the start)
    low = ZoneRows(fractions=np.array([[0.6, 0, 0, 0, 0, 0]] * 3), p=np.array([0.25, 0.5, 0.8]),
                   refs=np.array([[1, 0, 0, 0, 0, 0]] * 3), reference="masks")
    choice, sweep, _ = _under_normal_fp_limit(lone, 1, low, confident, 0.10, None)
    assert choice["threshold"] == 0.35 and sweep["mae"] == pytest.approx(1 / 3) and low.sweep(0.2)["mae"] == 0
    strict = choose_cls_threshold(*confident, specificity=0.7)
    choice, _, _ = _under_normal_fp_limit(lone, 1, low, confident, 0.10, 0.7)
    assert choice["threshold"] >= strict["threshold"] == 0.6
    # 1 of 40 has upper 0.11 <= 0.2: max F1 stays
    choice, _, fp = _under_normal_fp_limit(normals, 1, 0.3, (prob, label), 0.2, None)
    assert choice["threshold"] == 0.35 and fp["normal_fp_rate"] == 1 / 40
    with pytest.raises(CxrtuneError, match="a rate between 0 and 1 that T_cls meets"):
        CalibrateOptions(normal_fp_limit=0.1, what=("zone",))


def test_inference_does_not_import_training():
    code = ("import sys, cxrtune.scoring.scorer, cxrtune.serving.app, cxrtune.preprocessing, cxrtune.model.artifacts, "
            "cxrtune.scoring.batch_scoring, cxrtune.pacs.results; "
            "bad = [m for m in ('cxrtune.model.train', 'cxrtune.data.dataset', 'albumentations') "
            "if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_older_bundles_load_and_migrate(phantom_bundle, tmp_path, capsys):
    import shutil

    from cxrtune.cli import main
    from cxrtune.errors import CxrtuneError
    from cxrtune.scoring.scorer import load_bundle

    old = tmp_path / "old"
    shutil.copytree(phantom_bundle, old)
    meta = json.loads((old / "bundle.json").read_text())
    for key in ("zone_calibration", "cls_calibration", "model_card", "audits"):
        meta.pop(key)
    meta.update(format="cxrtune-bundle/1", zone_threshold=0.23,
                calibration={"threshold": 0.23, "mae": 0.5, "rmse": 0.7, "n": 12, "manifest": "m.parquet",
                             "split": "train,val"})
    (old / "bundle.json").write_text(json.dumps(meta))
    scorer = load_bundle(str(old))
    assert (scorer.thresholds.zone, scorer.thresholds.cls) == (0.23, 0.5)
    assert main(["bundle", "migrate", str(old), "--out", str(tmp_path / "old-now")]) == 0
    new = json.loads((tmp_path / "old-now" / "bundle.json").read_text())
    assert new["format"] == "cxrtune-bundle/4" and "calibration" not in new
    assert set(new["files"]) == {"lung.pt", "disease.pt"} and new["derived_from"]["name"] == meta["name"]
    assert new["zone_calibration"] == {**new["zone_calibration"], "threshold": 0.23, "reference": "masks", "n": 12,
                                       "mae": 0.5}
    assert new["model_card"]["thresholds"]["zone_threshold"] == 0.23
    assert new["migrated_from"] == "cxrtune-bundle/1" and new["model_card"]["migrated_from"] == "cxrtune-bundle/1"
    assert new["opacity_threshold"] == 0.5 and new["opacity_calibration"] is None
    # a /2 bundle (before the calibrated opacity cut) loads at 0.5 even if a key says otherwise
    two = tmp_path / "two"
    shutil.copytree(phantom_bundle, two)
    meta = json.loads((two / "bundle.json").read_text())
    meta.update(format="cxrtune-bundle/2", opacity_threshold=0.15)
    meta.pop("opacity_calibration", None)
    (two / "bundle.json").write_text(json.dumps(meta))
    assert load_bundle(str(two)).thresholds.opacity == 0.5
    assert main(["bundle", "--migrate", str(two), "--out", str(tmp_path / "two-now")]) == 0  # the deprecated spelling
    assert "deprecated; use `cxrtune bundle migrate URI --out NEW`" in capsys.readouterr().err  # works, and says so
    new = json.loads((tmp_path / "two-now" / "bundle.json").read_text())
    assert new["format"] == "cxrtune-bundle/4" and new["migrated_from"] == "cxrtune-bundle/2"
    # a /2 bundle that recorded a calibrated cut keeps it
    meta.update(opacity_threshold=0.15, opacity_calibration={"threshold": 0.15, "method": "max_dice", "n": 9})
    (two / "bundle.json").write_text(json.dumps({**meta, "format": "cxrtune-bundle/2"}))
    assert load_bundle(str(two)).thresholds.opacity == 0.15
    # a format newer than this code knows is refused, never scored with defaults
    meta.update(format="cxrtune-bundle/5")
    (two / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(CxrtuneError, match="format 'cxrtune-bundle/5', this cxrtune reads cxrtune-bundle/4 "
                                           r"\(a newer cxrtune wrote it\?\)"):
        load_bundle(str(two))
    # a calibration without its method: the file's fault, named, not a TypeError
    meta.update(format="cxrtune-bundle/3", zone_calibration={"threshold": 0.2})
    (two / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(CxrtuneError, match="malformed bundle metadata"):
        load_bundle(str(two))


def test_row_limit_samples_every_label():
    """calibrate/evaluate --limit: a seeded sample stratified by label, not the first rows (a
    manifest in class order would give one class)."""
    import pandas as pd

    from cxrtune.scoring.evaluation import pick_rows

    df = pd.DataFrame({"label": ["covid"] * 60 + ["normal"] * 30 + ["other_pneumonia"] * 10,
                       "split": ["train"] * 100, "x": range(100)})
    rows = pick_rows(df, "train", 20)
    assert len(rows) == 20 and list(rows.columns) == ["label", "split", "x"]
    assert rows["label"].value_counts().to_dict() == {"covid": 12, "normal": 6, "other_pneumonia": 2}
    assert rows.index.is_monotonic_increasing and rows.equals(pick_rows(df, "train", 20))


def test_score_mae_gate_counts_unscored_records_as_the_worst_error(phantom_bundle, phantom_dir, tmp_path):
    """A bundle whose Stage I finds no lungs scores nothing: the release gate's MAE is the worst
    error for each reference, so such a bundle cannot pass a gate a working one passes."""


    from cxrtune.audit.gates import score_mae
    from cxrtune.data import manifest
    from cxrtune.scoring.scorer import load_bundle, reference_zones

    blind = bundle_with_blind_lungs(phantom_bundle, tmp_path / "blind")
    rows = manifest.load_manifest(str(phantom_dir / "manifest.parquet"))
    refs = [sum(r) for r in (reference_zones(row) for _, row in rows.iterrows()) if r is not None]
    result = score_mae(load_bundle(str(blind), device="cpu"), rows, "")
    assert result["images"] == len(refs) > 0 and result["not_scored"] == len(refs)
    assert result["score_mae"] == pytest.approx(np.mean([max(r, 6 - r) for r in refs]))
    working = score_mae(load_bundle(str(phantom_bundle), device="cpu"), rows, "")
    assert working["not_scored"] < len(refs) and working["score_mae"] < result["score_mae"]


def test_thresholds_travel_as_one_value_and_scorers_are_never_changed():
    """A scorer's cuts are one frozen Thresholds from bundle.json; with_thresholds/with_stage make
    new scorers (a sweep's trial or a calibration never changes the scorer it was given)."""
    import dataclasses

    import torch
    from torch import nn

    from cxrtune.model.artifacts import Calibration, Thresholds
    from cxrtune.preprocessing import Preprocessing
    from cxrtune.scoring.scorer import Scorer, StageModel

    stage = StageModel(nn.Conv2d(3, 1, 1), Preprocessing(size=32, in_channels=3), {})
    scorer = Scorer(stage, None, Thresholds(zone=0.2, opacity_calibration=Calibration(0.4, "max_dice")),
                    device=torch.device("cpu"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        scorer.thresholds.zone = 0.3
    cut = scorer.with_thresholds(opacity=0.3)
    assert (scorer.thresholds.opacity, cut.thresholds.opacity, cut.thresholds.zone) == (0.5, 0.3, 0.2)
    assert cut.lung is scorer.lung and cut.thresholds.opacity_calibration == scorer.thresholds.opacity_calibration
    other = StageModel(nn.Conv2d(3, 1, 1), stage.pre, {})
    trial = scorer.with_stage("disease", other)
    assert scorer.disease is None and trial.disease is other and trial.thresholds == scorer.thresholds
    with pytest.raises(ValueError, match="lung or disease"):
        scorer.with_stage("opacity", other)
