"""``cxrtune calibrate`` and ``cxrtune evaluate``: a bundle against a labelled manifest."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace

import cv2
import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve
from tqdm import tqdm

from .. import images, storage, zones
from ..data import manifest
from ..data.splits import patient_folds
from ..dicom import FRONTAL_VIEWS
from ..errors import CxrtuneError
from ..jsonsafe import json_safe
from ..model.artifacts import Calibration, derive_bundle, now, read_bundle_meta, require_new_bundle
from ..model.metrics import SegmentationMeter, classification_metrics
from ..plots import pyplot, save_figure
from ..preprocessing import load_scan
from ..zones import DEFAULT_ZONE_THRESHOLD
from . import agreement
from .batch_scoring import expand_inputs
from .plausibility import (
    APPEARANCE_FILE,
    MIN_APPEARANCE_IMAGES,
    MIN_NOT_FRONTAL_IMAGES,
    VIEW_FILE,
    AppearanceModel,
    ViewModel,
    appearance_vector,
    fit_appearance,
    fit_view,
)
from .record import STATUSES
from .scorer import (
    ZONE_GRID,
    Scorer,
    has_lungs,
    load_bundle,
    normal_fp_rate,
    reference_zones,
    score_error,
    sweep_threshold,
    zone_fractions,
)

log = logging.getLogger(__name__)


def pick_rows(df: pd.DataFrame, split: str | None, limit: int | None) -> pd.DataFrame:
    """Rows of the given split(s) (comma-separated; ``all`` or None: every row). ``limit`` takes a
    seeded sample stratified by label (manifests are often in class order: the first rows alone
    would be one class)."""
    rows = df if not split or split == "all" else df[df["split"].isin(split.split(","))]
    if limit and len(rows) > limit:
        picked = rows.groupby("label").sample(frac=limit / len(rows), random_state=0).index
        if len(picked) > limit:  # rounding per label: trim at random, not by class order
            picked = pd.Index(np.random.default_rng(0).choice(picked, size=limit, replace=False))
        rows = rows.loc[sorted(picked)]
    if rows.empty:
        raise CxrtuneError(f"no manifest rows in split(s) {split!r} (use --split all for a manifest without splits)")
    return rows


def readable_scans(rows: pd.DataFrame, cache, header_rules: bool = True, kind: str = "manifest"):
    """(row, scan) per row whose image reads and passes the input rules (:func:`load_scan`; the
    DICOM header rules only with ``header_rules``); the others are logged by ``kind`` and row
    number (never by path) and skipped."""
    for i, (_, row) in enumerate(rows.iterrows()):
        try:
            data = cache.read_bytes(row["image"])
        except Exception as exc:  # noqa: BLE001 - one row's failure; its message may name the path
            log.warning("%s row %d not read (%s)", kind, i, type(exc).__name__)
            continue
        try:
            scan = load_scan(data, header_rules=header_rules)
        except CxrtuneError as exc:  # a plain reason, naming nothing of the file
            log.warning("%s row %d not scored: %s", kind, i, exc)
            continue
        except Exception as exc:  # noqa: BLE001 - a decoder's own failure: that row only
            log.warning("%s row %d not scored (%s)", kind, i, type(exc).__name__)
            continue
        yield row, scan


def score_rows(scorer: Scorer, rows: pd.DataFrame, cache, progress: bool):
    """(row, image, record, detail) per readable row, through the scoring policy, in batches of
    the scorer's size."""
    for pending in batched_scans(rows, cache, scorer.batch_size, "score", progress):
        scans = [scan for _, scan in pending]
        results = scorer.score_images([s.image for s in scans], scans=scans)
        for (row, scan), (record, detail) in zip(pending, results):
            yield row, scan.image, record, detail


def batched_scans(rows: pd.DataFrame, cache, batch_size: int, desc: str, progress: bool, header_rules: bool = True,
                  kind: str = "manifest"):
    """:func:`readable_scans` in lists of ``batch_size`` (the last one shorter), with a progress bar."""
    pending, batch = [], max(1, batch_size)
    scans = readable_scans(rows, cache, header_rules, kind)
    for item in tqdm(scans, total=len(rows), desc=desc, unit="image", disable=not progress):
        pending.append(item)
        if len(pending) == batch:
            yield pending
            pending = []
    if pending:
        yield pending


