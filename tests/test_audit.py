"""The audit track on phantoms: seed 001's representations, HCS, and hide-and-seek catching a
planted shortcut (a label-revealing marker outside the lungs) without a false alarm on clean data."""

import json

import numpy as np
import pytest

from cxrtune.audit.heatmaps import concordance
from cxrtune.audit.representations import REPRESENTATIONS, represent
from cxrtune.data.phantom import make_phantom


def test_the_five_representations():
    ph = make_phantom(128, "covid", seed=3)
    image, lung = ph.image, ph.lung
    ys, xs = np.nonzero(lung)
    box = np.zeros_like(lung)
    box[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
    out = {name: represent(image, lung, name) for name in REPRESENTATIONS}
    assert np.array_equal(out["original"], image)
    assert np.array_equal(out["lungs_isolated"][lung], image[lung]) and not out["lungs_isolated"][~lung].any()
    assert not out["lungs_removed"][lung].any() and np.array_equal(out["lungs_removed"][~lung], image[~lung])
    assert np.array_equal(out["lungs_framed"][box], image[box]) and not out["lungs_framed"][~box].any()
    assert not out["lungs_boxed_out"][box].any() and np.array_equal(out["lungs_boxed_out"][~box], image[~box])
    with pytest.raises(ValueError, match="unknown representation"):
        represent(image, lung, "lungs_blurred")
    import pandas as pd

    from cxrtune.audit.hide_and_seek import hide_and_seek
    from cxrtune.errors import CxrtuneError
    from cxrtune.model.classify import ClassifyConfig

    with pytest.raises(CxrtuneError, match="unknown representation 'lungs_blured'"):  # before any data is read
        hide_and_seek(ClassifyConfig(), pd.DataFrame(), ("original", "lungs_removed", "lungs_blured"))


def test_heatmap_concordance_score():
    lung = np.zeros((10, 10), bool)
    lung[2:8, 1:5] = True
    inside = np.where(lung, 0.5, 0.0)
    assert concordance(inside, lung) == {"hcs": 1.0, "hcs_pixels": 1.0, "hcs_chance": 0.24}
    outside = np.zeros((10, 10))
    outside[0, 9] = 1.0
    assert concordance(outside, lung) == {"hcs": 0.0, "hcs_pixels": 0.0, "hcs_chance": 0.24}
    assert concordance(np.ones((10, 10)), lung)["hcs"] == pytest.approx(0.24)  # a heatmap that looks everywhere
    half = inside.copy()
    half[9, 5:9] = 3.0  # 12 units of heat outside against 12 inside; 4 pixels against 24
    assert concordance(half, lung)["hcs"] == pytest.approx(0.5)
    assert concordance(half, lung)["hcs_pixels"] == pytest.approx(24 / 28)


@pytest.mark.parametrize("backbone,layer", [("resnet50", "layer3"), ("vgg16", "features.28"),
                                            ("densenet121", "features.denseblock3")])
def test_grad_cam_layer_is_the_stride_16_stage_of_each_backbone(backbone, layer):
    """Seed 000's three backbones: SMP names ResNet's stages; VGG's and DenseNet's are found by a
    probe pass (VGG's get_stages raises)."""
    import torch

    from cxrtune.audit.heatmaps import CamModel, heatmaps, target_layer
    from cxrtune.model.classifiers import ClassifierConfig, build_classifier

    model = build_classifier(ClassifierConfig(backbone, num_classes=4))
    x = torch.rand(2, 1, 64, 64)
    cam = CamModel(model)
    names = {m: n for n, m in cam.encoder.named_modules()}
    assert names[target_layer(cam, 16, x)] == layer
    heat, prob = heatmaps(model, x)
    assert heat.shape == (2, 64, 64) and 0 <= heat.min() and heat.max() <= 1 + 1e-6 and prob.shape == (2, 4)


def _marked_phantoms(quadrant: str, n: int, seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Normal phantoms; every second one (label 1) carries a bright 8-px square somewhere in the
    top-left or top-right quadrant, the only thing that tells the labels apart."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        image = make_phantom(size, "normal", seed=int(rng.integers(2**31))).image.copy()
        if i % 2:
            y0, x0 = (int(v) for v in rng.integers(2, size // 2 - 10, size=2))
            x0 += size // 2 if quadrant == "top_right" else 0
            image[y0:y0 + 8, x0:x0 + 8] = 0.95
        images.append((image * 255).round().astype(np.uint8))
        labels.append(i % 2)
    return np.stack(images), np.array(labels)


@pytest.mark.slow
def test_grad_cam_heat_follows_the_evidence():
    """Two classifiers whose only cue is a marker in the top-left or the top-right quadrant: scored
    against the top-left quadrant (a quarter of the image) as if it were the lungs, the first
    one's heat has a high HCS and the second one's a low one (measured for seeds 0-4 at these
    settings: 0.36-0.43 against 0.15-0.27)."""
    import torch

    from cxrtune.audit.heatmaps import heatmaps
    from cxrtune.model.classifiers import ClassifierConfig
    from cxrtune.model.classify import ClassifyConfig, fit_classifier, predict
    from cxrtune.preprocessing import Preprocessing

    size = 64
    top_left = np.zeros((size, size), bool)
    top_left[:size // 2, :size // 2] = True
    pre = Preprocessing(size=size, in_channels=1)
    hcs = {}
    for quadrant in ("top_left", "top_right"):
        cfg = ClassifyConfig(classifier=ClassifierConfig("resnet18", num_classes=2), size=size, epochs=5,
                             lr=1e-3, balancing="none", augment=False, seed=1)
        model = fit_classifier(cfg, *_marked_phantoms(quadrant, 128, seed=1))
        images, labels = _marked_phantoms(quadrant, 32, seed=101)
        assert (predict(model, images, pre).argmax(1) == labels).mean() >= 0.9, quadrant  # it found the cue
        heat, _ = heatmaps(model, torch.stack([pre.to_tensor(im) for im in images[labels == 1]]))
        hcs[quadrant] = float(np.mean([concordance(h, top_left)["hcs"] for h in heat]))
    assert hcs["top_left"] > 0.3 and hcs["top_left"] - hcs["top_right"] >= 0.1, hcs


def test_shortcut_phantom_plants_its_marker_outside_the_lungs():
    clean, marked = make_phantom(128, "covid", seed=5), make_phantom(128, "covid", seed=5, shortcut=True)
    diff = np.abs(marked.image - clean.image) > 0.2
    assert diff.sum() > 50 and not (diff & marked.lung).any()
    normal = make_phantom(128, "normal", seed=5, shortcut=True)
    assert np.array_equal(normal.image, make_phantom(128, "normal", seed=5).image)  # normal: no marker


@pytest.fixture(scope="module")
def audit_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("audit") / "recipe.yaml"
    path.write_text("classifier: {backbone: resnet18, in_channels: 1}\n"
                    "size: 96\nbatch_size: 16\nepochs: 5\nlr: 0.001\nbalancing: oversample\n")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("shortcut", [False, True], ids=["clean", "shortcut"])
def test_hide_and_seek_catches_a_shortcut_and_passes_clean_data(shortcut, audit_config, tmp_path):
    from tests.conftest import cli, cli_in_process

    data = tmp_path / "phantoms"
    cli_in_process("data", "phantom", "--n", "160", "--size", "96", "--out", str(data), "--seed", "11",
        *(["--shortcut"] if shortcut else []), "-q")
    r = cli("audit", "hide-and-seek", "--config", str(audit_config), "--manifest", str(data / "manifest.parquet"),
            "--out", str(tmp_path / "audit"), "--representations", "original,lungs_removed", "--heatmaps", "16",
            check=False, timeout=900)
    report = json.loads((tmp_path / "audit" / "hide_and_seek.json").read_text())
    reps = report["representations"]
    print(json.dumps({k: {m: v[m] for m in ("accuracy", "chance", "hcs", "hcs_pixels")} for k, v in reps.items()}))
    assert reps["original"]["accuracy"] >= reps["original"]["chance"] + 0.15  # it learnt something
    assert report["verdict"]["flagged"] is shortcut, report["verdict"]
    # HCS is reported for every representation. It is not asserted to tell these two apart: with
    # 16 evaluation images and Grad-CAM's 6 x 6 map at 96 px it does not do so reliably (clean vs
    # shortcut 0.26 vs 0.27 for phantom seed 11, 0.28 vs 0.19 for seed 12, and it moved with the
    # OpenCV release); test_grad_cam_heat_follows_the_evidence checks that the heat goes where the
    # evidence is
    for rep in reps.values():
        assert 0 < rep["hcs"] <= 1 and 0 < rep["hcs_pixels"] <= 1, rep
    assert ("FLAGGED" in r.stdout) is shortcut
    assert (tmp_path / "audit" / "heatmaps" / "original_00.png").stat().st_size > 200


def test_gate_rules_parse():
    from cxrtune.audit.gates import Gate, parse_gate
    from cxrtune.errors import CxrtuneError

    assert parse_gate("hcs>=0.5") == Gate("hcs", 0.5)
    assert parse_gate("score_mae<=1.1:S") == Gate("score_mae", 1.1, "S")
    assert parse_gate("hide-and-seek=a/b.json") == Gate("hide-and-seek", arg="a/b.json")
    assert parse_gate("score_mae<=1.1").rule == "score_mae<=1.1"
    with pytest.raises(CxrtuneError, match="use hcs>=X"):
        parse_gate("hcs<=0.5")
    with pytest.raises(CxrtuneError, match="'1.2.3' is not a number"):
        parse_gate("hcs>=1.2.3")


@pytest.mark.slow
def test_the_score_gate_reads_the_only_reader_and_never_judges_training_rows(phantom_bundle, phantom_dir, tmp_path):
    """A readers-only gate manifest (what the readers importer writes) is judged against its reader
    without naming it; with two readers one must be named; a manifest of training rows only is
    refused, and otherwise the gate scores none of them."""
    from cxrtune.audit.gates import Gate, run_gates
    from cxrtune.data import manifest
    from cxrtune.errors import CxrtuneError

    df = manifest.load_manifest(str(phantom_dir / "manifest.parquet"))
    readers = df.drop(columns=[c for c in df.columns if c.startswith("zone_")] + ["opacity_mask"])
    for z in "ABCDEF":
        readers[f"reader_S_{z}"] = 3  # every zone affected: the reader's score is 6
    manifest.save_manifest(readers, str(tmp_path / "one.parquet"))
    measured = run_gates([Gate("score_mae", 6.0)], bundle=str(phantom_bundle), manifest=str(tmp_path / "one.parquet"),
                         limit=64)["score_mae<=6"]
    assert measured["reference"] == "reader:S" and measured["images"] == (df["split"] != "train").sum()
    for z in "ABCDEF":
        readers[f"reader_J_{z}"] = 0
    manifest.save_manifest(readers, str(tmp_path / "two.parquet"))
    with pytest.raises(CxrtuneError, match=r"several readers \(J, S\): name one"):
        run_gates([Gate("score_mae", 6.0)], bundle=str(phantom_bundle), manifest=str(tmp_path / "two.parquet"))
    assert run_gates([Gate("score_mae", 6.0, "J")], bundle=str(phantom_bundle), manifest=str(tmp_path / "two.parquet"),
                     limit=64)["score_mae<=6:J"]["reference"] == "reader:J"
    manifest.save_manifest(df.assign(split="train"), str(tmp_path / "train.parquet"))
    with pytest.raises(CxrtuneError, match="training rows only"):
        run_gates([Gate("score_mae", 6.0)], bundle=str(phantom_bundle), manifest=str(tmp_path / "train.parquet"))


@pytest.mark.slow
def test_release_gates_refuse_with_numbers_and_record_what_passed(phantom_bundle, phantom_dir, tmp_path):
    from tests.conftest import cli_in_process as cli  # the command's parser and handlers, in this process

    runs = phantom_bundle.parent
    flagged, clean = tmp_path / "flagged.json", tmp_path / "clean.json"
    for path, is_flagged in ((flagged, True), (clean, False)):
        path.write_text(json.dumps({"verdict": {"flagged": is_flagged, "reason": "lungs removed: 0.97 (chance 0.4)"},
                                    "representations": {"lungs_removed": {"accuracy": 0.97 if is_flagged else 0.4}},
                                    "retained_skill": {"lungs_removed": 0.95 if is_flagged else 0.0}}))
    common = ("bundle", "make", "--lung", str(runs / "lung"), "--disease", str(runs / "disease"),
              "--gate-manifest", str(phantom_dir / "manifest.parquet"), "--gate-limit", "8")
    # the bundle's own numbers on the gate rows, measured first: each gate is then set 0.01 beyond them
    # (refused) or 0.01 short of them (passed), so both outcomes are real
    from cxrtune.audit.gates import Gate, run_gates

    measured = run_gates([Gate("hcs", 0.0), Gate("score_mae", 6.0)], bundle=str(phantom_bundle),
                         manifest=str(phantom_dir / "manifest.parquet"), limit=8)
    hcs, mae = measured["hcs>=0"]["value"], measured["score_mae<=6"]["value"]
    assert 0 < hcs <= 1 and mae >= 0.01  # an HCS of 1 (all heat inside the lungs) happens on phantoms
    out = tmp_path / "refused"
    high = round(hcs + 0.01, 3)  # rules are written as Gate.rule prints them (:g)
    too_high = f"hcs>={high:g}"
    r = cli(*common, "--out", str(out), "--gate", too_high, "--gate", f"hide-and-seek={flagged}", check=False)
    assert r.returncode == 2 and f"{too_high}: {hcs:.3f} (limit {high:g})" in r.stderr, r.stderr
    assert "lungs removed: 0.97" in r.stderr
    assert not (out / "bundle.json").exists() and not (out / "lung.pt").exists()  # nothing left to serve
    too_low = f"score_mae<={round(mae - 0.01, 3):g}"
    r = cli(*common, "--out", str(out), "--gate", too_low, check=False)
    assert r.returncode == 2 and f"{too_low}: {mae:.3f}" in r.stderr and not (out / "bundle.json").exists()
    # an audit that cannot run (no gate manifest; no report) writes nothing either
    out = tmp_path / "not-written"
    bare = ("bundle", "make", "--lung", str(runs / "lung"), "--disease", str(runs / "disease"), "--out", str(out))
    r = cli(*bare, "--gate", "hcs>=0.1", check=False)
    assert r.returncode == 2 and "needs --gate-manifest" in r.stderr and not out.exists()
    r = cli(*bare, "--gate", f"hide-and-seek={tmp_path / 'missing.json'}", check=False)
    assert r.returncode == 2 and "no hide-and-seek report" in r.stderr and not out.exists()
    # gates that pass: the results are recorded in bundle.json
    out = tmp_path / "passed"
    reachable, met = f"hcs>={round(hcs - 0.01, 3):g}", f"score_mae<={round(mae + 0.01, 3):g}"
    cli(*common, "--out", str(out), "--gate", reachable, "--gate", f"hide-and-seek={clean}", "--gate", met)
    gates = json.loads((out / "bundle.json").read_text())["audits"]["gates"]
    assert set(gates) == {reachable, f"hide-and-seek={clean}", met}
    assert all(g["passed"] for g in gates.values())
    assert gates[reachable]["hcs"] == pytest.approx(hcs) and gates[reachable]["images"] >= 4
    assert 0 < gates[reachable]["hcs_chance"] < 1  # the lungs' share of the crop: the bar a rule must clear
    assert gates[met]["score_mae"] == pytest.approx(mae) and gates[met]["images"] >= 4
    r = cli(*common, "--out", str(out), "--gate", reachable, check=False)  # a gated bundle never overwrites one
    assert r.returncode == 2 and "immutable" in r.stderr
    assert json.loads((out / "bundle.json").read_text())["audits"]["gates"] == gates
    # promote checks its gates before it writes anything
    r = cli("promote", str(tmp_path / "no-experiment"), "--to", str(tmp_path / "run"),
            "--gate", f"hide-and-seek={flagged}", check=False)
    assert r.returncode == 2 and "hide-and-seek" in r.stderr and not (tmp_path / "run").exists()
    r = cli("promote", str(tmp_path / "no-experiment"), "--to", str(tmp_path / "run"), "--gate", "hcs>=0.5",
            check=False)
    assert r.returncode == 2 and "give it to `cxrtune bundle make`" in r.stderr


def test_per_lung_grades_and_roi_schemes():
    import pandas as pd

    from cxrtune.model.grading import grade_labels, grading_input, mask_grades

    lung = np.zeros((100, 100), bool)
    lung[20:80, 10:40] = True  # the patient's right lung (image left)
    lung[20:80, 60:90] = True
    opacity = np.zeros_like(lung)
    opacity[20:50, 10:40] = True  # half of the right lung: moderate
    opacity[20:25, 60:90] = True  # a twelfth of the left: mild
    assert mask_grades(lung, opacity) == {"right": 2, "left": 1}
    image = np.linspace(0, 1, 100 * 100, dtype=np.float32).reshape(100, 100)
    assert np.allclose(grading_input(image, lung, "left", "none", 100), image, atol=1e-6)
    masked = grading_input(image, lung, "right", "lung_masked", 100)
    assert masked[0, 0] == 0 and masked[50, 20] == pytest.approx(image[50, 20], abs=1e-6)
    right, left = grading_input(image, lung, "right", "split", 50), grading_input(image, lung, "left", "split", 50)
    assert right.mean() < left.mean()  # values rise along each row: the image's left half (patient's right) is darker
    df = pd.DataFrame({"grade_right": [3, None], "grade_left": [0, None], "lung_mask": ["", "l"],
                       "opacity_mask": ["", "o"], "label": ["covid", "covid"]})
    masks = {"l": lung, "o": opacity}
    graded = grade_labels(df, masks.__getitem__)
    assert graded[["grade_right", "grade_left", "grade_source"]].values.tolist() == [[3, 0, "manifest"], [2, 1, "masks"]]
    # a mask with one lung (a white-out lung Stage I or a reader left out) grades that lung only: the
    # missing side is not "clear"
    one = lung.copy()
    one[:, 50:] = False
    assert mask_grades(one, opacity) == {"right": 2, "left": None}
    graded = grade_labels(df.iloc[[1]], {"l": one, "o": opacity}.__getitem__)
    assert graded["grade_right"].tolist() == [2] and graded["grade_left"].isna().all()
