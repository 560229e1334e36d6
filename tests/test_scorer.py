"""Phantom data end to end: train both stages two epochs, bundle, calibrate, score, evaluate."""

import json
import subprocess
import sys

import numpy as np
import pytest

from cxrtune import images
from cxrtune.scorer import sweep_threshold


def run(*args, cwd=None):
    r = subprocess.run([sys.executable, "-m", "cxrtune.cli", *args], capture_output=True, text=True, cwd=cwd)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.fixture(scope="module")
def bundle(phantom_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    m = str(phantom_dir / "manifest.parquet")
    common = ["--config", "configs/phantom_quick.yaml", "--manifest", m]
    run("train", *common, "--out", str(work / "lung"))
    run("train", *common, "--out", str(work / "disease"), "--set", "task=disease", "dlw_alpha=0.05")
    run("bundle", "--lung", str(work / "lung"), "--disease", str(work / "disease"), "--out", str(work / "bundle"))
    return work


def test_calibrate_stores_threshold(bundle, phantom_dir):
    out = run("calibrate", str(bundle / "bundle"), "--manifest", str(phantom_dir / "manifest.parquet"))
    assert "zone threshold" in out
    meta = json.loads((bundle / "bundle" / "bundle.json").read_text())
    assert meta["calibration"]["split"] == "train,val" and 0 < meta["zone_threshold"] <= 1
    assert meta["calibration"]["n"] > 0 and meta["versions"]["cxrtune"]


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
    good = [x for x in lines if "score" in x]
    assert len(good) == 4
    for rec in good:
        assert 0 <= rec["score"] <= 6 and set(rec["zones"]) == set("ABCDEF")
        assert set(rec["lungs"]) == {"right", "left"} and 0 <= rec["disease_probability"] <= 1
        assert rec["models"]["lung"].startswith("FPN/resnet18")
    assert "broken.png" in [x for x in lines if "error" in x and "score" not in x][0]["image"]
    overlays = sorted((tmp_path / "ov").iterdir())
    assert len(overlays) == 4 and images.decode_raster(overlays[0].read_bytes()).shape[0] >= 512


def test_evaluate_writes_metrics_and_plots(bundle, phantom_dir):
    out = bundle / "eval"
    summary = json.loads(run("evaluate", "--bundle", str(bundle / "bundle"), "--manifest",
                             str(phantom_dir / "manifest.parquet"), "--out", str(out), "--split", "val,test"))
    assert {"lung_dice", "opacity_dice", "f1", "score_mae"} <= set(summary)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"mae", "rmse", "pearson", "kappa_linear", "kappa_quadratic"} <= set(metrics["score"])
    assert (out / "score_density.png").stat().st_size > 1000 and (out / "zone_confusion.png").exists()


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


def test_threshold_sweep_picks_min_mae():
    fr = np.array([[0.5, 0.2, 0, 0, 0, 0], [0.9, 0.6, 0.3, 0, 0, 0]])
    ref = np.array([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    best = sweep_threshold(fr, ref)
    assert best["mae"] == 0 and 0.3 < best["threshold"] <= 0.5


def test_clinical_objective_scores_validation_images(phantom_dir, phantom_bundle):
    from cxrtune import manifest
    from cxrtune.train import Trainer, TrainConfig
    from cxrtune.tuning import ClinicalObjective

    df = manifest.load_manifest(str(phantom_dir / "manifest.parquet"))
    trainer = Trainer(TrainConfig.from_dict({"task": "disease", "size": 64,
                                             "model": {"arch": "FPN", "encoder": "resnet18"}}), df)
    objective = ClinicalObjective(str(phantom_bundle), trainer.val_ds.df)
    assert objective.images and len(objective.lungs) == len(objective.refs)
    mae = objective(trainer.model, trainer.pre, trainer.cfg.to_dict())
    assert 0 <= mae <= 6