def _resized(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A reference mask at the working image's size (the working copy may be downscaled)."""
    if mask.shape == shape:
        return mask

    return cv2.resize(mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST) > 0


def manifest_id(df: pd.DataFrame) -> str:
    """Where a manifest came from, comparable across runs: absolute for a local path."""
    uri = df.attrs.get("source_uri", "")
    return uri if not uri or storage.is_s3(uri) else os.path.abspath(uri)


def same_rows(split_a: str | None, split_b: str | None) -> bool:
    """Whether two split selections (comma-separated, ``all``) share rows."""
    a, b = set((split_a or "all").split(",")), set((split_b or "all").split(","))
    return "all" in a or "all" in b or bool(a & b)


def cls_operating_points(prob: np.ndarray, label: np.ndarray) -> dict[str, np.ndarray]:
    """Every candidate T_cls (each distinct probability: scikit-learn's ROC curve, ascending
    sensitivity) with its F1, specificity and sensitivity on the labelled rows."""
    prob, label = np.asarray(prob, float), np.asarray(label, int)
    if len(set(label)) < 2:
        raise CxrtuneError("T_cls needs labelled normal and disease images in the calibration rows")
    fpr, tpr, thresholds = roc_curve(label, prob, drop_intermediate=False)
    keep = np.isfinite(thresholds)  # the first point (nothing called disease) is not one
    fpr, tpr, thresholds = fpr[keep], tpr[keep], thresholds[keep]
    positives, negatives = int(label.sum()), int((label == 0).sum())
    tp, fp = tpr * positives, fpr * negatives
    return {"threshold": thresholds, "f1": 2 * tp / np.maximum(2 * tp + fp + (positives - tp), 1),
            "specificity": 1 - fpr, "sensitivity": tpr}


def _operating_point(points: dict[str, np.ndarray], i: int) -> dict:
    return {"threshold": float(points["threshold"][i]), **{k: float(points[k][i]) for k in
                                                            ("f1", "specificity", "sensitivity")}}


def choose_cls_threshold(prob: np.ndarray, label: np.ndarray, specificity: float | None = None,
                         above: float = -np.inf) -> dict:
    """T_cls at a stated operating point: maximum F1 (default), or the lowest threshold whose
    specificity on the normal images is >= ``specificity`` with the best sensitivity there (if none
    reaches it, the best specificity). Candidates: :func:`cls_operating_points` greater than
    ``above`` (:func:`normal_fp_floor`); ties go to the lowest threshold."""
    points = cls_operating_points(prob, label)
    keep = points["threshold"] > above
    if not keep.any():
        raise CxrtuneError(f"T_cls would have to exceed every p(disease) in the calibration rows (it must be above "
                           f"{above:.4f} to meet --normal-fp-limit): no operating point is left")
    thresholds, f1, spec, tpr = (points[k][keep] for k in ("threshold", "f1", "specificity", "sensitivity"))
    if specificity is not None:
        met = spec >= specificity
        best = np.lexsort((thresholds, -np.where(met, tpr, spec), ~met))[0]
    else:
        best = np.lexsort((thresholds, -np.round(f1, 12)))[0]
    return {"threshold": float(thresholds[best]), "f1": float(f1[best]), "specificity": float(spec[best]),
            "sensitivity": float(tpr[best])}


NORMAL_FP_CONFIDENCE = 0.95  # the one-sided level of the FP rate on Normal's upper bound under a limit


def normal_fp_upper(false_positives: int, normals: int) -> float:
    """The one-sided 95 % upper bound (Clopper-Pearson, scipy) of an FP rate on Normal seen as
    ``false_positives`` of ``normals`` images."""
    from scipy.stats import binomtest

    ci = binomtest(false_positives, normals).proportion_ci(confidence_level=2 * NORMAL_FP_CONFIDENCE - 1,
                                                            method="exact")
    return float(ci.high)


def normal_fp_floor(flagged: np.ndarray, normals: int, limit: float) -> float:
    """The value T_cls must be above for the FP rate on Normal's upper bound
    (:func:`normal_fp_upper`) to be <= ``limit``; -inf when any T_cls is.

    Args:
        flagged: p(disease) of the Normal images that score > 0 whenever Stage II's map counts
            (p >= T_cls): at T_cls the false positives are those with p >= T_cls.
        normals: the Normal images, flagged or not."""
    flagged = np.sort(np.asarray(flagged, float))[::-1]
    most = most_false_positives(normals, limit, len(flagged))
    return -np.inf if most >= len(flagged) else float(flagged[most])


def most_false_positives(normals: int, limit: float, at_most: int) -> int:
    """The most of ``normals`` Normal images that may score > 0 with the FP rate's upper bound
    (:func:`normal_fp_upper`, which rises with their count) <= ``limit``, counted up to ``at_most``.

    Raises:
        CxrtuneError: not even none would do: too few Normals to show the limit."""
    if normal_fp_upper(0, normals) > limit:
        raise CxrtuneError(f"{normals} Normal image(s) with lungs cannot show an FP rate on Normal <= {limit} at "
                           f"{NORMAL_FP_CONFIDENCE:.0%} even with none scored > 0: calibrate on more Normal rows")
    most = 0
    while most < at_most and normal_fp_upper(most + 1, normals) <= limit:
        most += 1
    return most


def max_zone_shares(lung: np.ndarray, prob: np.ndarray, cuts: list[float]) -> np.ndarray:
    """Per opacity cut, the largest zone share of ``prob >= cut`` within the lungs: the image scores > 0
    at that cut whenever this is >= T and p(disease) >= T_cls. 0 at every cut when the record would not
    be scored (one lung: a partial record has no score, so it is never a false positive)."""
    lungs = zones.split_lungs(lung)
    if lungs.lungs_found != 2:
        return np.zeros(len(cuts))
    six = zones.zone_masks(lungs)
    return np.array([max((share for area, share in zones.zone_opacity(six, (prob >= cut) & lung).values() if area),
                         default=0.0) for cut in cuts])


OPACITY_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)  # candidate opacity thresholds


def stage2_maps(scorer: Scorer, rows: pd.DataFrame, cache, progress: bool):
    """(row, image, cleaned lung mask, opacity probabilities, p(disease)) per readable row whose
    lungs Stage I finds, before refinement, in batches of the scorer's size."""
    for pending in batched_scans(rows, cache, scorer.batch_size, "calibrate", progress):
        images = [scan.image for _, scan in pending]
        lungs = scorer.lung_masks(images)
        found = [i for i, lung in enumerate(lungs) if has_lungs(lung)]
        maps = scorer.opacity_maps([images[i] for i in found], [lungs[i] for i in found]) if found else []
        for i, (prob, p) in zip(found, maps):
            yield pending[i][0], images[i], lungs[i], prob, p


def choose_opacity_threshold(stats: list[tuple[float, np.ndarray, np.ndarray, int]], cls_threshold: float,
                             grid: np.ndarray = OPACITY_GRID) -> dict:
    """The opacity threshold of maximum mean Dice (ties: the one nearest 0.5) over images whose
    reference has opacity. ``stats`` per image: ``(p(disease), |pred AND ref| per grid threshold,
    |pred| per grid threshold, |ref|)``; an image refined away (p < T_cls) has Dice 0 at any threshold."""
    dice = np.zeros(len(grid))
    for p, inter, pred, ref in stats:
        if p >= cls_threshold:
            dice += 2 * inter / np.maximum(pred + ref, 1)
    dice /= max(len(stats), 1)
    best = max(range(len(grid)), key=lambda i: (round(float(dice[i]), 6), -abs(float(grid[i]) - 0.5)))
    return {"threshold": float(grid[best]), "dice": float(dice[best]), "n": len(stats),
            "curve": [{"threshold": float(t), "dice": float(d)} for t, d in zip(grid, dice)]}


CALIBRATED = ("cls", "opacity", "zone")
CALIBRATE_WHAT = (*CALIBRATED, "appearance")  # what --what may name: the thresholds, and the appearance model


@dataclass(frozen=True)
class CalibrateOptions:
    """What :func:`calibrate` chooses and on what; the defaults are ``cxrtune calibrate``'s.

    Args:
        split: rows T is chosen on (comma-separated splits; ``all``/None: every row).
        cls_split: rows T_cls and the opacity threshold are chosen on (validation data).
        reference: ``auto``, ``zones``, ``masks`` or a reader id (``S`` or ``reader:S``).
        reference_threshold: T of the mask-derived reference.
        specificity: T_cls at this specificity instead of maximum F1.
        normal_fp_limit: the ``cls_split`` Normal images' FP rate (score > 0 at the final
            thresholds) must have a one-sided 95 % upper bound <= this: where the operating point
            and T break it, T_cls and T are chosen again (:func:`calibrate`).
        limit: rows per split at most (a stratified sample).
        what: which of ``cls``, ``opacity``, ``zone`` to choose, and ``appearance``: fit the
            plausibility check's appearance model (:mod:`.plausibility`) on the ``cls_split`` rows.
        not_frontal: radiographs known not to be frontal CXRs (files, folders, ``s3://``
            prefixes or manifests; a site's laterals): with ``appearance``, fit the check's view
            model on the ``cls_split`` rows against them."""
    split: str | None = "train,val"
    cls_split: str | None = "val"
    reference: str = "auto"
    reference_threshold: float = DEFAULT_ZONE_THRESHOLD
    specificity: float | None = None
    normal_fp_limit: float | None = None
    limit: int | None = None
    what: tuple[str, ...] = CALIBRATE_WHAT
    not_frontal: tuple[str, ...] = ()
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = sorted(set(self.what) - set(CALIBRATE_WHAT))
        if unknown or not self.what:
            raise CxrtuneError(f"--what {','.join(self.what)!r}: choose from cls, opacity, zone and appearance "
                               "(comma-separated)")
        if self.normal_fp_limit is not None and not (0 < self.normal_fp_limit < 1 and "cls" in self.what):
            raise CxrtuneError(f"--normal-fp-limit {self.normal_fp_limit}: a rate between 0 and 1 that T_cls meets, "
                               "so cls must be in --what")
        if self.not_frontal and "appearance" not in self.what:
            raise CxrtuneError("--not-frontal fits the view model beside the appearance model: add appearance to --what")


