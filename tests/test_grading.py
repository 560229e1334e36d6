"""Per-lung ordinal grading (seed 000) as a search task: the shipped space's 27-combination grid
per side, a real grid sweep on Ray Tune with the compact table, and patient-level K-fold
cross-validation with subgroup tables, on phantoms."""

import itertools
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from cxrtune.errors import CxrtuneError
from cxrtune.search.search_space import load_space, parse_space
from tests import golden
from tests.conftest import ROOT, cli, cli_in_process


def test_shipped_space_grid_is_seed_000s_27_combinations_per_side():
    space = load_space(str(ROOT / "search_spaces" / "opacity_classification.yaml"))
    assert (space.task, space.metric, space.mode) == ("grade", "val_macro_mae", "min")
    grid = space.grid()
    axes = {name: spec["grid_search"] for name, spec in grid.items()}
    assert axes["backbone"] == ["resnet50", "vgg16", "densenet121"]
    assert axes["roi"] == ["none", "lung_masked", "split"]
    assert axes["balancing"] == ["undersample", "oversample", "double"]
    combos = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    per_side = pd.Series([c["side"] for c in combos]).value_counts().to_dict()
    assert per_side == {"right": 27, "left": 27}
    configs = [space.train_config(c) for c in combos]  # every combination is a valid recipe
    assert len({(c.side, c.classifier.backbone, c.roi, c.balancing) for c in configs}) == 54
    assert {c.classifier.num_classes for c in configs} == {4} and configs[0].size == 224


def test_grade_space_errors_name_the_key():
    base = {"task": "grade", "parameters": {"roi": {"type": "choice", "values": ["none", "split"]}}}
    assert parse_space(base).objective == "macro_mae"
    with pytest.raises(CxrtuneError, match="'dice' is not an objective of task grade"):
        parse_space({**base, "objective": "dice"})
    with pytest.raises(CxrtuneError, match=r"fixed\.classifier\.arch: unknown classifier setting"):
        parse_space({**base, "fixed": {"classifier": {"arch": "Unet"}}})
    with pytest.raises(CxrtuneError, match=r"parameters\.roi\.values: unknown value\(s\) \['lungs'\]"):
        parse_space({"task": "grade", "parameters": {"roi": {"type": "choice", "values": ["lungs"]}}})
    numeric = parse_space({"task": "grade", "parameters": {"lr": {"type": "log-float", "low": 1e-4, "high": 1e-2}}})
    with pytest.raises(CxrtuneError, match=r"parameters\.lr: grid mode crosses plain choice parameters only"):
        numeric.grid()
    with pytest.raises(CxrtuneError, match="'macro_mae' is not an objective of task lung"):
        parse_space({"task": "lung", "objective": "macro_mae",
                     "parameters": {"lr": {"type": "float", "low": 0.1, "high": 0.2}}})


def test_grid_table_is_the_papers_layout():
    from cxrtune.model.grading import grid_table

    rows = []
    for side, backbone, roi, bal in itertools.product(["right", "left"], ["resnet50", "vgg16"], ["none", "split"],
                                                      ["undersample", "double"]):
        mae = {"right": 0.5, "left": 0.7}[side] + 0.1 * (backbone == "vgg16") + 0.01 * (roi == "split") \
            + 0.001 * (bal == "double")
        rows.append({"param:side": side, "param:backbone": backbone, "param:roi": roi, "param:balancing": bal,
                     "best_val_macro_mae": mae, "val_weighted_f1@best": 1 - mae})
    md = grid_table(pd.DataFrame(rows))
    right, left = md.split("**left lung**")
    assert "| backbone | ROI | undersample | double |" in right
    assert "| resnet50 | none | **0.500 (0.500)** | 0.501 (0.499) |" in right  # the side's best in bold
    assert "| vgg16 | split | 0.610 (0.390) | 0.611 (0.389) |" in right
    assert "| resnet50 | none | **0.700 (0.300)** | 0.701 (0.299) |" in left
    assert md.count("| vgg16 |") == 4


