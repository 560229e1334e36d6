"""The library functions behind the CLI's commands, fast and without training: gated bundles with
rollback, gate records through the typed schema, the evaluation mode, calibration results, the
mask record and the thin CLI itself."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from cxrtune import images
from cxrtune.audit.gates import GateFailed, make_gated_bundle, parse_gate, record_gates
from cxrtune.errors import CxrtuneError
from cxrtune.model.artifacts import (
    Calibration,
    CheckpointMeta,
    make_bundle,
    read_bundle_meta,
    read_checkpoint_meta,
    update_bundle,
    write_checkpoint_meta,
)
from cxrtune.scoring.evaluation import (
    CalibrateOptions,
    CalibrationResult,
    EvaluateOptions,
    evaluation_mode,
    manifest_id,
)
from cxrtune.scoring.scorer import score_mask_files
from tests.conftest import ROOT


def fake_run(path, task: str) -> str:
    """A run folder as `cxrtune train` leaves it, with placeholder weights: enough for bundling."""
    best = path / "best"
    best.mkdir(parents=True)
    (best / "model.pt").write_bytes(b"weights of " + task.encode())
    write_checkpoint_meta(str(best), CheckpointMeta(config={"task": task, "model": {"arch": "FPN"}}, preprocessing={}))
    return str(path)


def hide_and_seek_report(path, flagged: bool) -> str:
    path.write_text(json.dumps({"verdict": {"flagged": flagged, "reason": "planted"},
                                "representations": {"lungs_removed": {"accuracy": 0.9 if flagged else 0.3}}}))
    return str(path)


@pytest.fixture
def runs(tmp_path):
    return fake_run(tmp_path / "lung", "lung"), fake_run(tmp_path / "disease", "disease")


def test_gated_bundle_is_recorded_or_rolled_back(runs, tmp_path):
    passing = [parse_gate(f"hide-and-seek={hide_and_seek_report(tmp_path / 'ok.json', False)}")]
    meta = make_gated_bundle(*runs, str(tmp_path / "b1"), passing, name="one")
    assert list(meta.audits["gates"]) == [passing[0].rule] and meta.audits["gates"][passing[0].rule]["passed"]
    assert read_bundle_meta(str(tmp_path / "b1")).audits == meta.audits  # stored, not only returned

    flagged = [parse_gate(f"hide-and-seek={hide_and_seek_report(tmp_path / 'bad.json', True)}")]
    with pytest.raises(GateFailed, match="planted"):
        make_gated_bundle(*runs, str(tmp_path / "b2"), flagged)
    assert not any((tmp_path / "b2" / n).exists() for n in ("bundle.json", "lung.pt", "disease.pt"))
    with pytest.raises(CxrtuneError, match="holds a bundle already"):  # never over a bundle in use
        make_gated_bundle(*runs, str(tmp_path / "b1"), passing)
    assert read_bundle_meta(str(tmp_path / "b1")).name == "one"


def test_gate_results_go_through_the_checkpoint_schema(runs, tmp_path):
    best = f"{runs[0]}/best"
    record_gates(best, {"hide-and-seek=r.json": {"passed": True}})
    meta = read_checkpoint_meta(best)
    assert meta.audits == {"gates": {"hide-and-seek=r.json": {"passed": True}}} and meta.task == "lung"
    assert json.loads((tmp_path / "lung" / "best" / "meta.json").read_text())["format"] == meta.format


def test_evaluation_mode_cross_validates_only_a_reader_calibrated_on_the_same_rows(runs, tmp_path):
    uri = str(tmp_path / "b")
    make_bundle(*runs, uri)
    df = pd.DataFrame({"image": ["a.png"], "split": ["test"]})
    same = EvaluateOptions(split="test")
    assert evaluation_mode(uri, df, same) == (same, None)  # never calibrated: as asked
    update_bundle(uri, zone_calibration=Calibration(0.2, "min_mae", "reader:S", manifest=manifest_id(df), split="test"))
    options, note = evaluation_mode(uri, df, same)
    assert options.cv_reference == "reader:S" and "cross-validated against reader:S" in note
    assert evaluation_mode(uri, df, EvaluateOptions(split="val")) == (EvaluateOptions(split="val"), None)
    update_bundle(uri, zone_calibration=Calibration(0.2, "min_mae", "masks", manifest=manifest_id(df), split="test"))
    options, note = evaluation_mode(uri, df, same)
    assert options == same and note.startswith("warning:") and "in-sample" in note


def test_calibration_options_and_result():
    with pytest.raises(CxrtuneError, match="choose from cls, opacity and zone"):
        CalibrateOptions(what=("cls", "t"))
    zone = Calibration(0.15, "min_mae", "zones")
    result = CalibrationResult(zone=zone)
    assert result.bundle_changes() == {"zone_threshold": 0.15, "zone_calibration": zone}


def test_score_masks_record_is_the_scoring_policys(tmp_path):
    """A lung not found is never scored as clear; no lungs is unscored, never a healthy 0."""
    lung = np.zeros((90, 90), bool)
    lung[10:80, 5:40] = lung[10:80, 50:85] = True
    opacity = np.zeros_like(lung)
    opacity[10:33, 5:40] = True
    one = lung.copy()
    one[:, 45:] = False
    for name, mask in (("both", lung), ("one", one), ("none", np.zeros_like(lung)), ("o", opacity)):
        images.write_png(str(tmp_path / f"{name}.png"), mask)
    both = score_mask_files(str(tmp_path / "both.png"), str(tmp_path / "o.png"), 0.5)
    assert (both["status"], both["score"], both["zones"]["A"]["affected"]) == ("scored", 1, True)
    partial = score_mask_files(str(tmp_path / "one.png"), str(tmp_path / "o.png"), 0.5)
    assert partial["status"] == "partial" and partial["score"] is None and partial["lungs"]["left"] is None
    assert all(partial["zones"][z] == {"affected": None, "opacity_fraction": None} for z in "DEF")
    none = score_mask_files(str(tmp_path / "none.png"), str(tmp_path / "o.png"), 0.5)
    assert (none["status"], none["score"], none["zones"]) == ("unscored", None, None)
    images.write_png(str(tmp_path / "small.png"), np.zeros((10, 10), bool))
    with pytest.raises(CxrtuneError, match="does not match the lung mask's 90x90"):
        score_mask_files(str(tmp_path / "both.png"), str(tmp_path / "small.png"), 0.5)


def test_cli_handlers_stay_thin():
    """Every command handler is a few lines over one library call: McCabe complexity 5 at most."""
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "C901", "--config",
                        "lint.mccabe.max-complexity = 5", str(ROOT / "cxrtune" / "cli.py")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
