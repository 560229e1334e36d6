"""The check before every score: an input that does not look like a frontal chest radiograph is
unscored with the reason, never scored (cxrtune/scoring/plausibility.py). The rule's thresholds
are calibrated on real CXRs by bench/plausibility.py; here each failure it is there for is made
from a phantom CXR and its true lungs, so each test is exact."""

import gzip
import io
import re
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from cxrtune.data.phantom import make_phantom
from cxrtune.errors import CxrtuneError
from cxrtune.images import encode_png
from cxrtune.scoring.evaluation import CalibrateOptions
from cxrtune.scoring.plausibility import (
    APPEARANCE_FILE,
    DEFAULT_CHECK,
    DEFAULT_RULE,
    MIN_APPEARANCE_IMAGES,
    MIN_NOT_FRONTAL_IMAGES,
    NOT_FRONTAL,
    VIEW_ARRAYS,
    VIEW_FILE,
    AppearanceModel,
    PlausibilityCheck,
    ViewModel,
    appearance_vector,
    fit_appearance,
    fit_view,
    measure,
)
from cxrtune.scoring.scorer import NO_LUNGS, build_record, load_bundle, unscored_reason
from cxrtune.zones import clean_lungs
from tests.conftest import cli_in_process
from tests.test_dicom import make_dicom

SAMPLES = Path(matplotlib.get_data_path()) / "sample_data"


def phantom(seed: int = 0, kind: str = "covid") -> tuple[np.ndarray, np.ndarray]:
    """(working image float32 in [0, 1], cleaned true lungs)."""
    ph = make_phantom(256, kind, seed=seed)
    return ph.image.astype(np.float32), clean_lungs(ph.lung > 0)


@pytest.mark.parametrize("seed,kind", [(0, "normal"), (1, "covid"), (2, "covid"), (3, "normal")])
def test_a_frontal_cxr_is_scored(seed, kind):
    image, lung = phantom(seed, kind)
    assert unscored_reason(image, lung) is None


def _reason(image, lung) -> str:
    reason = unscored_reason(image, lung)
    assert reason and reason.startswith("not a frontal chest radiograph: "), reason
    return reason


def test_noise_is_refused_even_where_lungs_were_found():
    image, lung = phantom()
    noise = np.random.default_rng(0).random(image.shape, dtype=np.float32)
    assert "noise-like" in _reason(noise, lung)


def test_an_inverted_radiograph_is_refused():
    image, lung = phantom()
    assert "not darker than the mediastinum" in _reason(1 - image, lung)


def test_a_radiograph_turned_sideways_is_refused():
    """Its lungs lie one above the other, across the midline (cleaned as Stage I's would be)."""
    ph = make_phantom(256, "covid", seed=0)
    reason = _reason(np.ascontiguousarray(np.rot90(ph.image)), clean_lungs(np.ascontiguousarray(np.rot90(ph.lung))))
    assert "lateral film" in reason


def test_lungs_at_the_top_edge_an_abdominal_film_are_refused():
    image, lung = phantom()
    rows = np.flatnonzero(lung.any(axis=1))
    bases = np.zeros_like(lung)
    bases[: 40] = lung[rows[-1] - 40: rows[-1]]  # only the lung bases, at the top of the frame
    assert "not a chest film" in _reason(image, bases)


def test_one_lung_field_across_the_midline_a_lateral_film_is_refused():
    image, _ = phantom()
    field = np.zeros(image.shape, bool)
    field[50:210, 60:200] = True
    assert "lateral film" in _reason(image, field)