def test_patient_folds_and_subgroup_table():
    from cxrtune.data.splits import patient_folds
    from cxrtune.model.grading import subgroup_table

    rows = pd.DataFrame({"patient_id": [f"p{i // 2}" for i in range(40)],
                         "sex": ["F", "M"] * 10 + [""] * 20})
    grades = np.array([i % 4 for i in range(40)])
    fold = patient_folds(rows, grades, 4, seed=0)
    assert set(fold) == {0, 1, 2, 3}
    assert rows.assign(fold=fold).groupby("patient_id")["fold"].nunique().max() == 1  # no patient in two folds
    prob = np.eye(4)[grades]
    prob[:10] = np.eye(4)[np.minimum(grades[:10] + 1, 3)]  # the first ten (sex F/M) are off by one or right
    table = {t["value"]: t for t in subgroup_table(rows, grades, prob, "sex")}
    assert {k: t["n"] for k, t in table.items()} == {"(missing)": 20, "F": 10, "M": 10}
    assert table["(missing)"]["macro_mae"] == 0.0 and table["(missing)"]["weighted_f1"] == 1.0
    # F rows 0,2,4,6,8 have grades 0,2,0,2,0 -> predicted 1,3,1,3,1 (all off by one); rows 10-18 right
    assert table["F"]["mae"] == pytest.approx(5 / 10)
    ages = rows.assign(age=pd.array([60] * 20 + [None] * 20, dtype="Int64"))  # nullable integers, NA included
    assert {t["value"]: t["n"] for t in subgroup_table(ages, grades, prob, "age")} == {"60": 20, "(missing)": 20}
    with pytest.raises(CxrtuneError, match="no manifest column 'site'"):
        subgroup_table(rows, grades, prob, "site")
    with pytest.raises(CxrtuneError, match="needs at least 2 folds"):
        patient_folds(rows, grades, 1, seed=0)
    with pytest.raises(CxrtuneError, match="needs at least 5 patients"):
        patient_folds(rows.head(8), grades[:8], 5, seed=0)


def test_side_heatmaps_in_the_image_frame_and_averaged():
    from cxrtune.audit.grade_cv import heatmap_in_image, paired_heatmaps

    lung = np.zeros((60, 100), bool)
    lung[10:50, 10:40] = True  # patient's right lung, image left
    lung[10:50, 60:90] = True  # midline at column 50
    ones = np.ones((32, 32), np.float32)
    right = heatmap_in_image(ones, lung.shape, lung, "right", "split")
    left = heatmap_in_image(ones, lung.shape, lung, "left", "split")
    assert right[:, :50].min() == 1 and right[:, 50:].max() == 0 and left[:, 50:].min() == 1 and left[:, :50].max() == 0
    assert heatmap_in_image(ones, lung.shape, None, "left", "none").shape == (60, 100)
    image = np.zeros((60, 100), np.uint8)
    both = paired_heatmaps({"heatmaps": {7: (image, right, lung), 9: (image, right, lung)}},
                           {"heatmaps": {7: (image, left, lung)}})
    assert list(both) == [7] and np.allclose(both[7][1], 0.5)  # each half from its own side's model
    assert both[7][3] == pytest.approx(lung.mean())  # uniform heat: HCS is the lungs' share


def test_binary_collapse_without_positives_is_undefined_not_zero():
    from cxrtune.model.metrics import ordinal_metrics

    m = ordinal_metrics(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]))
    assert np.isnan(m["collapses"]["not_severe_vs_severe"]["f1"])  # no grade 3 in references or predictions
    assert m["collapses"]["none_vs_any"]["f1"] == 1.0
    assert m["macro_mae"] == pytest.approx((0 + 0.5 + 0) / 3)


def test_fit_classifier_reports_every_epoch_of_both_phases():
    from cxrtune.model.classifiers import ClassifierConfig
    from cxrtune.model.classify import ClassifyConfig, fit_classifier

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 255, (12, 32, 32), dtype=np.uint8), np.arange(12) % 2
    seen = []
    cfg = ClassifyConfig(ClassifierConfig("resnet18", num_classes=2), size=32, batch_size=6, epochs=3,
                         balancing="double")
    fit_classifier(cfg, x, y, on_epoch=lambda n, model: seen.append((n, model.training)))
    assert [n for n, _ in seen] == [1, 2, 3] and cfg.total_epochs == 3