@dataclass(frozen=True)
class CalibrationResult:
    """The chosen thresholds with their provenance; None for one not chosen (not asked for, or
    no rows to choose it on). ``curve``/``opacity_curve``: the sweeps behind T and the opacity cut."""
    cls: Calibration | None = None
    opacity: Calibration | None = None
    zone: Calibration | None = None
    curve: list = field(default_factory=list)
    opacity_curve: list = field(default_factory=list)
    appearance: AppearanceModel | None = None
    appearance_images: int = 0  # images with lungs it was (or, below MIN_APPEARANCE_IMAGES, would have been) fitted on
    view: ViewModel | None = None
    not_frontal_files: int = 0  # files --not-frontal named
    not_frontal_images: int | None = None  # of them, read, not frontal by their header, with lungs (None: not read)

    def bundle_changes(self) -> dict:
        """The bundle.json fields this result sets (:func:`~cxrtune.model.artifacts.derive_bundle`)."""
        out: dict = {}
        for name in CALIBRATED:
            c = getattr(self, name)
            if c is not None:
                out.update({f"{name}_threshold": c.threshold, f"{name}_calibration": c})
        return out

    def bundle_contents(self) -> dict[str, bytes]:
        """The files this result adds to the calibrated bundle: the appearance and view models, if fitted."""
        return {name: model.to_bytes() for name, model in ((APPEARANCE_FILE, self.appearance), (VIEW_FILE, self.view))
                if model is not None}


def _refuse_test_rows(what_split: str, chosen: str | None, rows: pd.DataFrame) -> None:
    # the selected rows are judged, not the selector: ``all`` takes the test rows too
    n_test = int((rows["split"] == "test").sum()) if "split" in rows else 0
    if n_test:
        raise CxrtuneError(f"{what_split} calibration on split(s) {chosen or 'all'!r} takes {n_test} test-split "
                           "row(s): the test split is never calibrated on (its figures would be in-sample); "
                           "use train and val rows")


def _validation_rows(df: pd.DataFrame, options: CalibrateOptions) -> pd.DataFrame:
    """The ``cls_split`` rows T_cls, the opacity cut and the appearance model are chosen on (none
    when neither is asked for, or the manifest has none: they are left as they are)."""
    if not {"cls", "opacity", "appearance"} & set(options.what):
        return df.iloc[:0]
    try:
        rows = pick_rows(df, options.cls_split, options.limit)
    except CxrtuneError:
        return df.iloc[:0]  # no validation rows here (the CLI says what was left as it was)
    _refuse_test_rows("T_cls", options.cls_split, rows)
    return rows


@dataclass(frozen=True)
class ZoneRows:
    """The ``split`` rows T is chosen on, scored once, unrefined: per row its six zone fractions,
    p(disease) and reference zones; ``reference`` says which reference they gave."""
    fractions: np.ndarray
    p: np.ndarray
    refs: np.ndarray
    reference: str

    def sweep(self, cls_threshold: float) -> dict:
        """T by minimum score MAE, refined at ``cls_threshold`` (Eq. 1-2: under it, no opacity)."""
        return sweep_threshold(np.where((self.p >= cls_threshold)[:, None], self.fractions, 0.0), self.refs)

    def error_surfaces(self, cls_thresholds: np.ndarray, grid: np.ndarray = ZONE_GRID) -> tuple[np.ndarray, np.ndarray]:
        """Score MAE and RMSE at every (T_cls, T) pair (len(cls_thresholds) x len(grid)) at once,
        as :meth:`sweep` gives them one T_cls at a time: a row refined away (p < T_cls) scores 0,
        the others count their zones >= T."""
        ref = self.refs.sum(axis=1)
        kept = (self.fractions[:, :, None] >= grid[None, None, :]).sum(axis=1) - ref[:, None]  # N x G errors
        order = np.argsort(self.p, kind="stable")
        below = np.searchsorted(self.p[order], cls_thresholds, side="left")  # rows with p < T_cls
        surfaces = []
        for power in (1, 2):
            kept_before = np.vstack([np.zeros(len(grid)), np.cumsum(np.abs(kept[order]) ** power, axis=0)])
            zeroed_before = np.concatenate([[0.0], np.cumsum(np.abs(ref[order]) ** power)])
            surfaces.append((kept_before[-1] - kept_before[below] + zeroed_before[below][:, None]) / len(ref))
        return surfaces[0], np.sqrt(surfaces[1])


def resolve_reference(reference: str, readers: list[str], what: tuple[str, ...]) -> str:
    """``--reference`` as :func:`reference_zones` takes it: ``reader:<ID>``, ``zones``, ``masks`` or
    ``auto`` (the only reader, if one; several must be told apart when ``what`` holds ``zone``)."""
    if reference == "auto" and len(readers) > 1 and "zone" in what:
        raise CxrtuneError(f"the manifest has several readers ({', '.join(readers)}): choose one with --reference")
    if reference == "auto":
        return f"reader:{readers[0]}" if len(readers) == 1 else "auto"
    if reference in ("zones", "masks"):
        return reference
    reference = "reader:" + reference.split(":", 1)[-1]
    if reference[7:] not in readers:
        raise CxrtuneError(f"--reference {reference[7:]!r}: the manifest's readers are "
                           f"{', '.join(readers) or 'none (no reader_<ID>_<A-F> columns)'}")
    return reference


def _zone_rows(scorer: Scorer, rows: pd.DataFrame, cache, reference: str, reference_threshold: float,
               progress: bool) -> ZoneRows:
    """Score ``rows`` once, every opacity map counting (T_cls is applied later, to the stored p)."""
    fracs, p, refs, kinds = [], [], [], set()
    every_mask = scorer.with_thresholds(cls=0.0)
    for row, _, record, _ in score_rows(every_mask, rows, cache, progress):
        zone_ref = reference_zones(row, reference_threshold, cache, reference=reference)
        f = zone_fractions(record)
        if zone_ref is None or f is None:
            continue
        if reference == "auto":  # which one this row gave: zone columns, else masks
            kinds.add("zones" if reference_zones(row, reference_threshold, cache, reference="zones") else "masks")
        fracs.append(f)
        p.append(record["disease_probability"])
        refs.append(zone_ref)
    if not refs:
        raise CxrtuneError(f"no scored row has a {reference!r} reference (reader grades, zone_A..zone_F or "
                           "both reference masks); zone calibration needs labelled images")
    return ZoneRows(np.array(fracs), np.array(p, float), np.array(refs),
                    reference if reference != "auto" else "+".join(sorted(kinds)))


