"""Phantom data end to end: train both stages two epochs, bundle, calibrate, score, evaluate."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from cxrtune import images
from cxrtune.scoring.scorer import sweep_threshold
from tests import golden
from tests.conftest import bundle_with_blind_lungs, cli_in_process


def run(*args, cwd=None):
    return cli_in_process(*args, cwd=cwd).stdout


@pytest.fixture(scope="module")
def bundle(phantom_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    m = str(phantom_dir / "manifest.parquet")
    common = ["--config", "configs/phantom_quick.yaml", "--manifest", m]
    # Stage I must find the phantoms' lungs, or the plausibility check refuses their records (at
    # the config's batch 4 and 2 epochs it marked the whole image)
    run("train", *common, "--out", str(work / "lung"), "--set", "batch_size=2", "lr=0.01", "epochs=6")
    run("train", *common, "--out", str(work / "disease"), "--set", "task=disease", "dlw_alpha=0.05")
    run("bundle", "make", "--lung", str(work / "lung"), "--disease", str(work / "disease"), "--out", str(work / "made"))
    run("calibrate", str(work / "made"), "--out", str(work / "bundle"), "--manifest", m)  # what the tests score with
    yield work
    shutil.rmtree(work, ignore_errors=True)  # ~0.7 GB of checkpoints: freed with the module


@pytest.mark.slow  # trains both stages through the CLI (the module's bundle)
def test_calibrate_stores_the_thresholds_with_provenance(bundle, phantom_dir):
    from cxrtune.data import manifest
    from cxrtune.scoring.evaluation import OPACITY_GRID
    from cxrtune.scoring.scorer import load_bundle

    source = (bundle / "made" / "bundle.json").read_bytes()  # as `bundle make` left it
    cal = bundle / "calibrated"
    out = run("calibrate", str(bundle / "made"), "--out", str(cal), "--manifest", str(phantom_dir / "manifest.parquet"))
    assert "zone threshold" in out and "T_cls" in out and "opacity threshold" in out
    assert (bundle / "made" / "bundle.json").read_bytes() == source  # a new bundle; the old one as it was
    meta = json.loads((cal / "bundle.json").read_text())
    zone, cls, opacity = meta["zone_calibration"], meta["cls_calibration"], meta["opacity_calibration"]
    assert meta["format"] == "cxrtune-bundle/4" and meta["versions"]["cxrtune"]
    assert meta["name"] == "calibrated" and meta["derived_from"]["name"] == "made"
    assert meta["files"] == {f: hashlib.sha256((cal / f).read_bytes()).hexdigest() for f in ("lung.pt", "disease.pt")}
    assert zone["split"] == "train,val" and zone["reference"] == "zones" and zone["method"] == "min_mae"
    assert zone["threshold"] == meta["zone_threshold"] and 0 < meta["zone_threshold"] <= 1
    assert zone["n"] > 0 and zone["mae"] is not None
    assert cls["split"] == "val" and cls["method"] == "max_f1" and cls["threshold"] == meta["cls_threshold"]
    assert cls["n"] == 5  # the phantoms' val rows (24 phantoms, 20 % val), all labelled
    df = manifest.load_manifest(str(phantom_dir / "manifest.parquet"))
    with_opacity = sum(images.read_mask(str(phantom_dir / m)).any()
                       for m in df[(df.split == "val") & (df.opacity_mask != "")].opacity_mask)
    assert (opacity["method"], opacity["reference"], opacity["split"], opacity["n"]) == ("max_dice", "masks", "val",
                                                                                        with_opacity) and with_opacity
    assert opacity["threshold"] == meta["opacity_threshold"] and opacity["threshold"] in OPACITY_GRID
    assert 0 <= opacity["dice"] <= 1 and load_bundle(str(cal)).thresholds.opacity == opacity["threshold"]
    golden.check("bundle_json_calibrated", meta)
    card = meta["model_card"]
    assert card["thresholds"]["zone_calibration"]["reference"] == "zones" and card["intended_use"]
    assert card["thresholds"]["opacity_calibration"]["method"] == "max_dice"
    from cxrtune.model.artifacts import derive_bundle

    derive_bundle(str(cal), str(bundle / "cls-default"), cls_threshold=0.5)  # so that calibrating T_cls moves it
    r = cli_in_process("calibrate", str(bundle / "cls-default"), "--manifest",
                        str(phantom_dir / "manifest.parquet"), "--what", "cls", "--specificity", "1.0",
                        "--out", str(bundle / "cls-calibrated"), check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((bundle / "cls-calibrated" / "bundle.json").read_text())
    assert meta["cls_calibration"]["method"] == "specificity" and meta["cls_calibration"]["specificity"] == 1.0
    assert meta["cls_threshold"] != 0.5 and "T_cls changed but T did not" in r.stderr  # T is now stale
    r = cli_in_process("calibrate", str(bundle / "made"), "--manifest",
                        str(phantom_dir / "manifest.parquet"), "--out", str(cal), check=False)
    assert r.returncode == 2 and "immutable" in r.stderr  # never over an existing bundle
    assert json.loads((cal / "bundle.json").read_text())["cls_calibration"]["method"] == "max_f1"


@pytest.mark.slow  # trains both stages through the CLI (the module's bundle)
def test_score_images_dicom_and_bad_files(bundle, phantom_dir, tmp_path):
    from pydicom.data import get_testdata_file

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk")
    imgs = sorted((phantom_dir / "images").iterdir())[:3]
    out = tmp_path / "r.jsonl"
    run("score", *map(str, imgs), get_testdata_file("RG1_UNCR.dcm"), str(bad), "--bundle",
        str(bundle / "bundle"), "--out", str(out), "--overlays", str(tmp_path / "ov"))
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 5
    good = [x for x in lines if x["status"] != "error"]
    assert len(good) == 4
    for rec in good:
        assert rec["status"] in ("scored", "partial", "unscored")
        assert (rec["score"] is None) == (rec["status"] != "scored")
        if rec["status"] == "scored":
            assert 0 <= rec["score"] <= 6 and set(rec["zones"]) == set("ABCDEF")
            assert set(rec["lungs"]) == {"right", "left"} and 0 <= rec["disease_probability"] <= 1
        assert rec["models"]["lung"].startswith("FPN/resnet18") and len(rec["models"]["bundle_hash"]) == 16
    assert [x["input"]["format"] for x in good] == ["png", "png", "png", "dicom"]
    bad_line = [x for x in lines if x["status"] == "error"][0]
    golden.check("cli_score_record", next(x for x in good if x["status"] == "scored"))
    golden.check("cli_score_record_dicom", good[-1])
    golden.check("cli_score_record_error", bad_line)
    assert "broken.png" in bad_line["image"] and bad_line["score"] is None and bad_line["error"]
    overlays = sorted((tmp_path / "ov").iterdir())
    assert len(overlays) == 4 and images.decode_raster(overlays[0].read_bytes()).shape[0] >= 512
    assert sorted(x["overlay"] for x in good) == [p.name for p in overlays]
    assert not any("phantom" in p.name or "RG1" in p.name for p in overlays)  # named by hash, not by file


@pytest.mark.slow  # trains both stages through the CLI (the module's bundle)
def test_score_streams_records_and_resumes(bundle, phantom_dir, tmp_path):
    imgs = sorted((phantom_dir / "images").iterdir())[:5]
    out = tmp_path / "r.jsonl"
    run("score", *map(str, imgs[:2]), "--bundle", str(bundle / "bundle"), "--out", str(out), "-q")
    first = out.read_text().splitlines()
    assert len(first) == 2
    # a run cut off mid-line: the cut line is scored again, complete lines are kept as they were
    out.write_text("\n".join(first) + "\n" + '{"image": "' + str(imgs[2])[:10])
    r = cli_in_process("score", *map(str, imgs), "--bundle",
                        str(bundle / "bundle"), "--out", str(out), check=False)
    assert r.returncode == 2 and "--resume" in r.stderr  # never overwrites without being asked
    stdout = run("score", *map(str, imgs), "--bundle", str(bundle / "bundle"), "--out", str(out), "--resume", "-q")
    assert "already done 2" in stdout
    lines = out.read_text().splitlines()
    assert len(lines) == 5 and lines[:2] == first  # the cut line is gone, its image scored again
    assert [json.loads(x)["image"] for x in lines[2:]] == [str(p) for p in imgs[2:]]


@pytest.mark.slow  # trains both stages through the CLI (the module's bundle)
def test_score_takes_a_manifest_and_an_s3_prefix(bundle, phantom_dir, tmp_path, bucket):
    from cxrtune import storage

    imgs = sorted((phantom_dir / "images").iterdir())[:2]
    for p in imgs:
        storage.write_bytes(f"s3://{bucket}/cxr/{p.name}", p.read_bytes())
    out = tmp_path / "r.jsonl"
    run("score", f"s3://{bucket}/cxr/", "--manifest", str(phantom_dir / "manifest.parquet"),
        "--bundle", str(bundle / "bundle"), "--out", str(out), "-q")
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["image"] for x in lines[:2]] == [f"s3://{bucket}/cxr/{p.name}" for p in imgs]
    assert len(lines) == 2 + 24 and all(x["status"] != "error" for x in lines)


@pytest.mark.slow  # trains both stages through the CLI (the module's bundle)
def test_evaluate_writes_metrics_and_plots(bundle, phantom_dir):
    out = bundle / "eval"
    summary = json.loads(run("evaluate", "--bundle", str(bundle / "bundle"), "--manifest",
                             str(phantom_dir / "manifest.parquet"), "--out", str(out), "--split", "val,test"))
    assert summary["lung_dice"] > 0 and summary["score_mae"] is not None and 0 <= summary["f1"] <= 1
    metrics = json.loads((out / "metrics.json").read_text())
    golden.check("evaluate_summary", summary)
    golden.check("evaluate_metrics", metrics)
    from cxrtune.data import manifest

    df = manifest.load_manifest(str(phantom_dir / "manifest.parquet"))
    assert sum(metrics["status"].values()) == metrics["n_read"] == df["split"].isin(["val", "test"]).sum()
    assert metrics["n_normal"] == ((df["label"] == "normal") & df["split"].isin(["val", "test"])).sum()
    assert {"mae", "rmse", "pearson", "kappa_linear", "kappa_quadratic"} <= set(metrics["score"])
    labelled = df["split"].isin(["val", "test"]) & df["label"].map(manifest.is_labelled)
    assert metrics["classification"]["n"] + metrics["classification"]["n_not_classified"] == labelled.sum()
    assert (out / "score_density.png").stat().st_size > 1000 and (out / "zone_confusion.png").exists()


def test_classification_counts_the_images_it_could_not_classify_as_wrong():
    """Two disease images Stage II never saw (white-out lungs that Stage I missed) do not vanish
    from the figures: beside F1 over the classified images, they count as misses."""
    from cxrtune.scoring.evaluation import _classification

    figures = _classification([0.9, 0.1], [1, 0], [1, 1], 0.5)
    assert figures["f1"] == 1.0 and (figures["n"], figures["n_not_classified"]) == (2, 2)
    assert figures["counting_not_classified"]["recall"] == pytest.approx(1 / 3)
    assert figures["counting_not_classified"]["f1"] == pytest.approx(0.5)
    assert _classification([0.9], [1], [0], 0.5)["counting_not_classified"]["precision"] == 0.5  # a normal: a false alarm
    assert _classification([], [], [], 0.5) is None


@pytest.mark.slow  # trains both stages through the CLI (the module's bundle)
def test_calibrate_under_a_normal_fp_limit_is_held_by_the_bundle_it_makes(bundle, phantom_dir):
    import pandas as pd

    from cxrtune.data import manifest

    m = str(phantom_dir / "manifest.parquet")
    df = manifest.load_manifest(m)
    normals = int(((df["label"] == "normal") & df["split"].isin(["train", "val"])).sum())
    # 0.45: with these 8 Normals not one may score > 0 (upper bound 0.31 at 0 of 8, 0.47 at 1 of 8)
    out = bundle / "fp-limited"
    r = cli_in_process("calibrate", str(bundle / "made"), "--out", str(out), "--manifest", m, "--cls-split",
                       "train,val", "--what", "cls,opacity,zone", "--normal-fp-limit", "0.45", check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    cls = json.loads((out / "bundle.json").read_text())["cls_calibration"]
    assert normals == 8 and cls["n_normal"] == normals  # Stage I finds every phantom's lungs
    assert cls["normal_fp_limit"] == 0.45 and cls["normal_fp_rate"] == 0.0
    assert cls["normal_fp_upper"] == pytest.approx(1 - 0.05 ** (1 / 8))
    assert "FP rate on Normal 0.000 on 8 Normal images" in r.stdout
    # the bundle it made, scored independently by `cxrtune evaluate`, holds it on those rows
    run("evaluate", "--bundle", str(out), "--manifest", m, "--out", str(bundle / "fp-eval"), "--split", "train,val")
    scores = pd.read_csv(bundle / "fp-eval" / "scores.csv")
    normal = scores[scores["label"] == "normal"]
    assert len(normal) == normals and (normal["score"].fillna(0) > 0).sum() == 0
    from cxrtune.model.artifacts import derive_bundle

    derive_bundle(str(out), str(bundle / "fp-moved"), zone_threshold=0.99)  # so that calibrating T moves it
    r = cli_in_process("calibrate", str(bundle / "fp-moved"), "--out", str(bundle / "fp-stale"), "--manifest", m,
                       "--what", "zone", check=False)
    assert r.returncode == 0 and "stored FP rate on Normal was measured at the old opacity cut and T" in r.stderr
    r = cli_in_process("calibrate", str(bundle / "made"), "--out", str(bundle / "fp-refused"), "--manifest", m,
                       "--normal-fp-limit", "0.10", check=False)  # the val split's 2 Normals cannot show 0.10
    assert r.returncode == 2 and "2 Normal image(s) with lungs cannot show an FP rate on Normal <= 0.1" in r.stderr
    assert not (bundle / "fp-refused").exists()


def test_score_masks_cli(tmp_path):
    lung = np.zeros((90, 90), bool)
    lung[10:80, 5:40] = True
    lung[10:80, 50:85] = True
    opacity = np.zeros_like(lung)
    opacity[10:33, 5:40] = True  # upper third of the image-left (patient's right) lung
    images.write_png(str(tmp_path / "l.png"), lung)
    images.write_png(str(tmp_path / "o.png"), opacity)
    rec = json.loads(run("score-masks", "--lung", str(tmp_path / "l.png"), "--opacity", str(tmp_path / "o.png"),
                         "--threshold", "0.5"))
    assert rec["score"] == 1 and rec["zones"]["A"]["affected"]
    golden.check("score_masks_two_lungs", rec, exact=True)
    one = lung.copy()
    one[:, 45:] = False  # the patient's left lung missing
    images.write_png(str(tmp_path / "one.png"), one)
    images.write_png(str(tmp_path / "none.png"), np.zeros_like(lung))
    for name, mask in (("one_lung", "one.png"), ("no_lungs", "none.png")):
        golden.check(f"score_masks_{name}", json.loads(run("score-masks", "--lung", str(tmp_path / mask), "--opacity",
                                                           str(tmp_path / "o.png"), "--threshold", "0.5")), exact=True)


def test_threshold_sweep_picks_min_mae():
    fr = np.array([[0.5, 0.2, 0, 0, 0, 0], [0.9, 0.6, 0.3, 0, 0, 0]])
    ref = np.array([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    best = sweep_threshold(fr, ref)
    assert best["mae"] == 0 and 0.3 < best["threshold"] <= 0.5


def test_clinical_objective_scores_validation_images(phantom_dir, phantom_bundle):
    from cxrtune.data import manifest
    from cxrtune.model.train import TrainConfig, Trainer
    from cxrtune.search.tuning import ClinicalObjective

    df = manifest.load_manifest(str(phantom_dir / "manifest.parquet"))
    trainer = Trainer(TrainConfig.from_dict({"task": "disease", "size": 64,
                                             "model": {"arch": "FPN", "encoder": "resnet18"}}), df)
    objective = ClinicalObjective(str(phantom_bundle), trainer.val_ds.df)
    # every validation row: each is labelled (T_cls) or has a reference (MAE), or both
    assert len(objective.images) == len(trainer.val_ds.df) == len(objective.lungs) == len(objective.refs)
    point = objective(trainer.model, trainer.pre, trainer.cfg.to_dict())
    # by hand at the trial's own point: the bundle's Stage I lungs, the trial's network as Stage II
    # cut at 0.5, each record's |score - reference| over the rows with one, and the worst error the
    # reference allows for a record that is not scored
    from cxrtune.scoring.scorer import StageModel, load_bundle

    trainer.model.eval()
    trial = load_bundle(str(phantom_bundle)).with_thresholds(
        opacity=0.5, cls=point.cls_threshold, zone=point.zone_threshold).with_stage(
        "disease", StageModel(trainer.model, trainer.pre, trainer.cfg.to_dict()))
    records = [r for r, _ in trial.score_images(objective.images, lungs=objective.lungs)]
    errors = [abs(r["score"] - sum(ref)) if r["status"] == "scored" else max(sum(ref), 6 - sum(ref))
              for r, ref in zip(records, objective.refs) if ref is not None]
    assert point.score_mae == pytest.approx(sum(errors) / len(errors)) and point.n == len(errors) > 0


@pytest.mark.slow  # trains both stages through the CLI (the module's bundle)
def test_reader_calibration_and_cross_validated_evaluation(bundle, phantom_dir, tmp_path):
    """Reader grades in the manifest: calibrate T against reader S, then evaluate against both
    readers with T cross-validated (the same set chose it), by label, with the reader-vs-reader row."""

    from cxrtune.data import manifest

    b = tmp_path / "bundle"
    df = manifest.load_manifest(str(phantom_dir / "manifest.parquet"))
    for z in "ABCDEF":
        df[f"reader_S_{z}"] = (df[f"zone_{z}"] * 2).astype("Int64")
        df[f"reader_J_{z}"] = df[f"reader_S_{z}"]
    df.loc[df.index[::3], "reader_J_A"] = 3 - df.loc[df.index[::3], "reader_J_A"].clip(upper=1) * 3  # J flips A
    df["split"] = ""
    m = tmp_path / "readers.parquet"
    manifest.save_manifest(df, str(m))
    out = run("calibrate", str(bundle / "bundle"), "--out", str(b), "--manifest", str(m), "--what", "zone", "--split",
              "all", "--reference", "S")
    meta = json.loads((b / "bundle.json").read_text())
    assert meta["zone_calibration"]["reference"] == "reader:S" and meta["zone_calibration"]["split"] == "all"
    assert "against reader:S" in out and "T_cls" not in out  # --what zone leaves T_cls as it was
    summary = json.loads(run("evaluate", "--bundle", str(b), "--manifest", str(m), "--out", str(tmp_path / "ev"),
                             "--split", "all", "--cv-reference", "S", "--folds", "3", "--by", "label"))
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    golden.check("evaluate_summary_readers", summary)
    golden.check("evaluate_metrics_readers", metrics)
    readers = metrics["readers"]
    assert readers["threshold"] == "cross-validated" and len(readers["cv_thresholds"]) == 3
    graded = df[[f"zone_{z}" for z in "ABCDEF"]].notna().all(axis=1)  # some phantoms carry no zone reference
    assert readers["n"] == graded.sum() < metrics["status"]["scored"] == 24
    assert readers["n_incomplete_grades"] == {"J": 0, "S": 0}  # cross-validated on S: the images S graded
    assert summary["mae_vs_S"] == readers["readers"]["S"]["score"]["mae"]
    lo, hi = readers["readers"]["S"]["score"]["mae_ci"]
    assert lo <= readers["readers"]["S"]["score"]["mae"] <= hi
    flips = ((df["reader_J_A"] > 0) != (df["reader_S_A"] > 0))[graded]
    assert readers["pairs"]["J_vs_S"]["score"]["n"] == graded.sum()
    assert readers["pairs"]["J_vs_S"]["score"]["mae"] == pytest.approx(flips.mean())
    assert set(readers["readers"]["S"]["by"]["label"]) <= {"covid", "normal", "other_pneumonia"}
    assert (tmp_path / "ev" / "score_agreement.png").stat().st_size > 1000
    assert (tmp_path / "ev" / "zone_agreement.png").stat().st_size > 1000
    # per image, what a paired comparison of two bundles reads: the scores behind the figures
    import pandas as pd

    per_image = pd.read_csv(tmp_path / "ev" / "reader_scores.csv")
    assert len(per_image) == readers["n"] and set(per_image["row"]) == set(df.index[graded])
    assert per_image["reader_S"].tolist() == (df.loc[per_image["row"], [f"zone_{z}" for z in "ABCDEF"]] > 0).sum(axis=1).tolist()
    assert (per_image["score"] - per_image["reader_S"]).abs().mean() == pytest.approx(readers["readers"]["S"]["score"]["mae"])
    scores = pd.read_csv(tmp_path / "ev" / "scores.csv")
    counted = scores.dropna(subset=["error"])
    assert (counted["error"] == (counted["score"] - counted["reference_score"]).abs()).all()  # every record scored
    # without the flag, evaluating the very set T was calibrated on is cross-validated all the same
    r = cli_in_process("evaluate", "--bundle", str(b), "--manifest", str(m),
                        "--out", str(tmp_path / "ev2"), "--split", "all", "--folds", "3", check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "cross-validated against reader:S" in r.stderr
    again = json.loads((tmp_path / "ev2" / "metrics.json").read_text())["readers"]
    assert again["threshold"] == "cross-validated" and again["cv_reference"] == "S"
    assert again["n_not_scored"] == 0  # every record scored: counting the others changes nothing
    assert again["mae_counting_not_scored"]["S"] == pytest.approx(again["readers"]["S"]["score"]["mae"])


@pytest.mark.slow  # trains both stages through the CLI (the module's bundle)
def test_evaluate_counts_unscored_records_as_the_worst_error(bundle, phantom_dir, tmp_path):
    """A model that finds no lungs scores nothing: its MAE counts each record as the worst error
    for its reference (score_error), as the sweep objective and the release gate do, instead of
    reporting a perfect MAE over zero images."""


    from cxrtune import storage
    from cxrtune.data import manifest
    from cxrtune.scoring.evaluation import EvaluateOptions, evaluate
    from cxrtune.scoring.scorer import load_bundle, reference_zones

    b = bundle_with_blind_lungs(bundle / "bundle", tmp_path / "blind")  # the lung model sees nothing
    df = manifest.load_manifest(str(phantom_dir / "manifest.parquet"))
    result = evaluate(load_bundle(str(b), device="cpu"), df, str(tmp_path / "ev"),
                      EvaluateOptions(split="val,test", progress=False))
    assert result.status["scored"] == 0 and result.status["unscored"] == result.n_read > 0
    refs = [reference_zones(row, cache=storage.ContentCache()) for _, row in df[df["split"].isin(["val", "test"])].iterrows()]
    worst = [max(sum(r), 6 - sum(r)) for r in refs if r is not None]
    assert result.score is not None and "mae" not in result.score  # no scored record to compare
    assert result.score["n_counted"] == len(worst) > 0
    assert result.score["mae_counting_not_scored"] == pytest.approx(np.mean(worst)) and np.mean(worst) >= 3


def test_lean_stage_payloads_uint8_at_the_smaller_size():
    """Each stage is sent uint8 at the smaller of the image and the network's input, and answers
    uint8 probabilities at the size it was sent (issue 10, item 7), for non-square images too."""
    import torch

    from cxrtune.preprocessing import Preprocessing
    from cxrtune.scoring.scorer import Scorer, StageModel, stage_input

    pre = Preprocessing(size=64, in_channels=1)
    seen = []

    def network(x):  # a stand-in network: records its input, answers logit 0 (p = 0.5) everywhere
        seen.append(tuple(x.shape))
        return torch.zeros(x.shape[0], 1, x.shape[2], x.shape[3])

    scorer = Scorer(StageModel(network, pre, {}), None, device=torch.device("cpu"))
    big = np.random.default_rng(0).random((200, 120), dtype=np.float32)
    small = big[:40, :30]
    x_big, x_small = stage_input(big, pre), stage_input(small, pre)
    assert x_big.dtype == np.uint8 and x_big.shape == (64, 64)  # more pixels than 64 x 64: resized
    assert x_small.dtype == np.uint8 and x_small.shape == (40, 30)  # fewer: sent as it is
    out = scorer.forward("lung", [x_big, x_small])
    assert seen == [(2, 1, 64, 64)]  # the network always sees its own size
    assert [o.shape for o in out] == [(64, 64), (40, 30)] and all(o.dtype == np.uint8 for o in out)
    assert int(out[1].min()) == int(out[1].max()) == 128  # p = 0.5 as uint8


def test_one_bad_input_is_its_own_error_line_and_resume_keeps_refusals(tmp_path, monkeypatch):
    """`cxrtune score` turns every failure of one input into that input's line: a refused file
    (corrupt, or a decoder's own crash) stays refused on --resume, a failed read is tried again, and
    an image that breaks the networks is isolated from its batch."""
    from cxrtune.scoring import batch_scoring
    from cxrtune.scoring.record import ErrorRecord

    good = tmp_path / "good.png"
    images.write_png(str(good), np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1)))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(images.PNG_MAGIC + b"\0" * 40)
    assert not isinstance(batch_scoring.read_scan(str(good)), ErrorRecord)
    refused = batch_scoring.read_scan(str(corrupt))
    assert isinstance(refused, ErrorRecord) and not refused.retriable
    missing = batch_scoring.read_scan(str(tmp_path / "gone.png"))
    assert isinstance(missing, ErrorRecord) and missing.retriable and "not found" in missing.error

    def crashing_decoder(data):
        raise ValueError(f"decoder internals quoting {tmp_path}")
    monkeypatch.setattr(batch_scoring, "load_scan", crashing_decoder)
    crashed = batch_scoring.read_scan(str(good))
    assert crashed == ErrorRecord(error="unreadable image (ValueError)")  # no path, not retriable
    monkeypatch.undo()

    class Scorer:  # scores every scan but the one whose width is 13
        def score_scans(self, scans):
            if any(s.width == 13 for s in scans):
                raise RuntimeError("a network failed")
            return [({"status": "scored", "score": s.width}, None) for s in scans]
    scans = [type("S", (), {"width": w})() for w in (10, 13, 12)]
    outcomes = batch_scoring.score_or_isolate(Scorer(), scans)
    assert outcomes[0][0]["score"] == 10 and outcomes[2][0]["score"] == 12
    assert outcomes[1] == ErrorRecord(error="scoring failed", retriable=True)

    out = tmp_path / "records.jsonl"
    out.write_text("\n".join(json.dumps(line) for line in [
        {"image": "a", "status": "scored", "score": 1},
        {"image": "b", **ErrorRecord(error="corrupt").to_dict()},
        {"image": "c", **ErrorRecord(error="read failed", retriable=True).to_dict()},
        {"image": "d", "status": "error", "error": "written before retriable existed", "score": None},
    ]) + "\n{\"image\": \"e\", \"sta")  # the last line cut by a crash
    kept = [json.loads(line)["image"] for line in batch_scoring.complete_lines(str(out))]
    assert kept == ["a", "b"]



def test_a_folder_yields_dicom_files_by_content_and_an_overlay_that_fails_is_that_images_line(tmp_path, monkeypatch,
                                                                                              caplog):
    """PACS exports name DICOM files `IM000001` or by UID (`1.2.840...1234`): `cxrtune score FOLDER`
    finds them by their preamble, and counts (never names) what is not an image. An overlay that
    cannot be written is that image's retriable error line; the run goes on."""
    from cxrtune import storage
    from cxrtune.scoring import batch_scoring
    from tests.test_dicom import make_dicom

    folder = tmp_path / "export"
    (folder / "series").mkdir(parents=True)
    pixels = (np.tile(np.linspace(0, 1, 64), (64, 1)) * 4095).astype(np.uint16)
    make_dicom(folder / "a.dcm", pixels, BitsStored=12)
    for name in ("IM000001", "series/1.2.840.1234"):
        shutil.copy(folder / "a.dcm", folder / name)
    shutil.copy(folder / "a.dcm", folder / "DICOMDIR")  # the export's index: DICOM, but no image
    (folder / "Doe_Jane.txt").write_text("not an image")
    images.write_png(str(folder / "b.png"), np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1)))
    shutil.copy(folder / "b.png", folder / "thumbnail")  # a PNG without its extension
    with caplog.at_level("WARNING", logger="cxrtune"):
        found = batch_scoring.expand_inputs([str(folder)])
    assert sorted(found) == sorted(str(folder / n) for n in ("IM000001", "a.dcm", "b.png", "series/1.2.840.1234",
                                                             "thumbnail"))
    assert "2 file(s) in a given folder are not PNG, JPEG or DICOM images" in caplog.text
    assert "Doe_Jane" not in caplog.text

    class Scorer:
        batch_size = 2

        def score_scans(self, scans):
            return [({"status": "scored", "score": 1}, type("Detail", (), {"lungs": None, "opacity": None}))
                    for _ in scans]

    monkeypatch.setattr(batch_scoring, "encode_overlay", lambda *args: b"overlay")
    written, overlays = storage.write_bytes, []

    def write_bytes(uri, data):  # the second overlay meets a full disk
        if uri.endswith(".overlay.png"):
            overlays.append(uri)
            if len(overlays) == 2:
                raise OSError(28, "No space left on device")
        return written(uri, data)

    monkeypatch.setattr(storage, "write_bytes", write_bytes)
    inputs = [str(folder / "a.dcm"), str(folder / "b.png")]
    counts = batch_scoring.score_files(Scorer(), inputs, str(tmp_path / "out.jsonl"), overlays=str(tmp_path / "ov"),
                                       progress=False)
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert counts["scored"] == 1 and counts["error"] == 1
    assert [(line["image"], line["status"]) for line in lines] == [(inputs[0], "scored"), (inputs[1], "error")]
    assert lines[1]["retriable"] and lines[1]["error"] == "its overlay could not be written (OSError)"


def test_an_s3_out_whose_last_upload_fails_keeps_the_records_and_says_where(tmp_path, bucket):
    """The bucket of an S3 ``--out`` goes away before the last upload: the run fails with an
    error naming where the scored records are kept, and they are all there."""
    from cxrtune import storage
    from cxrtune.errors import CxrtuneError
    from cxrtune.scoring import batch_scoring

    inputs = []
    for name in ("a.png", "b.png"):
        images.write_png(str(tmp_path / name), np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1)))
        inputs.append(str(tmp_path / name))

    class Scorer:  # the site's administrator removes the bucket while the run scores
        batch_size = 2

        def score_scans(self, scans):
            storage.s3_client().delete_bucket(Bucket=bucket)
            return [({"status": "scored", "score": 1}, None) for _ in scans]

    with pytest.raises(CxrtuneError, match=r"could not be uploaded to s3://.*they are kept in (\S+);") as failed:
        batch_scoring.score_files(Scorer(), inputs, f"s3://{bucket}/out.jsonl", progress=False)
    kept = re.search(r"they are kept in (\S+);", str(failed.value)).group(1)
    assert [json.loads(line)["image"] for line in Path(kept).read_text().splitlines()] == inputs
    shutil.rmtree(Path(kept).parent)