def test_roi_from_stage_one_of_a_bundle(phantom_dir, phantom_bundle):
    """lung_bundle: the ROI lungs are the bundle's cleaned Stage I masks (what the ROI is in use),
    not the manifest's reference masks."""
    from cxrtune.data import manifest
    from cxrtune.images import read_image, read_mask
    from cxrtune.model.grading import grade_labels, grading_input, load_grade_data
    from cxrtune.preprocessing import to_uint8
    from cxrtune.scoring.scorer import load_bundle, stage_one_lungs

    df = manifest.load_manifest(str(phantom_dir / "manifest.parquet"))
    graded = grade_labels(df.head(6), read_mask)
    stage1 = load_grade_data(graded, "right", "lung_masked", 64, find_lungs=stage_one_lungs(str(phantom_bundle)))
    reference = load_grade_data(graded, "right", "lung_masked", 64)
    scorer = load_bundle(str(phantom_bundle), stages=("lung",))
    for k, (_, row) in enumerate(stage1.rows.iterrows()):
        image = read_image(row["image"])
        expected = to_uint8(grading_input(image, scorer.lung_masks([image])[0], "right", "lung_masked", 64))
        assert np.array_equal(stage1.images[k], expected)
    assert not np.array_equal(stage1.images, reference.images)  # a 2-epoch Stage I is not the reference


def test_two_phase_transfer_from_a_weights_file(tmp_path):
    """Phase 1 trains the head alone on a frozen encoder (batch-norm statistics too), phase 2
    everything; every epoch of both is reported."""
    import torch

    from cxrtune.model.classifiers import ClassifierConfig, build_classifier
    from cxrtune.model.classify import ClassifyConfig, fit_classifier

    source = build_classifier(ClassifierConfig("resnet18", num_classes=2))
    torch.save(source.encoder.state_dict(), tmp_path / "encoder.pt")
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 255, (12, 32, 32), dtype=np.uint8), np.arange(12) % 2
    cfg = ClassifyConfig(ClassifierConfig("resnet18", num_classes=2, weights=str(tmp_path / "encoder.pt")),
                         size=32, batch_size=6, epochs=2, head_epochs=2, balancing="none", augment=False)
    start = {k: v.clone() for k, v in source.encoder.state_dict().items()}
    snapshots = []

    def on_epoch(n, model):
        enc = model.encoder.state_dict()
        snapshots.append((n, all(torch.equal(enc[k], start[k]) for k in start)))

    model = fit_classifier(cfg, x, y, on_epoch=on_epoch)
    assert cfg.total_epochs == 4 and [n for n, _ in snapshots] == [1, 2, 3, 4]
    assert [same for _, same in snapshots] == [True, True, False, False]  # frozen, frozen, then fine-tuned
    assert all(p.requires_grad for p in model.parameters())


GRID_SPACE = {
    "task": "grade", "objective": "macro_mae",
    "fixed": {"size": 48, "batch_size": 8, "epochs": 3, "lr": 3e-3, "classifier": {"in_channels": 1}},
    "parameters": {"side": {"type": "choice", "values": ["right"]},
                   "backbone": {"type": "choice", "values": ["resnet18"]},
                   "roi": {"type": "choice", "values": ["none", "lung_masked", "split"]},
                   "balancing": {"type": "choice", "values": ["undersample", "oversample"]}},
}


@pytest.fixture(scope="module")
def grading_phantoms(tmp_path_factory):
    from cxrtune.data.phantom import write_phantoms

    out = tmp_path_factory.mktemp("grading")
    write_phantoms(out, 48, size=64, seed=3)
    return out