def _under_normal_fp_limit(normals: list[tuple[float, np.ndarray]], cut_index: int, zone: ZoneRows | float,
                           cls: tuple[np.ndarray, np.ndarray], limit: float,
                           specificity: float | None) -> tuple[dict, dict | None, dict]:
    """T_cls and T (when it is being chosen) such that the Normals' FP rate meets ``limit``: as
    chosen without it where they do; else, with T chosen, the pair of least score MAE that meets
    it (:func:`_least_mae_under_limit`), and with T fixed, T_cls at its operating point above the
    Normals that break it (:func:`normal_fp_floor`: exact, as the count only falls as T_cls rises).

    Args:
        normals: per labelled Normal image with lungs, (p(disease), :func:`max_zone_shares` at every cut).
        cut_index: the opacity cut's index in those shares.
        zone: the zone rows T is chosen on, or T itself when it is not being chosen.
        cls: the labelled rows' (p(disease), label) T_cls is chosen on, at ``specificity`` or maximum F1.
    Returns:
        T_cls's :func:`choose_cls_threshold` choice, T's sweep (None when not chosen), and the FP
        fields of T_cls's :class:`Calibration`."""
    shares = np.array([s[cut_index] for _, s in normals])
    p_normal = np.array([p for p, _ in normals])
    choice = choose_cls_threshold(*cls, specificity=specificity)
    if isinstance(zone, ZoneRows):
        sweep = zone.sweep(choice["threshold"])
        flagged = p_normal[shares >= sweep["threshold"]]
        if choice["threshold"] <= normal_fp_floor(flagged, len(normals), limit):  # the limit binds
            choice, sweep = _least_mae_under_limit(p_normal, shares, zone, cls, limit, choice["threshold"])
            flagged = p_normal[shares >= sweep["threshold"]]
    else:  # T stays: the FP count falls as T_cls rises, so the floor is exact
        sweep, flagged = None, p_normal[shares >= zone]
        floor = normal_fp_floor(flagged, len(normals), limit)
        if choice["threshold"] <= floor:
            choice = choose_cls_threshold(*cls, specificity=specificity, above=floor)
    k = int((flagged >= choice["threshold"]).sum())
    return choice, sweep, {"normal_fp_limit": limit, "normal_fp_rate": k / len(normals),
                           "normal_fp_upper": normal_fp_upper(k, len(normals)), "n_normal": len(normals)}


def _least_mae_under_limit(p_normal: np.ndarray, shares: np.ndarray, zone: ZoneRows,
                           cls: tuple[np.ndarray, np.ndarray], limit: float, start: float) -> tuple[dict, dict]:
    """The (T_cls, T) pair of least score MAE on the zone rows among those at which the Normals'
    FP rate meets ``limit``, T_cls at ``start`` (the operating point chosen without the limit) or
    above: the limit only tightens it. Ties: the lower RMSE (as :meth:`ZoneRows.sweep`), the higher
    F1, the smaller T, the lower T_cls.

    Returns:
        T_cls's operating point and T's sweep at that T_cls, with T the pair's."""
    points = cls_operating_points(*cls)
    points = {k: v[points["threshold"] >= start] for k, v in points.items()}
    most = most_false_positives(len(p_normal), limit, len(p_normal))
    flags = (shares[None, :] >= ZONE_GRID[:, None]).astype(np.float32)  # G x Normals
    passing = (p_normal[None, :] >= points["threshold"][:, None]).astype(np.float32)  # C x Normals
    feasible = passing @ flags.T <= most  # C x G
    if not feasible.any():
        raise CxrtuneError("no (T_cls, T) pair meets --normal-fp-limit on the --cls-split Normals")
    mae, rmse = (np.where(feasible, np.round(e, 12), np.inf) for e in zone.error_surfaces(points["threshold"]))
    shape, grid = mae.shape, len(ZONE_GRID)
    c, g = np.unravel_index(np.lexsort((np.repeat(points["threshold"], grid), np.broadcast_to(ZONE_GRID, shape).ravel(),
                                        -np.repeat(np.round(points["f1"], 12), grid), rmse.ravel(), mae.ravel()))[0],
                            shape)
    choice = _operating_point(points, int(c))
    sweep = zone.sweep(choice["threshold"])
    at = next(row for row in sweep["curve"] if row["threshold"] == float(ZONE_GRID[g]))
    return choice, {**sweep, "threshold": at["threshold"], "mae": at["mae"], "rmse": at["rmse"]}


