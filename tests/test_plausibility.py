"""The check before every score: an input that does not look like a frontal chest radiograph is
unscored with the reason, never scored (cxrtune/scoring/plausibility.py). The rule's thresholds
are calibrated on real CXRs by bench/plausibility.py; here each failure it is there for is made
from a phantom CXR and its true lungs, so each test is exact."""

from pathlib import Path

import matplotlib
import numpy as np
import pytest

from cxrtune.data.phantom import make_phantom
from cxrtune.images import encode_png
from cxrtune.scoring.plausibility import DEFAULT_RULE, measure
from cxrtune.scoring.scorer import NO_LUNGS, build_record, unscored_reason
from cxrtune.zones import clean_lungs
from tests.conftest import cli_in_process

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
    assert m.contrast > 0.3 and m.roughness < 0.03
    assert DEFAULT_RULE.refusal(m) is None


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