@pytest.mark.slow
def test_grid_sweep_compact_table_and_cross_validation(grading_phantoms, tmp_path):
    space = tmp_path / "grade.yaml"
    space.write_text(yaml.safe_dump(GRID_SPACE))
    manifest = str(grading_phantoms / "manifest.parquet")
    r = cli("tune", "--space", str(space), "--manifest", manifest, "--grid", "--num-cpus", "2",
            "--cpus-per-trial", "1", "--name", "grid", "--storage", str(tmp_path / "results"))
    summary = json.loads(r.stdout[r.stdout.index("{\n"):])
    assert (summary["trials"], summary["errored"], summary["metric"]) == (6, 0, "val_macro_mae")
    exp = str(tmp_path / "results" / "grid")
    cli_in_process("report", exp, "--out", str(tmp_path / "report"))
    trials = pd.read_csv(tmp_path / "report" / "trials.csv")
    assert len(trials) == 6 and (trials["epochs"] == 3).all()  # every combination trained to the end
    assert sorted(zip(trials["param:roi"], trials["param:balancing"])) == sorted(
        itertools.product(["none", "lung_masked", "split"], ["undersample", "oversample"]))
    md = (tmp_path / "report" / "grid.md").read_text()
    for _, t in trials.iterrows():  # each cell is that trial's best macro MAE and its weighted F1 there
        cell = f"{t['best_val_macro_mae']:.3f} ({t['val_weighted_f1@best']:.3f})"
        row = next(line for line in md.splitlines() if line.startswith(f"| resnet18 | {t['param:roi']} |"))
        assert cell in row.split(" | ")[2 + ["undersample", "oversample"].index(t["param:balancing"])]

    r = cli_in_process("promote", exp, "--to", str(tmp_path / "run"), check=False)
    assert r.returncode == 2 and "cxrtune grade cv --experiment" in r.stderr

    cli_in_process("grade", "cv", "--experiment", exp, "--top", "2", "--folds", "3", "--by", "label", "--heatmaps", "4",
        "--out", str(tmp_path / "cv"))
    results = json.loads((tmp_path / "cv" / "cv.json").read_text())["recipes"]
    golden.check("grade_cv_json", json.loads((tmp_path / "cv" / "cv.json").read_text()))
    golden.check("grade_cv_oof_columns", sorted(pd.read_csv(tmp_path / "cv" / "oof_1.csv").columns), exact=True)
    assert all(r["hcs"]["images"] == 4 and 0 <= r["hcs"]["mean"] <= 1 for r in results)
    assert len(list((tmp_path / "cv" / "heatmaps").glob("recipe1_right_row*.png"))) == 4
    mae = {(t["param:roi"], t["param:balancing"]): t["best_val_macro_mae"] for _, t in trials.iterrows()}
    chosen = [mae[(x["config"]["roi"], x["config"]["balancing"])] for x in results]
    assert len(results) == 2 and chosen == sorted(trials["best_val_macro_mae"])[:2]  # the top two, best first
    from cxrtune.model.metrics import ordinal_metrics

    for i, res in enumerate(results, 1):
        oof = pd.read_csv(tmp_path / "cv" / f"oof_{i}.csv")
        assert oof.groupby("patient_id")["fold"].nunique().max() == 1 and set(oof["fold"]) == {0, 1, 2}
        assert res["pooled"]["macro_mae"] == pytest.approx(ordinal_metrics(oof["grade"], oof["pred"])["macro_mae"])
        folds = [f["macro_mae"] for f in res["per_fold"]]
        assert res["summary"]["macro_mae"]["mean"] == pytest.approx(np.mean(folds))
        by_label = {t["value"]: t["n"] for t in res["subgroups"]["label"]}
        # other_pneumonia phantoms have no opacity mask, so no grade; test rows stay out of CV
        assert "other_pneumonia" not in by_label and sum(by_label.values()) == len(oof) == res["images"]
    assert "| right | resnet18 |" in (tmp_path / "cv" / "cv.md").read_text()

    # one recipe for each side: their heatmaps of the same images are averaged (seed 000)
    for side in ("right", "left"):
        (tmp_path / f"{side}.yaml").write_text(yaml.safe_dump(
            {"side": side, "roi": "split", "size": 32, "epochs": 1, "batch_size": 8, "balancing": "none",
             "classifier": {"backbone": "resnet18"}}))
    cli_in_process("grade", "cv", "--config", str(tmp_path / "right.yaml"), str(tmp_path / "left.yaml"), "--manifest", manifest,
        "--folds", "2", "--heatmaps", "3", "--out", str(tmp_path / "both"))
    both = json.loads((tmp_path / "both" / "cv.json").read_text())["both_sides"]
    assert len(both) == 1 and both[0]["images"] >= 1 and 0 <= both[0]["hcs"] <= 1
    assert len(list((tmp_path / "both" / "heatmaps").glob("recipes1+2_both_row*.png"))) == both[0]["images"]