def calibrate(scorer: Scorer, df: pd.DataFrame, options: CalibrateOptions = CalibrateOptions()) -> CalibrationResult:
    """The three thresholds, in this order, each with its provenance
    (:class:`~cxrtune.model.artifacts.Calibration`), and the plausibility check's appearance and
    view models.

    * T_cls on the labelled rows of ``cls_split`` (validation data) at the operating point:
      maximum F1, or ``specificity``. Skipped (kept as it is) when those rows hold no labels.
    * The opacity threshold on Stage II's probability map, by maximum mean Dice over the
      ``cls_split`` rows whose reference opacity mask is not empty, refined with the new T_cls
      (0.5 under-segments a model trained with a focal loss). Skipped when there are none.
    * Zone T by minimum score MAE (seed 004) on the rows of ``split`` against ``reference``: a
      reader's grades (``reader:S``), the ``zone_*`` columns or the mask-derived reference
      (``masks``); ``auto`` takes a reader if the manifest has exactly one, else zone columns,
      else masks. Never the test split. Refinement uses the new T_cls and opacity threshold.
    * With ``normal_fp_limit``: the ``cls_split`` Normal images' FP rate (score > 0) at the
      chosen thresholds must have a one-sided 95 % upper bound <= the limit. Where it does not,
      T_cls and T are chosen together: the pair of least score MAE on the ``split`` rows among
      those that meet it (:func:`_least_mae_under_limit`). The opacity cut is kept (it is chosen on
      the disease images; its stored Dice is at the final T_cls).
    * The appearance model (:func:`~.plausibility.fit_appearance`) on the ``cls_split`` rows with
      lungs; none below ``MIN_APPEARANCE_IMAGES`` of them. With ``not_frontal``, the view model
      (:func:`~.plausibility.fit_view`) of those rows against the not-frontal radiographs
      (:func:`not_frontal_vectors`), which are not read when there are too few of those rows.

    The ``cls_split`` rows go through both stages once for the first two; the ``split`` rows are
    scored once, unrefined, for T (T_cls is applied to the stored probabilities). The scorer
    passed in is left as it was."""
    split, cls_split, reference, what = options.split, options.cls_split, options.reference, options.what
    limit, progress, reference_threshold = options.limit, options.progress, options.reference_threshold

    not_frontal = expand_inputs(list(options.not_frontal)) if options.not_frontal else []  # a wrong path fails now
    zone_rows = pick_rows(df, split, limit) if "zone" in what else df.iloc[:0]
    _refuse_test_rows("zone", split, zone_rows)
    cls_rows = _validation_rows(df, options)
    cache = storage.ContentCache()
    reference = resolve_reference(reference, manifest.readers_in(df), what)
    out: dict = {}
    probs, opacity_stats, looks, normals = [], [], [], []
    cuts = sorted({*OPACITY_GRID.tolist(), scorer.thresholds.opacity})  # the opacity cut is one of these
    for row, image, lung, prob, p in stage2_maps(scorer, cls_rows, cache, progress):
        if "appearance" in what:
            looks.append(appearance_vector(image, lung))
        if manifest.is_labelled(row["label"]):
            probs.append((p, int(manifest.is_disease(row["label"]))))
            if options.normal_fp_limit is not None and not manifest.is_disease(row["label"]):
                normals.append((p, max_zone_shares(lung, prob, cuts)))
        if "opacity" in what and row.get("opacity_mask", ""):
            ref = _resized(images.read_mask(row["opacity_mask"], cache), image.shape)
            if ref.any():
                pred = [(prob >= t) & lung for t in OPACITY_GRID]
                opacity_stats.append((p, np.array([(m & ref).sum() for m in pred], float),
                                      np.array([m.sum() for m in pred], float), int(ref.sum())))
    if "appearance" in what:
        out["appearance"] = fit_appearance(np.array(looks)) if looks else None
        out["appearance_images"] = len(looks)
    if not_frontal:
        out["not_frontal_files"] = len(not_frontal)
        if len(looks) >= MIN_APPEARANCE_IMAGES:  # else no view model can be fitted: Stage I is spared them
            others = not_frontal_vectors(scorer, not_frontal, progress)
            out["not_frontal_images"] = len(others)
            out["view"] = fit_view(np.array(looks), np.array(others))
    cls_choice, fp = None, None
    cls_labels = (np.array([p for p, _ in probs], float), np.array([y for _, y in probs], int))
    if "cls" in what and probs:
        cls_choice = choose_cls_threshold(*cls_labels, specificity=options.specificity)
    if options.normal_fp_limit is not None:  # refused now, before the zone rows are scored
        if not normals or cls_choice is None:
            raise CxrtuneError(f"--normal-fp-limit needs labelled Normal and disease images with lungs in "
                               f"--cls-split {cls_split or 'all'!r}")
        most_false_positives(len(normals), options.normal_fp_limit, 0)  # enough Normals to show the limit?
    t_cls = cls_choice["threshold"] if cls_choice else scorer.thresholds.cls
    if opacity_stats:
        choice = choose_opacity_threshold(opacity_stats, t_cls)
        scorer = scorer.with_thresholds(opacity=choice["threshold"])  # the zone rows below are refined with it
    zone_rows_seen = (_zone_rows(scorer, zone_rows, cache, reference, reference_threshold, progress)
                      if "zone" in what else None)
    if options.normal_fp_limit is not None:  # chooses T too (as without the limit, where that meets it)
        cls_choice, sweep, fp = _under_normal_fp_limit(
            normals, cuts.index(scorer.thresholds.opacity), zone_rows_seen or scorer.thresholds.zone, cls_labels,
            options.normal_fp_limit, options.specificity)
        t_cls = cls_choice["threshold"]
    else:
        sweep = zone_rows_seen.sweep(t_cls) if zone_rows_seen is not None else None
    if cls_choice is not None:
        out["cls"] = Calibration(threshold=t_cls, method="specificity" if options.specificity is not None else "max_f1",
                                 reference="labels", n=len(probs), manifest=manifest_id(df),
                                 split=cls_split or "all", f1=cls_choice["f1"], specificity=cls_choice["specificity"],
                                 sensitivity=cls_choice["sensitivity"], target=options.specificity, created=now(),
                                 **(fp or {}))
    if opacity_stats:
        out["opacity_curve"] = choose_opacity_threshold(opacity_stats, t_cls)["curve"]  # at the final T_cls
        dice = next(c["dice"] for c in out["opacity_curve"] if c["threshold"] == scorer.thresholds.opacity)
        out["opacity"] = Calibration(threshold=scorer.thresholds.opacity, method="max_dice", reference="masks",
                                     n=len(opacity_stats), manifest=manifest_id(df), split=cls_split or "all",
                                     dice=dice, created=now())
    if sweep is not None and zone_rows_seen is not None:
        out["zone"] = Calibration(threshold=sweep["threshold"], method="min_mae", reference=zone_rows_seen.reference,
                                  n=sweep["n"], manifest=manifest_id(df), split=split or "all", mae=sweep["mae"],
                                  rmse=sweep["rmse"], created=now())
        out["curve"] = sweep["curve"]
    return CalibrationResult(**out)


def not_frontal_vectors(scorer: Scorer, uris: list[str], progress: bool) -> list[np.ndarray]:
    """The :func:`~.plausibility.appearance_vector` of each not-frontal radiograph whose lungs
    Stage I finds. Read without the DICOM header rules (a lateral's ViewPosition refuses it for
    scoring), but a DICOM whose ViewPosition says PA or AP is left out: a frontal film among a PACS
    export's laterals would teach the model that frontal films are not. Read straight from storage
    (no local copy: PACS files carry identifiers). Each one left out is logged by its row, its
    place among ``uris``, never by path."""
    vectors: list[np.ndarray] = []
    rows = pd.DataFrame({"image": uris})
    for pending in batched_scans(rows, storage, scorer.batch_size, "not-frontal", progress, header_rules=False,
                                 kind="--not-frontal"):
        scans = []
        for row, scan in pending:
            if scan.dicom is not None and scan.dicom.view in FRONTAL_VIEWS:
                log.warning("--not-frontal row %d left out: a frontal film by its header (ViewPosition %s)", row.name,
                            scan.dicom.view)
            else:
                scans.append((row.name, scan))
        lungs = scorer.lung_masks([scan.image for _, scan in scans]) if scans else []
        for (i, scan), lung in zip(scans, lungs):
            if has_lungs(lung):
                vectors.append(appearance_vector(scan.image, lung))
            else:
                log.warning("--not-frontal row %d left out: Stage I found no lungs", i)
    return vectors


