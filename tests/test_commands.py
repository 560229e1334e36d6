"""The library functions behind the CLI's commands, fast and without training: gated bundles with
rollback, gate records through the typed schema, the evaluation mode, calibration results, the
mask record and the thin CLI itself."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from cxrtune import images
from cxrtune.audit.gates import GateFailed, make_gated_bundle, parse_gate, promote_gated, record_gates
from cxrtune.audit.grade_cv import write_cv_report
from cxrtune.audit.hide_and_seek import summary_lines
from cxrtune.config_files import with_overrides
from cxrtune.errors import CxrtuneError
from cxrtune.model.artifacts import (
    Calibration,
    CheckpointMeta,
    RunSummary,
    derive_bundle,
    make_bundle,
    read_bundle_meta,
    read_checkpoint_meta,
    read_run_summary,
    write_checkpoint_meta,
    write_run_summary,
)
from cxrtune.model.grading import CV_SUMMARY, GradeConfig
from cxrtune.scoring.evaluation import (
    CalibrateOptions,
    CalibrationResult,
    EvaluateOptions,
    evaluation_mode,
    manifest_id,
)
from cxrtune.scoring.scorer import score_mask_files
from cxrtune.search.report import grade_cv_inputs
from cxrtune.search.tuning import load_options
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
    with pytest.raises(CxrtuneError, match="immutable"):  # never over a bundle in use
        make_gated_bundle(*runs, str(tmp_path / "b1"), passing)
    assert read_bundle_meta(str(tmp_path / "b1")).name == "one"


def test_an_s3_bundle_upload_cut_short_leaves_the_name_free(runs, bucket, monkeypatch):
    """The second weights file fails to upload: what was written is removed, so the same --out
    can be written again; files without a bundle.json are named as an unfinished upload."""
    from cxrtune import storage

    out, written = f"s3://{bucket}/bundles/v1", storage.write_bytes

    def failing_second(uri, data):
        if uri.endswith("/disease.pt"):
            raise CxrtuneError("S3 said no")
        return written(uri, data)

    monkeypatch.setattr(storage, "write_bytes", failing_second)
    with pytest.raises(CxrtuneError, match="S3 said no"):
        make_bundle(*runs, out)
    assert list(storage.list_keys(out + "/")) == []
    monkeypatch.setattr(storage, "write_bytes", written)
    written(f"{out}/lung.pt", b"left by an upload that was killed")
    with pytest.raises(CxrtuneError, match="no bundle.json: an upload that did not finish"):
        make_bundle(*runs, out)
    storage.delete(f"{out}/lung.pt")
    assert make_bundle(*runs, out).files.keys() == {"lung.pt", "disease.pt"}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_bundles_are_sealed_and_never_changed_in_place(runs, tmp_path, where, request):
    """Every file's SHA-256 in bundle.json, written last; an existing bundle is refused; a derived
    bundle leaves its source as it was; a changed file fails its hash and is never carried on."""
    from cxrtune import storage
    from cxrtune.model.artifacts import bundle_hash, read_bundle_file

    root = f"s3://{request.getfixturevalue('bucket')}/bundles" if where == "s3" else str(tmp_path / "bundles")
    first = make_bundle(*runs, f"{root}/v1")
    assert first.files == {f: hashlib.sha256(storage.read_bytes(f"{root}/v1/{f}")).hexdigest()
                           for f in ("lung.pt", "disease.pt")}
    assert read_bundle_meta(f"{root}/v1").files == first.files and first.format == "cxrtune-bundle/4"
    published = storage.read_bytes(f"{root}/v1/bundle.json")
    with pytest.raises(CxrtuneError, match="immutable"):
        make_bundle(*runs, f"{root}/v1", name="other")
    derived = derive_bundle(f"{root}/v1", f"{root}/v10", zone_threshold=0.3)  # v1's prefix: not v1 itself
    assert storage.read_bytes(f"{root}/v1/bundle.json") == published
    assert (derived.name, derived.zone_threshold, derived.files) == ("v10", 0.3, first.files)
    assert derived.derived_from == {"name": "v1", "bundle_hash": bundle_hash(f"{root}/v1")}
    storage.write_bytes(f"{root}/v10/lung.pt", b"weights planted after publication")
    with pytest.raises(CxrtuneError, match="lung.pt does not match the SHA-256"):
        read_bundle_file(f"{root}/v10", "lung.pt", read_bundle_meta(f"{root}/v10"))
    with pytest.raises(CxrtuneError, match="lung.pt does not match the SHA-256"):
        derive_bundle(f"{root}/v10", f"{root}/v11")
    assert not list(storage.list_keys(f"{root}/v11/"))
    storage.write_bytes(f"{root}/half/lung.pt", b"an upload cut off before its bundle.json")
    with pytest.raises(CxrtuneError, match="bundle.json"):
        read_bundle_meta(f"{root}/half")
    unsealed = {**json.loads(published), "files": {}}  # a /4 bundle.json without its hashes
    storage.write_bytes(f"{root}/unsealed/bundle.json", json.dumps(unsealed).encode())
    with pytest.raises(CxrtuneError, match="must list the SHA-256"):
        read_bundle_meta(f"{root}/unsealed")
    if where == "local":  # staged beside the bundle and renamed whole: nothing else is left there
        assert sorted(p.name for p in (tmp_path / "bundles").iterdir()) == ["half", "unsealed", "v1", "v10"]


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
    uri, source = str(tmp_path / "b-s"), uri
    derive_bundle(source, uri, zone_calibration=Calibration(0.2, "min_mae", "reader:S", manifest=manifest_id(df),
                                                            split="test"))
    options, note = evaluation_mode(uri, df, same)
    assert options.cv_reference == "reader:S" and "cross-validated against reader:S" in note
    assert evaluation_mode(uri, df, EvaluateOptions(split="val")) == (EvaluateOptions(split="val"), None)
    uri = str(tmp_path / "b-masks")
    derive_bundle(source, uri, zone_calibration=Calibration(0.2, "min_mae", "masks", manifest=manifest_id(df),
                                                            split="test"))
    options, note = evaluation_mode(uri, df, same)
    assert options == same and note.startswith("warning:") and "in-sample" in note


def test_calibration_options_and_result():
    with pytest.raises(CxrtuneError, match="choose from cls, opacity, zone and appearance"):
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


def test_promotion_behind_gates_runs_them_first_and_records_them(runs, tmp_path):
    promoted = []

    def promote() -> str:  # what search.report.promote does: a run folder with best/
        promoted.append(True)
        return runs[0]

    with pytest.raises(GateFailed, match="planted"):
        promote_gated([parse_gate(f"hide-and-seek={hide_and_seek_report(tmp_path / 'bad.json', True)}")], promote)
    assert not promoted  # refused before anything was written
    gate = parse_gate(f"hide-and-seek={hide_and_seek_report(tmp_path / 'ok.json', False)}")
    run, results = promote_gated([gate], promote)
    assert run == runs[0] and results[gate.rule]["passed"]
    assert read_checkpoint_meta(f"{run}/best").audits["gates"] == results
    assert promote_gated([], promote) == (runs[0], {})


def test_run_summary_keeps_each_kind_of_run_json(tmp_path):
    trained = RunSummary(config={"task": "lung"}, best={"epoch": 2, "value": 0.5}, epochs=3, history=[], versions={})
    write_run_summary(str(tmp_path / "a"), trained)
    assert set(json.loads((tmp_path / "a" / "run.json").read_text())) == {
        "config", "best", "epochs", "history", "versions", "format"}
    promoted = RunSummary(config={"task": "lung"}, promoted_from="s3://b/exp", trial="t1", metrics={"val_dice": 0.9})
    write_run_summary(str(tmp_path / "b"), promoted)
    assert read_run_summary(str(tmp_path / "b")) == promoted
    assert set(json.loads((tmp_path / "b" / "run.json").read_text())) == {
        "config", "promoted_from", "trial", "metrics", "format"}
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "run.json").write_text(json.dumps({"format": "cxrtune-run/9", "config": {}}))
    with pytest.raises(CxrtuneError, match="newer cxrtune"):
        read_run_summary(str(tmp_path / "c"))
    (tmp_path / "c" / "run.json").write_text(json.dumps({"format": "something-else/1", "config": {}}))
    with pytest.raises(CxrtuneError, match="not a cxrtune run summary"):
        read_run_summary(str(tmp_path / "c"))


def test_command_line_overrides_are_parsed_strictly():
    base = {"lr": 0.1, "model": {"arch": "FPN", "encoder": "resnet18"}}
    out = with_overrides(base, ["model.arch=Unet", "lr=3.0e-4", "flip=true"])
    assert out == {"lr": 3e-4, "model": {"arch": "Unet", "encoder": "resnet18"}, "flip": True}
    assert base["model"]["arch"] == "FPN"  # a new mapping; the settings passed in are kept
    with pytest.raises(CxrtuneError, match="not valid YAML"):
        with_overrides(base, ["lr=[1"])
    with pytest.raises(CxrtuneError, match="expected key=value"):
        with_overrides(base, ["lr"])
    with pytest.raises(CxrtuneError, match="lr is not a mapping"):
        with_overrides(base, ["lr.x=1"])


def test_settings_are_checked_against_their_types_and_1e_4_is_a_number():
    """`--set lr=1e-4` (the --help's own example) is a number although YAML 1.1 reads it as text;
    a value of the wrong type is refused by name before a model is built, not a TypeError in the
    optimizer."""
    from cxrtune.model.train import TrainConfig

    cfg = TrainConfig().with_overrides(["lr=1e-4", "epochs=3.0", "max_minutes=2", "model.encoder=resnet34"])
    assert (cfg.lr, cfg.epochs, cfg.max_minutes, cfg.model.encoder) == (1e-4, 3, 2.0, "resnet34")
    assert isinstance(cfg.lr, float) and isinstance(cfg.epochs, int)
    for pair, message in [("lr=fast", "training setting lr must be a number, got 'fast'"),
                          ("epochs=2.5", "epochs must be a whole number"), ("seed=true", "seed must be a whole number"),
                          ("augment=maybe", "augment must be true or false"), ("model.arch=3", "arch must be text")]:
        with pytest.raises(CxrtuneError, match=message):
            TrainConfig().with_overrides([pair])


def test_experiment_options_are_read_strictly(tmp_path):
    (tmp_path / "cxrtune.json").write_text(json.dumps({"space": {}, "manifest": "m.parquet", "name": "x",
                                                        "surprise": 1}))
    with pytest.raises(CxrtuneError, match="surprise"):
        load_options(str(tmp_path))
    (tmp_path / "cxrtune.json").write_text(json.dumps({"format": "cxrtune-experiment/3"}))
    with pytest.raises(CxrtuneError, match="newer cxrtune"):
        load_options(str(tmp_path))
    (tmp_path / "cxrtune.json").write_text("{")
    with pytest.raises(CxrtuneError, match="not valid JSON"):
        load_options(str(tmp_path))
    # format 1 timed latency (latency_batch): a single-objective experiment reads as it was, a
    # multi-objective one (latency in ms, not GMACs) is refused by name
    from cxrtune.search.tuning import EMBEDDED_SPACE

    old = {"format": "cxrtune-experiment/1", "space": EMBEDDED_SPACE, "manifest": "m.parquet", "name": "x",
           "storage": str(tmp_path), "latency_batch": 8}
    (tmp_path / "cxrtune.json").write_text(json.dumps(old))
    assert load_options(str(tmp_path)).name == "x"
    (tmp_path / "cxrtune.json").write_text(json.dumps({**old, "multi_objective": True, "scheduler": "none"}))
    with pytest.raises(CxrtuneError, match="multi-objective experiment of format 1"):
        load_options(str(tmp_path))


def _cv_result(side: str, rows: dict) -> dict:
    """A :func:`cross_validate` result with small heatmaps, as its report writer reads it."""
    cfg = GradeConfig(side=side).to_dict()
    lung = np.zeros((16, 16), bool)
    lung[4:12, 2:14] = True
    heat = {row: (np.full((16, 16), 90, np.uint8), value * lung.astype(np.float32), lung) for row, value in rows.items()}
    return {"config": cfg, "folds": 2, "images": 4, "per_fold": [],
            "summary": {m: {"mean": 0.5, "sd": 0.1} for m in CV_SUMMARY}, "pooled": {},
            "hcs": {"mean": 1.0, "images": len(rows)}, "subgroups": {},
            "oof": pd.DataFrame({"row": [0, 1], "fold": [0, 1], "grade": [1, 2], "pred": [1, 1]}), "heatmaps": heat}


def test_grade_cv_report_writes_oof_heatmaps_and_both_sides(tmp_path):
    results = [_cv_result("right", {3: 1.0, 5: 0.5}), _cv_result("left", {5: 1.0, 7: 1.0})]
    report = write_cv_report(results, str(tmp_path))
    assert "oof" in results[0] and "heatmaps" in results[0]  # the results passed in are not modified
    assert pd.read_csv(tmp_path / "oof_2.csv")["pred"].tolist() == [1, 1]
    names = sorted(p.name for p in (tmp_path / "heatmaps").iterdir())
    assert names == ["recipe1_right_row3.png", "recipe1_right_row5.png", "recipe2_left_row5.png",
                     "recipe2_left_row7.png", "recipes1+2_both_row5.png"]  # both sides: the rows both drew
    assert report.both_sides == [{"right": 1, "left": 2, "images": 1, "hcs": pytest.approx(1.0)}]
    cv = json.loads((tmp_path / "cv.json").read_text())
    assert [r["config"]["side"] for r in cv["recipes"]] == ["right", "left"] and "oof" not in cv["recipes"][0]
    assert cv["both_sides"] == [{"right": 1, "left": 2, "images": 1, "hcs": pytest.approx(1.0)}]
    md = (tmp_path / "cv.md").read_text()
    assert md == report.markdown and "recipes 1 (right) + 2 (left): HCS 1.000 on 1 images" in md
    rows = [line for line in md.splitlines() if line.startswith(("| right |", "| left |"))]
    assert len(rows) == 2 and all(row.count("0.500 +- 0.100") == 5 for row in rows)  # a row per recipe


def test_grade_cv_takes_recipe_files_with_a_manifest_or_a_sweep(tmp_path, phantom_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("side: left\nroi: split\n")
    with pytest.raises(CxrtuneError, match="--config needs --manifest"):
        grade_cv_inputs(None, 5, [str(recipe)])
    with pytest.raises(CxrtuneError, match="--experiment"):
        grade_cv_inputs(None, 5)
    recipes, df = grade_cv_inputs(None, 5, [str(recipe)], str(phantom_dir / "manifest.parquet"))
    assert [(r.side, r.roi) for r in recipes] == [("left", "split")] and len(df) == 24


def test_hide_and_seek_summary_is_a_table_and_the_verdict():
    report = {"classes": ["covid", "normal"], "verdict": {"flagged": True, "reason": "lungs removed: 0.90"},
              "representations": {"original": {"accuracy": 0.91, "hcs": 0.8, "sensitivity": {"covid": 0.9, "normal": 0.5},
                                               "ppv": {"covid": 0.7, "normal": 0.25}},
                                  "lungs_removed": {"accuracy": 0.9, "sensitivity": {"covid": 1.0, "normal": 0.0},
                                                    "ppv": {"covid": 0.5, "normal": 0.0}}}}
    lines = summary_lines(report)
    assert lines[0].split() == ["representation", "accuracy", "HCS", "sensitivity", "/", "PPV", "per", "class"]
    assert lines[1].split() == ["original", "0.910", "0.80", "covid", "0.90/0.70,", "normal", "0.50/0.25"]
    assert lines[2].split()[:3] == ["lungs_removed", "0.900", "nan"]
    assert lines[-1] == "FLAGGED: lungs removed: 0.90"