def _two_fields(left: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth film with two dark "lungs" that never touch: the first spans columns 40-130, the
    second, lower, columns ``left`` to ``left`` + 90, and where they share columns the first steps
    around the second. Stage I's two "lungs" overlap in columns so in laterals projected from CTs
    (bench/plausibility.py --ct)."""
    import cv2

    lung = np.zeros((256, 320), bool)  # not square: the gap is over the width
    lung[40:181, 40:131] = True
    lung[95:181, left - 5:131] = False
    lung[100:231, left:left + 91] = True
    image = cv2.GaussianBlur(np.where(lung, 0.3, 0.8).astype(np.float32), (0, 0), 4)
    return image, clean_lungs(lung)


def test_two_lungs_one_behind_the_other_a_lateral_view_is_refused():
    """Boxes overlapping by 21 of 320 columns (6.6 %): every other range passes, the gap alone refuses
    it; lungs side by side with a mediastinum between are scored."""
    image, lung = _two_fields(110)
    m = measure(image, lung)
    assert m.lung_gap == pytest.approx(-21 / 320)
    reason = _reason(image, lung)
    assert "overlap in 6.6% of the image's width (at most 2.0%)" in reason and ";" not in reason, reason
    image, lung = _two_fields(150)  # 19 columns apart
    assert measure(image, lung).lung_gap == pytest.approx(19 / 320) and unscored_reason(image, lung) is None


def test_one_lung_has_no_gap_and_is_not_refused_for_it():
    """A hemithorax that Stage I leaves out (a whited-out lung) must still be scored: one blob has
    no gap to judge."""
    image, lung = phantom()
    import cv2

    _, labels = cv2.connectedComponents(lung.astype(np.uint8))
    one = labels == 1
    assert measure(image, one).lung_gap is None
    reason = unscored_reason(image, one) or ""
    assert "one behind the other" not in reason and "overlap" not in reason


def test_lungs_found_beside_the_bones_of_a_limb_are_refused():
    """A real CR of a tibia (pydicom-data), with "lungs" where the CPU accuracy bundle's Stage I put
    them: two tall strips of soft tissue beside the bones (bench/plausibility.py). Every other
    range passes; they are too narrow and too tall for a chest."""
    import cv2
    from pydicom.data import get_testdata_file

    from cxrtune.dicom import read_dicom

    image = cv2.resize(read_dicom(get_testdata_file("RG3_UNCR.dcm")).pixels, (256, 256), interpolation=cv2.INTER_AREA)
    strips = np.zeros(image.shape, bool)
    strips[16:190, 68:88] = strips[16:180, 96:114] = True
    reason = _reason(image, strips)
    assert "of the image's width (at least 37%)" in reason and "times as tall as wide" in reason
    assert reason.count(";") == 1, reason  # those two only


def test_lungs_of_implausible_size_are_refused():
    image, lung = phantom()
    tiny = np.zeros_like(lung)
    tiny[100:115, 60:75] = tiny[100:115, 180:195] = True  # 0.7 % of the image: lungs found, but not a chest's
    assert "the lungs cover 1% of the image" in _reason(image, tiny)
    assert unscored_reason(image, np.zeros_like(lung)) == NO_LUNGS


def test_the_refused_record_is_unscored_with_the_reason_never_a_zero():
    image, lung = phantom()
    reason = _reason(1 - image, lung)
    record, _ = build_record(lung, None, None, 0.5, None, reason=reason)
    assert (record.status, record.score, record.reason, record.zones) == ("unscored", None, reason, None)


def test_measurements_are_the_documented_ones():
    image, lung = phantom()
    m = measure(image, lung)
    assert 0.1 < m.lung_fraction < 0.3 and 0.3 < m.centre_row < 0.6 and m.midline_share < 0.1
    assert m.contrast > 0.3 and m.roughness < 0.03 and 0.55 < m.lung_width < 0.75 and 0.7 < m.lung_aspect < 0.9
    assert 0.05 < m.lung_gap < 0.2
    assert DEFAULT_RULE.failures(m) == []


def test_the_scoring_policy_never_scores_noise_or_a_photograph(phantom_bundle, tmp_path):
    """`cxrtune score` over inputs that are not CXRs: noise, and a phantom CXR drowned in noise
    (where Stage I still finds lungs), are unscored with a reason; a colour photograph is refused;
    the phantom CXR beside them is scored. (An inverted phantom is not here: the phantom bundle's
    Stage I finds lung-shaped regions in it that pass the check; the rule is tested above with
    its true lungs, and on real CXRs in bench/plausibility.py.)"""
    import json

    rng = np.random.default_rng(1)
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "noise.png").write_bytes(encode_png(rng.integers(0, 256, (512, 512), dtype=np.uint8)))
    (inputs / "photo.jpg").write_bytes((SAMPLES / "grace_hopper.jpg").read_bytes())
    image, _ = phantom(1)
    noisy = np.clip(image + rng.uniform(-0.5, 0.5, image.shape), 0, 1)
    (inputs / "noisy.png").write_bytes(encode_png((255 * noisy).astype(np.uint8)))
    (inputs / "cxr.png").write_bytes(encode_png((255 * image).astype(np.uint8)))
    out = tmp_path / "records.jsonl"
    cli_in_process("score", str(inputs), "--bundle", str(phantom_bundle), "--out", str(out), "--device", "cpu")
    records = {Path(r["image"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    for name in ("noise.png", "noisy.png"):
        assert records[name]["status"] == "unscored" and records[name]["score"] is None, (name, records[name])
        assert records[name]["reason"] == NO_LUNGS or records[name]["reason"].startswith("not a frontal"), name
    # a colour photograph is refused when it is decoded (a 422 over HTTP)
    assert records["photo.jpg"]["status"] == "error" and "a photograph, not a radiograph" in records["photo.jpg"]["error"]
    assert records["cxr.png"]["status"] in ("scored", "partial"), records["cxr.png"]


@pytest.fixture(scope="module")
def appearance() -> AppearanceModel:
    """The appearance model of 220 phantom CXRs and their true lungs (as calibrate fits it on a
    bundle's validation rows)."""
    rows = [phantom(seed, ("covid", "normal")[seed % 2]) for seed in range(220)]
    model = fit_appearance(np.array([appearance_vector(image, lung) for image, lung in rows]))
    assert model is not None and model.n == 220
    return model


def upside_down(image: np.ndarray, lung: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.ascontiguousarray(image[::-1, ::-1]), clean_lungs(np.ascontiguousarray(lung[::-1, ::-1]))


def test_the_appearance_model_refuses_what_the_ranges_let_through(appearance):
    """A film stored upside down and an MRI slice (with lungs where Stage I might put them) pass
    every range; around their lungs they do not look like the CXRs fitted on. Unseen frontal
    phantoms do."""
    check = PlausibilityCheck(appearance=appearance)
    unseen = [phantom(seed, ("covid", "normal")[seed % 2]) for seed in range(1000, 1020)]
    assert [check.refusal(image, lung) for image, lung in unseen] == [None] * 20
    image, lung = phantom(1000)
    mri = np.frombuffer(gzip.open(SAMPLES / "s1045.ima.gz").read(), "<u2").reshape(256, 256).astype(np.float32)
    for wrong, its_lungs in (upside_down(image, lung), (mri / mri.max(), lung)):
        assert DEFAULT_RULE.failures(measure(wrong, its_lungs)) == []  # the nine ranges let it through
        reason = check.refusal(wrong, its_lungs)
        assert reason and reason.startswith("not a frontal chest radiograph: ") and "does not look like" in reason
        assert unscored_reason(wrong, its_lungs, check) == reason


def test_the_appearance_model_is_arrays_read_without_pickle_and_needs_enough_images(appearance):
    again = AppearanceModel.from_bytes(appearance.to_bytes())
    for name in ("mean", "components", "variances", "limits"):
        assert np.array_equal(getattr(again, name), getattr(appearance, name))
    assert again.n == appearance.n and again.summary() == appearance.summary()
    vectors = np.array([appearance_vector(*phantom(seed)) for seed in range(MIN_APPEARANCE_IMAGES - 1)])
    assert fit_appearance(vectors) is None  # ten components of 199 images would fit those images


def test_calibrate_fits_the_appearance_and_view_models_into_the_new_bundle(phantom_bundle, tmp_path):
    """`cxrtune calibrate --what appearance --not-frontal DIR` on 210 validation phantoms and 30
    phantom laterals (beside a lateral DICOM, read, and a PA DICOM and a corrupt file, left out)
    stores both models in the new bundle,
    listed with their hashes; the scorer loaded from it refuses an upside-down phantom that the
    bundle without them scores, and laterals it was not fitted on for their view."""
    import json

    from cxrtune.data.phantom import write_phantoms

    df = write_phantoms(tmp_path / "val", 210, size=128, seed=7)
    df.assign(split="val").to_parquet(tmp_path / "val" / "manifest.parquet")
    laterals = tmp_path / "DOE_JOHN_laterals"
    laterals.mkdir()
    for seed in range(30):
        (laterals / f"{seed}.png").write_bytes(encode_png((lateral(seed, 128) * 255).astype(np.uint8)))
    (laterals / "cut.png").write_bytes((laterals / "0.png").read_bytes()[:200])
    # from a PACS export: a lateral DICOM (read, though scoring refuses it) and a PA one (left out)
    make_dicom(laterals / "ll.dcm", (lateral(30, 128) * 255).astype(np.uint8), ViewPosition="LL")
    make_dicom(laterals / "pa.dcm", (make_phantom(128, "normal", seed=99).image * 255).astype(np.uint8))
    out = tmp_path / "with-appearance"
    r = cli_in_process("calibrate", str(phantom_bundle), "--out", str(out), "--manifest",
                       str(tmp_path / "val" / "manifest.parquet"), "--what", "appearance", "--not-frontal", str(laterals))
    assert "appearance model: 10 components of" in r.stdout
    assert "view model: 210 validation images against 31 not-frontal ones" in r.stdout
    assert re.search(r"in cross-validation it refuses \d+% of the not-frontal ones\); 2 not-frontal file\(s\) skipped",
                     r.stdout), r.stdout
    assert "--not-frontal row 30 not scored: " in r.stderr  # cut.png, in the sorted order
    assert "--not-frontal row 32 left out: a frontal film by its header (ViewPosition PA)" in r.stderr
    assert "DOE_JOHN" not in r.stderr + r.stdout
    meta = json.loads((out / "bundle.json").read_text())
    assert APPEARANCE_FILE in meta["files"] and VIEW_FILE in meta["files"]
    calibrated, plain = load_bundle(str(out), device="cpu"), load_bundle(str(phantom_bundle), device="cpu")
    assert calibrated.plausibility.appearance is not None and calibrated.plausibility.appearance.n >= 200
    assert calibrated.plausibility.view is not None and calibrated.plausibility.view.n_not_frontal == 31
    assert plain.plausibility.appearance is None and plain.plausibility.view is None
    ph = make_phantom(128, "normal", seed=4242)
    wrong = np.ascontiguousarray(ph.image[::-1, ::-1]).astype(np.float32)
    (record, _), = calibrated.score_images([wrong])
    assert record["status"] == "unscored" and "does not look like" in record["reason"], record
    (right, _), = calibrated.score_images([ph.image.astype(np.float32)])
    assert right["status"] in ("scored", "partial"), right
    unseen = [record for record, _ in calibrated.score_images([lateral(seed, 128) for seed in range(600, 610)])]
    assert all("looks like the not-frontal views" in record["reason"] for record in unseen), unseen
    # the appearance refitted without --not-frontal: the old view model (its limit set on other
    # rows) is not carried over, and calibrate says so
    again = tmp_path / "appearance-again"
    r = cli_in_process("calibrate", str(out), "--out", str(again), "--manifest",
                       str(tmp_path / "val" / "manifest.parquet"), "--what", "appearance")
    assert "not carried over from the source bundle: view.npz" in r.stderr
    files = json.loads((again / "bundle.json").read_text())["files"]
    assert APPEARANCE_FILE in files and VIEW_FILE not in files
    assert load_bundle(str(again), device="cpu").plausibility.view is None
    # calibrating a threshold alone keeps both models
    kept = tmp_path / "cls-only"
    r = cli_in_process("calibrate", str(out), "--out", str(kept), "--manifest", str(tmp_path / "val" / "manifest.parquet"),
                       "--what", "cls", "--limit", "20")
    files = json.loads((kept / "bundle.json").read_text())["files"]
    assert APPEARANCE_FILE in files and VIEW_FILE in files and "not carried over" not in r.stderr


def lateral(seed: int, size: int = 256) -> np.ndarray:
    """A phantom lateral chest film: one lung field across the middle, the spine bright behind it,
    the heart in front and below, facing left or right by the seed."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    spine, front = rng.uniform(0.74, 0.82), rng.uniform(0.14, 0.22)
    body = (xs > front - 0.06) & (xs < spine + 0.1)
    img = np.where(body, 0.45, 0.04).astype(np.float32)
    field = (xs > front + 0.04) & (xs < spine - 0.03) & (ys > 0.12) & (ys < 0.78 - 0.25 * (xs - 0.5) ** 2)
    img = np.where(field, 0.2 + 0.08 * ys, img)
    img = np.where(np.abs(xs - spine - 0.04) < 0.035, 0.8 - 0.1 * (np.sin(ys * 60) > 0.6), img)  # vertebrae
    heart = ((xs - front - 0.3) / 0.17) ** 2 + ((ys - 0.55) / 0.22) ** 2 < 1
    img = np.where(heart & field, 0.5, img) + rng.normal(0, 0.01, img.shape).astype(np.float32)
    img = np.clip(img, 0, 1)
    return np.ascontiguousarray(img[:, ::-1]) if seed % 2 else img


@pytest.fixture(scope="module")
def view() -> ViewModel:
    """The view model of the 220 frontal phantoms against 40 phantom laterals, with the frontal
    phantoms' true lungs standing for the "lungs" Stage I draws on a lateral (as calibrate fits it
    on a bundle's validation rows against a site's laterals)."""
    frontal = [phantom(seed, ("covid", "normal")[seed % 2]) for seed in range(220)]
    others = [appearance_vector(lateral(seed), frontal[seed][1]) for seed in range(40)]
    model = fit_view(np.array([appearance_vector(image, lung) for image, lung in frontal]), np.array(others))
    assert model is not None and (model.n_frontal, model.n_not_frontal) == (220, 40)
    return model


def test_the_view_model_refuses_laterals_it_was_not_fitted_on_and_scores_frontal_cxrs(appearance, view):
    check = PlausibilityCheck(appearance=appearance, view=view)
    unseen = [phantom(seed, ("covid", "normal")[seed % 2]) for seed in range(1000, 1020)]
    assert [check.refusal(image, lung) for image, lung in unseen] == [None] * 20
    for seed in range(500, 510):
        reason = check.refusal(lateral(seed), unseen[seed % 20][1])
        assert reason and "looks like the not-frontal views the bundle was calibrated with" in reason, reason
        # the nine ranges let it through; the view model alone refuses it
        assert DEFAULT_CHECK.refusal(lateral(seed), unseen[seed % 20][1]) is None
        assert PlausibilityCheck(view=view).refusal(lateral(seed), unseen[seed % 20][1]) == (
            NOT_FRONTAL + view.failure(appearance_vector(lateral(seed), unseen[seed % 20][1])))


def test_the_view_model_is_arrays_read_without_pickle_and_needs_enough_images(view):
    again = ViewModel.from_bytes(view.to_bytes())
    for name in VIEW_ARRAYS:
        assert np.array_equal(getattr(again, name), getattr(view, name))
    with np.load(io.BytesIO(view.to_bytes())) as z:
        older = {name: z[name] for name in z.files if name != "cv_refused"}
    buf = io.BytesIO()
    np.savez(buf, **older)
    with pytest.raises(CxrtuneError, match="view.npz lacks cv_refused: calibrate it again"):
        ViewModel.from_bytes(buf.getvalue())
    assert again.summary() == view.summary() == {"frontal_images": 220, "not_frontal_images": 40,
                                                 "limit": round(float(view.limit[0]), 4), "cv_refused": 1.0}
    frontal = np.array([appearance_vector(*phantom(seed)) for seed in range(MIN_APPEARANCE_IMAGES)])
    lungs = phantom(0)[1]
    few = np.array([appearance_vector(lateral(seed), lungs) for seed in range(MIN_NOT_FRONTAL_IMAGES - 1)])
    assert fit_view(frontal, few) is None  # a handful of laterals is one patient's, not a view's
    assert fit_view(frontal[:-1], np.vstack([few, few[:1]])) is None
    assert fit_view(frontal, np.vstack([few, few[:1]])) is not None
    with pytest.raises(CxrtuneError, match="add appearance to --what"):
        CalibrateOptions(what=("zone",), not_frontal=("laterals/",))