@dataclass(frozen=True)
class BundleCalibration:
    """:func:`calibrate_bundle`'s outcome: the result, the thresholds that moved while T stayed
    (T was chosen on records made with their old values: recalibrate it), and the source's
    plausibility models not carried over."""
    result: CalibrationResult
    stale_zone_threshold_after: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()  # the source's plausibility models that a refit replaced with none
    stale_normal_fp: bool = False  # T_cls kept its FP rate on Normal while the opacity cut or T moved

    def lines(self, what: tuple[str, ...]) -> list[tuple[str, bool]]:
        """What ``cxrtune calibrate`` says: (line, to stderr) per threshold or plausibility model
        chosen, or left as it was of those asked for (``what``), the models not carried over, and a
        warning when T is stale."""
        c, o, z = self.result.cls, self.result.opacity, self.result.zone
        lines: list[tuple[str, bool]] = []
        if c:
            lines.append((f"T_cls {c.threshold:.3f} ({c.method}): F1 {c.f1:.3f}, specificity {c.specificity:.3f}, "
                          f"sensitivity {c.sensitivity:.3f} on {c.n} labelled images", False))
            if c.normal_fp_limit is not None:
                lines.append((f"  FP rate on Normal {c.normal_fp_rate:.3f} on {c.n_normal} Normal images at the final "
                              f"thresholds, one-sided 95 % upper bound {c.normal_fp_upper:.3f} <= limit "
                              f"{c.normal_fp_limit}", False))
        elif "cls" in what:
            lines.append(("T_cls unchanged: no labelled normal and disease images in --cls-split", True))
        if o:
            lines.append((f"opacity threshold {o.threshold:.2f} ({o.method}): mean Dice {o.dice:.3f} on {o.n} images "
                          "with opacity", False))
        elif "opacity" in what:
            lines.append(("opacity threshold unchanged: no image in --cls-split has a non-empty opacity mask", True))
        if z:
            lines.append((f"zone threshold T {z.threshold:.2f} against {z.reference}: score MAE {z.mae:.3f}, "
                          f"RMSE {z.rmse:.3f} on {z.n} images", False))
        a = self.result.appearance
        if a is not None:
            lines.append((f"appearance model: {len(a.variances)} components of {a.n} validation images, limits "
                          f"{a.limits[0]:.2f} (residual) and {a.limits[1]:.2f} (distance)", False))
        elif "appearance" in what:
            lines.append((f"appearance model not fitted: {self.result.appearance_images} --cls-split image(s) with "
                          f"lungs, {MIN_APPEARANCE_IMAGES} needed; the check keeps its nine ranges only", True))
        v, r = self.result.view, self.result
        skipped = r.not_frontal_files - (r.not_frontal_images or 0)
        if v is not None:
            lines.append((f"view model: {v.n_frontal} validation images against {v.n_not_frontal} not-frontal ones "
                          f"(limit {v.limit[0]:.2f}; in cross-validation it refuses {v.cv_refused[0]:.0%} of the "
                          f"not-frontal ones); {skipped} not-frontal file(s) skipped (unread, frontal by their "
                          "header, or no lungs found)", False))
        elif r.not_frontal_files and r.not_frontal_images is None:
            lines.append((f"view model not fitted: {r.appearance_images} validation image(s) with lungs, "
                          f"{MIN_APPEARANCE_IMAGES} needed; the --not-frontal files were not read", True))
        elif r.not_frontal_files:
            lines.append((f"view model not fitted: {r.not_frontal_images} not-frontal image(s) with lungs "
                          f"({skipped} of {r.not_frontal_files} file(s) skipped), {MIN_NOT_FRONTAL_IMAGES} needed", True))
        if self.dropped:
            lines.append((f"not carried over from the source bundle: {', '.join(self.dropped)} (fitted on other rows, "
                          "and not refitted here)", True))
        moved = {"cls": "T_cls", "opacity": "the opacity threshold"}
        if self.stale_zone_threshold_after:  # T was chosen on records made with the old values
            lines.append((f"warning: {' and '.join(moved[m] for m in self.stale_zone_threshold_after)} changed but "
                          "T did not: T was calibrated with the old value(s); recalibrate it (--what zone, or the "
                          "default cls,opacity,zone)", True))
        if self.stale_normal_fp:
            lines.append(("warning: T_cls's stored FP rate on Normal was measured at the old opacity cut and T, which "
                          "changed: recalibrate cls with --normal-fp-limit to hold the limit again", True))
        return lines


def calibrate_bundle(uri: str, out_uri: str, df: pd.DataFrame, options: CalibrateOptions = CalibrateOptions(),
                     device: str | None = None) -> BundleCalibration:
    """``cxrtune calibrate``: :func:`calibrate` the bundle at ``uri`` on ``df`` and publish a new
    bundle at ``out_uri`` with the chosen thresholds and their provenance (bundles are immutable:
    the one at ``uri``, perhaps being served, is left as it was). With ``appearance`` in
    ``what``, the plausibility models are refitted: one not fitted again (too few images, or the
    view model without ``not_frontal``) is not carried over from the source."""
    require_new_bundle(out_uri)  # before the work, not after it
    scorer = load_bundle(uri, device=device)
    before = {"cls": scorer.thresholds.cls, "opacity": scorer.thresholds.opacity, "zone": scorer.thresholds.zone}
    result = calibrate(scorer, df, options)
    moved = tuple(name for name in ("cls", "opacity", "zone")
                  if getattr(result, name) is not None and getattr(result, name).threshold != before[name])
    kept_cls = scorer.thresholds.cls_calibration if result.cls is None else None
    stale_fp = bool(kept_cls and kept_cls.normal_fp_limit is not None and {"opacity", "zone"} & set(moved))
    # refitting the plausibility models replaces the source's: one not fitted again is not carried over
    refit = ((APPEARANCE_FILE, result.appearance), (VIEW_FILE, result.view)) if "appearance" in options.what else ()
    dropped = tuple(name for name, model in refit if model is None and name in read_bundle_meta(uri).files)
    derive_bundle(uri, out_uri, extra=result.bundle_contents(), drop=dropped, **result.bundle_changes())
    return BundleCalibration(result, tuple(m for m in moved if m != "zone") if result.zone is None else (), dropped,
                             stale_fp)


@dataclass(frozen=True)
class EvaluationResult:
    """What :func:`evaluate` measured: metrics.json's content, field by field (docs/scoring.md).
    ``score``, ``zones``, ``status_by_label`` and ``readers`` are None (and absent from the file)
    when there was nothing to measure them on."""
    n_images: int
    n_read: int
    split: str | None
    zone_threshold: float
    cls_threshold: float
    models: dict
    status: dict[str, int]
    lung: dict
    opacity: dict
    classification: dict | None
    normal_score_fp_rate: float | None
    n_normal: int
    score: dict | None = None
    zones: dict | None = None
    status_by_label: dict | None = None
    readers: dict | None = None

    def to_dict(self) -> dict:
        optional = ("score", "zones", "status_by_label", "readers")
        return {k: v for k, v in asdict(self).items() if not (k in optional and v is None)}


@dataclass(frozen=True)
class EvaluateOptions:
    """What :func:`evaluate` measures and on what; the defaults are ``cxrtune evaluate``'s.

    Args:
        split: rows to evaluate (comma-separated splits; ``all``/None: every row).
        reference_threshold: T of the mask-derived reference.
        limit: rows at most (a stratified sample).
        by: manifest columns to break the reader figures down by.
        cv_reference: a reader id: T is cross-validated against that reader (the same set chose it).
        folds: folds of that cross-validation.
        n_boot: bootstrap resamples of the 95 % intervals."""
    split: str | None = "test"
    reference_threshold: float = DEFAULT_ZONE_THRESHOLD
    limit: int | None = None
    by: tuple[str, ...] = ()
    cv_reference: str | None = None
    folds: int = 5
    n_boot: int = 2000
    progress: bool = True