def test_rows_grading_cannot_use_are_left_out_by_row_never_by_path(tmp_path, caplog):
    """An image that cannot be read (its path names a patient) and a lung mask of another size (it
    cropped the wrong columns, or broke the trial) are left out; the log names rows by their label."""
    from cxrtune import images
    from cxrtune.model.grading import load_grade_data

    image = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (128, 1))
    lung = np.zeros((128, 64), np.float32)
    lung[20:100, 5:28] = lung[20:100, 36:60] = 1
    images.write_png(str(tmp_path / "a.png"), image)
    images.write_png(str(tmp_path / "lung.png"), lung)
    images.write_png(str(tmp_path / "small-lung.png"), lung[::2, ::2])
    rows = pd.DataFrame({"image": [str(tmp_path / "Doe_Jane_MRN123.png"), str(tmp_path / "a.png"), str(tmp_path / "a.png")],
                         "lung_mask": [str(tmp_path / "lung.png"), str(tmp_path / "small-lung.png"),
                                       str(tmp_path / "lung.png")], "grade_right": [1, 2, 3]})
    with caplog.at_level("WARNING", logger="cxrtune"):
        data = load_grade_data(rows, "right", "split", 32)
    assert data.grades.tolist() == [3]
    assert "2 row(s) left out, e.g. row 0: unreadable" in caplog.text and "Doe_Jane" not in caplog.text
    with pytest.raises(CxrtuneError, match="no row could be prepared"):
        load_grade_data(rows.iloc[[1]], "right", "split", 32)
    assert "row 1: lung mask 32x64 on a 64x128 image" in caplog.text  # the manifest's row, as grade_labels names it


def test_grade_cv_over_rows_with_grades_and_no_lung_masks_draws_no_heatmap(tmp_path):
    """ROI none needs no lung mask, and rows graded in the manifest need none for their grades: the
    cross-validation runs; its heatmaps, which are judged against the lungs, are drawn only where
    a row's mask can be read and fits its image."""
    from cxrtune import images
    from cxrtune.audit.grade_cv import cross_validate
    from cxrtune.model.classifiers import ClassifierConfig
    from cxrtune.model.grading import GradeConfig

    rng = np.random.default_rng(0)
    for i in range(8):
        images.write_png(str(tmp_path / f"{i}.png"), rng.random((48, 48), dtype=np.float32))
    df = pd.DataFrame({"image": [str(tmp_path / f"{i}.png") for i in range(8)], "patient_id": [f"p{i}" for i in range(8)],
                       "grade_right": [0, 1, 2, 3] * 2, "grade_left": [0] * 8, "label": ["covid"] * 8})
    cfg = GradeConfig(classifier=ClassifierConfig("resnet18", num_classes=4), side="right", roi="none", size=32,
                      epochs=1, head_epochs=0, batch_size=4, balancing="none", augment=False)
    result = cross_validate(cfg, df, folds=2, heatmap_images=4)
    assert result["images"] == 8 and result["heatmaps"] == {} and result["hcs"] == {"mean": None, "images": 0}
    lung = np.zeros((48, 48), np.float32)
    lung[8:40, 4:20] = lung[8:40, 28:44] = 1
    images.write_png(str(tmp_path / "lung.png"), lung)
    images.write_png(str(tmp_path / "small.png"), lung[::2, ::2])
    masks = [""] * 4 + [str(tmp_path / "Doe_Jane.png")] * 2 + [str(tmp_path / "small.png"), str(tmp_path / "lung.png")]
    result = cross_validate(cfg, df.assign(lung_mask=masks), folds=2, heatmap_images=8)
    assert list(result["heatmaps"]) == [7] and result["hcs"]["images"] == 1  # missing, too small: left out