def evaluate(scorer: Scorer, df: pd.DataFrame, out_dir: str,
             options: EvaluateOptions = EvaluateOptions()) -> EvaluationResult:
    """Metrics JSON and plots: lung Dice, opacity Dice/IoU over non-empty references and the
    false-positive rate on annotated-empty ones, classification metrics, the share of Normal
    images with a score > 0, record statuses, score MAE/RMSE/rho/kappa against the mask or zone
    reference with the predicted-vs-reference density heatmap (seed 004 Fig. 9) and per-zone
    confusion, and, where the manifest has reader grades, agreement with each reader (and
    reader against reader) with 95 % bootstrap intervals, overall and ``by`` manifest columns.

    ``cv_reference`` (a reader id): the same set also chooses T, so the reader figures are
    cross-validated: T chosen by minimum MAE against that reader on the other ``folds``."""
    split, reference_threshold, progress = options.split, options.reference_threshold, options.progress
    cache = storage.ContentCache()
    rows = pick_rows(df, split, options.limit)
    lung_meter, opac_meter = SegmentationMeter(), SegmentationMeter()
    probs, labels, pred_zones, ref_zones, records, errors = [], [], [], [], [], []
    unclassified: list[int] = []  # labelled images Stage II never classified (1: disease)
    statuses = {s: 0 for s in STATUSES}
    reader_rows, reader_fracs, not_scored_rows = [], [], []
    for row, img, record, detail in score_rows(scorer, rows, cache, progress):
        statuses[record["status"]] += 1
        if row.get("lung_mask", ""):
            lung_meter.update(detail.lung, _resized(images.read_mask(row["lung_mask"], cache), img.shape))
        if row.get("opacity_mask", ""):
            opac_meter.update(detail.opacity, _resized(images.read_mask(row["opacity_mask"], cache), img.shape))
        if manifest.is_labelled(row["label"]) and record["disease_probability"] is not None:
            probs.append(record["disease_probability"])
            labels.append(int(manifest.is_disease(row["label"])))
        elif manifest.is_labelled(row["label"]):
            unclassified.append(int(manifest.is_disease(row["label"])))
        ref = reference_zones(row, reference_threshold, cache)
        error = score_error(record, int(np.sum(ref))) if ref is not None else None
        if error is not None:
            errors.append(error)
        if ref is not None and record["status"] == "scored":
            pred_zones.append([int(record["zones"][z]["affected"]) for z in zones.ZONE_LETTERS])
            ref_zones.append(ref)
        if record["status"] == "scored":
            reader_rows.append(row.name)
            reader_fracs.append(zone_fractions(record))
        else:
            not_scored_rows.append(row.name)
        records.append({"row": row.name, "label": row["label"], "status": record["status"], "score": record["score"],
                        "opacity_percent": record["opacity_percent"],
                        "disease_probability": record["disease_probability"],
                        "reference_score": None if ref is None else int(np.sum(ref)), "error": error})
    table = pd.DataFrame(records)
    normal = table[table["label"] == "normal"] if len(table) else table
    score: dict | None = None
    zone_accuracy = None
    if ref_zones:
        p, r = np.array(pred_zones), np.array(ref_zones)
        score = agreement.score_agreement(p.sum(axis=1), r.sum(axis=1), n_boot=0)  # the scored records
        zone_accuracy = {z: {"accuracy": float((p[:, i] == r[:, i]).mean())} for i, z in enumerate(zones.ZONE_LETTERS)}
        _plots(p, r, out_dir)
    if errors:  # every record with a reference; partial/unscored as the worst error (score_error)
        score = {**(score or {}), "mae_counting_not_scored": float(np.mean(errors)), "n_counted": len(errors)}
    readers = manifest.readers_in(df)
    result = EvaluationResult(
        n_images=len(rows), n_read=len(table), split=split, zone_threshold=scorer.thresholds.zone,
        cls_threshold=scorer.thresholds.cls, models=scorer.models_info(), status=statuses,
        lung=lung_meter.result(), opacity=opac_meter.result(),
        classification=_classification(probs, labels, unclassified, scorer.thresholds.cls),
        normal_score_fp_rate=normal_fp_rate(normal["score"]) if len(normal) else None,
        n_normal=int(len(normal)), score=score, zones=zone_accuracy,
        status_by_label=({str(k): {str(s): int(n) for s, n in g["status"].value_counts().items()}
                          for k, g in table.groupby("label")} if len(table) else None),
        readers=(_reader_figures(df.loc[reader_rows], np.array(reader_fracs), scorer.thresholds.zone, readers,
                                 options.by, options.cv_reference, options.folds, options.n_boot, out_dir,
                                 not_scored=df.loc[not_scored_rows]) if readers and reader_rows else None))
    storage.write_text(storage.join(out_dir, "metrics.json"), json.dumps(json_safe(result.to_dict()), indent=2))
    storage.write_text(storage.join(out_dir, "scores.csv"), table.to_csv(index=False))
    return result


def _classification(probs: list[float], labels: list[int], unclassified: list[int], threshold: float) -> dict | None:
    """Classification at T_cls over the images Stage II classified, with ``n`` and
    ``n_not_classified``, and ``counting_not_classified``: the same with each labelled image left
    unscored counted wrong (a disease image as normal, a normal one as disease), the rule of
    ``mae_counting_not_scored``: the images a model fails on are often the sick ones (white-out lungs)."""
    if not probs and not unclassified:
        return None
    out = {**(classification_metrics(np.array(probs), np.array(labels), threshold) if probs else {}),
           "n": len(probs), "n_not_classified": len(unclassified)}
    worst = [0.0 if disease else 1.0 for disease in unclassified]
    out["counting_not_classified"] = classification_metrics(np.array(probs + worst), np.array(labels + unclassified),
                                                            threshold)
    return out


@dataclass(frozen=True)
class BundleEvaluation:
    """:func:`evaluate_bundle`'s outcome: what was measured (metrics.json), the one-line summary
    the CLI prints, and a note on how T relates to the evaluated rows (None when it does not)."""
    metrics: EvaluationResult
    summary: dict
    note: str | None = None


def evaluation_mode(uri: str, df: pd.DataFrame, options: EvaluateOptions) -> tuple[EvaluateOptions, str | None]:
    """In-sample or cross-validated: when T was calibrated against a reader on these very rows,
    the reader figures are cross-validated against that reader (in-sample figures would flatter
    T); when it was calibrated on them against another reference, a warning says the score
    figures are in-sample. Returns the options to evaluate with and the note to show."""
    cal = read_bundle_meta(uri).zone_calibration
    if not cal or cal.manifest != manifest_id(df) or not same_rows(cal.split, options.split):
        return options, None
    if not options.cv_reference and cal.reference.startswith("reader:"):
        return (replace(options, cv_reference=cal.reference),
                f"T was calibrated on these rows: reader figures are cross-validated against {cal.reference}")
    return options, (f"warning: T was calibrated on these rows against the {cal.reference} reference: the score "
                     "figures against it are in-sample (evaluate another split, e.g. --split test)")


def evaluation_summary(metrics: EvaluationResult) -> dict:
    """The headline figures of an evaluation: what ``cxrtune evaluate`` prints."""
    score = metrics.score or {}
    summary = {"status": metrics.status, "lung_dice": metrics.lung.get("dice"),
               "opacity_dice": metrics.opacity.get("dice"), "f1": (metrics.classification or {}).get("f1"),
               "normal_score_fp_rate": metrics.normal_score_fp_rate, "score_mae": score.get("mae"),
               "score_mae_counting_not_scored": score.get("mae_counting_not_scored")}
    readers = metrics.readers or {}
    for reader, figures in (readers.get("readers", {}) or {}).items():
        summary[f"mae_vs_{reader}"] = figures.get("score", {}).get("mae")
        summary[f"mae_vs_{reader}_counting_not_scored"] = readers["mae_counting_not_scored"].get(reader)
    return json_safe(summary)


def evaluate_bundle(uri: str, df: pd.DataFrame, out_dir: str, options: EvaluateOptions = EvaluateOptions(),
                    device: str | None = None, batch_size: int = 8) -> BundleEvaluation:
    """``cxrtune evaluate``: the bundle at ``uri`` on ``df``, in the mode :func:`evaluation_mode`
    chooses; writes metrics.json, scores.csv and the plots to ``out_dir``."""
    options, note = evaluation_mode(uri, df, options)
    metrics = evaluate(load_bundle(uri, device=device, batch_size=batch_size), df, out_dir, options)
    return BundleEvaluation(metrics, evaluation_summary(metrics), note)



def _reader_figures(rows: pd.DataFrame, fractions: np.ndarray, threshold: float, readers: list[str],
                    by: tuple[str, ...], cv_reference: str | None, folds: int, n_boot: int, out_dir: str,
                    not_scored: pd.DataFrame | None = None) -> dict:
    """The agreement figures are over the scored records, each comparison over the images both of
    its sides graded (one reader's gaps never take images from another reader's figures); under
    ``cv_reference`` over the images that reader graded (the only ones the cross-validation
    predicts). ``mae_counting_not_scored`` adds the partial/unscored images each reader graded, at
    the worst error for that reader's score (:func:`score_error`)."""
    missing = [c for c in by if c not in rows.columns]
    if missing:
        raise CxrtuneError(f"--by {', '.join(missing)}: no such manifest column")
    grades = manifest.reader_grades(rows)
    info: dict = {}
    if cv_reference:
        reader = cv_reference.split(":", 1)[-1]
        if reader not in grades:
            raise CxrtuneError(f"--cv-reference {cv_reference!r}: the manifest's readers are {', '.join(readers)}")
        keep = np.all(grades[reader] >= 0, axis=1)
        rows, fractions, grades = rows[keep], fractions[keep], {r: g[keep] for r, g in grades.items()}
        if len(fractions) < 2 * folds:
            raise CxrtuneError(f"cross-validation over {folds} folds needs at least {2 * folds} scored images "
                               f"graded by {reader}; {len(fractions)} here (use --folds)")
        # a patient's several films are held out together, or T is chosen on their twins
        by_patient = "patient_id" in rows.columns and rows["patient_id"].astype(str).duplicated().any()
        fold_ids = patient_folds(rows, (grades[reader] > 0).sum(axis=1), folds, seed=0) if by_patient else None
        pred, thresholds = agreement.cross_validated_predictions(fractions, grades[reader] > 0, folds=folds,
                                                                 fold_ids=fold_ids)
        info.update(threshold="cross-validated", cv_reference=reader, cv_folds=folds,
                    cv_folds_by="patient" if by_patient else "image", cv_thresholds=[float(t) for t in thresholds])
    else:
        pred = fractions >= threshold
        info["threshold"] = threshold
    graded = {r: np.all(g >= 0, axis=1) for r, g in grades.items()}
    info.update(n=int(len(rows)), n_incomplete_grades={r: int((~graded[r]).sum()) for r in readers})
    info.update(agreement.reader_report(pred, grades, groups=rows.reset_index(drop=True), by=list(by), n_boot=n_boot))
    agreement.plot_reader_agreement(pred, grades, out_dir)
    score = (pred > 0).sum(axis=1)
    reader_scores = {r: (grades[r] > 0).sum(axis=1) for r in readers}  # read only where graded[r]
    per_image = pd.DataFrame({"row": rows.index, "score": score,  # a reader's score is empty where it did not grade
                              **{f"reader_{r}": pd.Series(reader_scores[r], dtype="Int64").mask(~graded[r]).to_numpy()
                                 for r in readers}})
    # what a paired comparison of two bundles reads
    storage.write_text(storage.join(out_dir, "reader_scores.csv"), per_image.to_csv(index=False))
    missed = manifest.reader_grades(not_scored) if not_scored is not None and len(not_scored) else {}
    info["n_not_scored"] = int(len(not_scored)) if not_scored is not None else 0
    info["mae_counting_not_scored"] = {}
    for reader in readers:
        err = list(np.abs(score - reader_scores[reader])[graded[reader]])
        if reader in missed:
            g = missed[reader][np.all(missed[reader] >= 0, axis=1)]
            err += [score_error({"status": "unscored"}, int(r)) for r in (g > 0).sum(axis=1)]
        info["mae_counting_not_scored"][reader] = float(np.mean(err)) if err else None
    return info


def _plots(pred: np.ndarray, ref: np.ndarray, out_dir: str) -> None:
    plt = pyplot()

    density = np.zeros((7, 7))
    for a, b in zip(ref.sum(axis=1), pred.sum(axis=1)):
        density[int(b), int(a)] += 1
    fig, ax = plt.subplots(figsize=(5, 4.5))
    im = ax.imshow(density / max(density.sum(), 1), origin="lower", cmap="viridis")
    for (y, x), n in np.ndenumerate(density):
        if n:
            ax.text(x, y, int(n), ha="center", va="center", color="w", fontsize=8)
    ax.set(xlabel="reference score", ylabel="predicted score", title="Severity score density",
           xticks=range(7), yticks=range(7))
    fig.colorbar(im, ax=ax, label="share of images")
    save_figure(fig, storage.join(out_dir, "score_density.png"))
    fig, axes = plt.subplots(2, 3, figsize=(8, 5.5))
    for i, (z, ax) in enumerate(zip(zones.ZONE_LETTERS, axes.ravel())):
        cm = np.zeros((2, 2), int)
        for a, b in zip(ref[:, i], pred[:, i]):
            cm[a, b] += 1
        ax.imshow(cm, cmap="Blues")
        for (y, x), n in np.ndenumerate(cm):
            ax.text(x, y, n, ha="center", va="center")
        ax.set(title=f"zone {z}", xticks=[0, 1], yticks=[0, 1], xlabel="predicted", ylabel="reference")
    fig.tight_layout()
    save_figure(fig, storage.join(out_dir, "zone_confusion.png"))


