"""How well the 0-6 score agrees with radiologists, and how well radiologists agree with each other.

A score MAE means little on its own: two radiologists grading the same BrixIA images differ by
about one zone on average. This module puts the model's agreement with each reader next to that
human yardstick (reader against reader) and a no-skill baseline (the best constant score), with
bootstrap intervals over images because the calibration sets are small (tens of images).

The zone threshold T must be chosen without the images it is judged on, or the agreement is
optimistic: :func:`cross_validated_predictions` picks T on the other folds only.

Pure numpy/pandas/matplotlib (plus scipy and scikit-learn); no torch.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Sequence

import numpy as np
import pandas as pd

from .. import storage
from ..jsonsafe import json_safe
from ..plots import pyplot, save_figure
from ..zones import ZONE_LETTERS
from .scorer import sweep_threshold

MIN_GROUP = 5  # smaller subgroups are skipped: a bootstrap over 4 images says nothing
SCORE_LABELS = np.arange(7)


# ----------------------------------------------------------------------------- cross-validated T

def stratified_folds(scores: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Fold id per image, loosely stratified by score: images sorted by score (random order
    within a score) and dealt round-robin, so every fold sees the whole score range."""
    scores = np.asarray(scores)
    n = len(scores)
    folds = max(2, min(int(folds), n))
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    order = order[np.argsort(scores[order], kind="stable")]
    offset = rng.integers(folds)
    fold_of = np.empty(n, int)
    fold_of[order] = (np.arange(n) + offset) % folds
    return fold_of


def cross_validated_predictions(fractions: np.ndarray, ref_zones: np.ndarray, folds: int = 5, seed: int = 0,
                                fold_ids: np.ndarray | None = None) -> tuple[np.ndarray, list[float]]:
    """Held-out zone predictions: each fold is thresholded with the T that
    :func:`cxrtune.scoring.scorer.sweep_threshold` chose on the other folds only.

    ``fractions``: N x 6 opacity fractions; ``ref_zones``: N x 6 grades (0-3) or 0/1, affected =
    grade > 0. Folds are by image (pass ``fold_ids`` for patient-level folds). Returns the N x 6
    bool predictions and the threshold used for each fold, in fold order.
    """

    fractions = np.asarray(fractions, float)
    ref = _binary_zones(ref_zones, "ref_zones")
    if fractions.shape != ref.shape:
        raise ValueError(f"fractions {fractions.shape} and ref_zones {ref.shape} differ in shape")
    fold_of = (stratified_folds(ref.sum(axis=1), folds, seed) if fold_ids is None
               else np.asarray(fold_ids).astype(int))
    if len(fold_of) != len(ref):
        raise ValueError(f"fold_ids has {len(fold_of)} entries for {len(ref)} images")
    pred = np.zeros(ref.shape, bool)
    thresholds = []
    for k in np.unique(fold_of):
        held, train = fold_of == k, fold_of != k
        if not train.any():
            raise ValueError("cross-validation needs at least two folds")
        t = sweep_threshold(fractions[train], ref[train].astype(int))["threshold"]
        pred[held] = fractions[held] >= t
        thresholds.append(float(t))
    return pred, thresholds


# ------------------------------------------------------------------------------------- statistics

def _binary_zones(zones: np.ndarray, what: str) -> np.ndarray:
    zones = np.asarray(zones)
    if zones.ndim != 2 or zones.shape[1] != 6:
        raise ValueError(f"{what} must be N x 6 (zones A-F), got shape {zones.shape}")
    if zones.dtype != bool and (zones < 0).any():
        raise ValueError(f"{what} has missing grades (< 0); drop those images first")
    return zones > 0


def _bootstrap(samples: Sequence[np.ndarray], statistic, n_boot: int, seed: int) -> list[list[float]]:
    """95 % percentile intervals of a vectorised, paired ``statistic`` (one row per output) over
    images, by :func:`scipy.stats.bootstrap`.

    Statistics such as kappa are undefined (NaN) on some resamples (one rater constant). scipy's
    interval is NaN as soon as one resample is, so the percentiles are taken over the finite
    resamples of its ``bootstrap_distribution``, as a reader of the interval would expect."""
    from scipy.stats import bootstrap

    n = len(samples[0])
    if n_boot <= 0 or n < 2:  # scipy needs two images and one resample; one image resamples to itself
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            point = np.atleast_1d(np.asarray(statistic(*[np.asarray(s)[None, :] for s in samples], axis=-1),
                                             float).reshape(-1))
        return [[float(v), float(v)] if n_boot > 0 and np.isfinite(v) else [float("nan")] * 2 for v in point]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant resamples: NaN is the answer, not a warning
        distribution = np.atleast_2d(bootstrap(
            tuple(samples), statistic, paired=True, vectorized=True, n_resamples=int(n_boot),
            method="percentile", random_state=np.random.default_rng(seed)).bootstrap_distribution)
    intervals = []
    for row in distribution:
        finite = row[np.isfinite(row)]
        intervals.append([float(v) for v in np.percentile(finite, [2.5, 97.5])] if len(finite)
                         else [float("nan")] * 2)
    return intervals


def _quadratic_kappa(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Quadratic weighted kappa over 0..6 along the last axis (same as scikit-learn's
    ``cohen_kappa_score(ref, pred, labels=range(7), weights="quadratic")`` on each row), vectorised
    because scikit-learn's is not and the bootstrap calls it on thousands of resamples.
    NaN where it is undefined (both raters use one and the same category)."""
    pred, ref = np.atleast_2d(pred), np.atleast_2d(ref)
    b, n = ref.shape
    k = len(SCORE_LABELS)
    flat = (np.arange(b)[:, None] * k * k + ref * k + pred).ravel()
    observed = np.bincount(flat, minlength=b * k * k).reshape(b, k, k).astype(float)
    expected = observed.sum(axis=2)[:, :, None] * observed.sum(axis=1)[:, None, :] / n
    i, j = np.meshgrid(SCORE_LABELS, SCORE_LABELS, indexing="ij")
    w = (i - j) ** 2 / (k - 1) ** 2
    num, den = (w * observed).sum(axis=(1, 2)), (w * expected).sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, 1 - num / den, np.nan)


def _spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rho along the last axis; NaN where one side is constant."""
    from scipy.stats import rankdata

    ra, rb = rankdata(np.atleast_2d(a), axis=-1), rankdata(np.atleast_2d(b), axis=-1)
    ra -= ra.mean(axis=-1, keepdims=True)
    rb -= rb.mean(axis=-1, keepdims=True)
    den = np.sqrt((ra ** 2).sum(axis=-1) * (rb ** 2).sum(axis=-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, (ra * rb).sum(axis=-1) / den, np.nan)


def _as_scores(scores: np.ndarray, what: str) -> np.ndarray:
    scores = np.asarray(scores, float).ravel()
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{what} has missing values")
    return np.clip(np.round(scores), 0, 6).astype(int)


SCORE_STATISTICS = ("mae", "rmse", "pearson", "spearman", "kappa_linear", "kappa_quadratic")
BOOTSTRAPPED_STATISTICS = ("mae", "rmse", "kappa_quadratic", "spearman")


def _bootstrapped_statistics(pred: np.ndarray, ref: np.ndarray, axis: int = -1) -> np.ndarray:
    """The rows of :data:`BOOTSTRAPPED_STATISTICS` for resamples along the last axis."""
    err = (pred - ref).astype(float)
    return np.stack([np.abs(err).mean(axis=axis), np.sqrt((err ** 2).mean(axis=axis)),
                     _quadratic_kappa(pred, ref).reshape(err.shape[:-1]),
                     _spearman(pred, ref).reshape(err.shape[:-1])])


def score_agreement(pred_scores: np.ndarray, ref_scores: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """How two 0-6 scores agree: the one function for it (evaluate's ``score`` block and every
    reader comparison).

    Args:
        pred_scores, ref_scores: one score per image; rounded and clipped to 0..6.
        n_boot: bootstrap resamples over images for the 95 % percentile intervals of MAE, RMSE,
            quadratic kappa and Spearman rho (``<stat>_ci``); 0 gives the point values only.
        seed: seed of the resampling.

    Returns:
        ``n`` and :data:`SCORE_STATISTICS` (MAE, RMSE, Pearson and Spearman rho, linear and
        quadratic weighted kappa over 0..6). Undefined statistics (a constant rater) are NaN: pass
        the result through :func:`cxrtune.jsonsafe.json_safe` before writing JSON.
    """
    from sklearn.metrics import cohen_kappa_score

    pred, ref = _as_scores(pred_scores, "pred_scores"), _as_scores(ref_scores, "ref_scores")
    if len(pred) != len(ref):
        raise ValueError(f"{len(pred)} predicted scores for {len(ref)} reference scores")
    n = len(ref)
    cis = {f"{k}_ci": [float("nan")] * 2 for k in BOOTSTRAPPED_STATISTICS} if n_boot else {}
    if n == 0:
        return {"n": 0, **{k: float("nan") for k in SCORE_STATISTICS}, **cis}
    err = (pred - ref).astype(float)
    both_vary = pred.std() > 0 and ref.std() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one category only: NaN is the answer, not a warning
        kappa = {w: float(cohen_kappa_score(ref, pred, labels=list(SCORE_LABELS), weights=w))
                 for w in ("linear", "quadratic")}
    out: dict = {"n": int(n), "mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean())),
                 "pearson": float(np.corrcoef(pred, ref)[0, 1]) if both_vary else float("nan"),
                 "spearman": float(_spearman(pred, ref)[0]),
                 "kappa_linear": kappa["linear"], "kappa_quadratic": kappa["quadratic"]}
    if n_boot:
        intervals = _bootstrap((pred, ref), _bootstrapped_statistics, n_boot, seed)
        out.update({f"{k}_ci": ci for k, ci in zip(BOOTSTRAPPED_STATISTICS, intervals)})
    return out


def zone_agreement(pred_zones: np.ndarray, ref_zones: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """Per zone A-F: agreement (share of images where affected = reference grade > 0), its 95 %
    bootstrap interval and the 2 x 2 confusion (rows reference 0/1, columns predicted 0/1);
    ``overall``: agreement over all image-zone pairs, bootstrapped over images."""
    pred, ref = _binary_zones(pred_zones, "pred_zones"), _binary_zones(ref_zones, "ref_zones")
    if pred.shape != ref.shape:
        raise ValueError(f"pred_zones {pred.shape} and ref_zones {ref.shape} differ in shape")
    n = len(ref)
    same = (pred == ref).astype(float)
    if n == 0:
        return {"n": 0, "zones": {}, "overall": {"agreement": float("nan"), "ci": [float("nan")] * 2}}

    def shares(*zone_columns: np.ndarray, axis: int = -1) -> np.ndarray:  # per zone, then overall
        per_zone = np.stack([c.mean(axis=axis) for c in zone_columns])
        return np.concatenate([per_zone, per_zone.mean(axis=0, keepdims=True)])

    intervals = _bootstrap(tuple(same.T), shares, n_boot, seed)
    per_zone = {}
    for i, z in enumerate(ZONE_LETTERS):
        cm = np.zeros((2, 2), int)
        np.add.at(cm, (ref[:, i].astype(int), pred[:, i].astype(int)), 1)
        per_zone[z] = {"agreement": float(same[:, i].mean()), "ci": intervals[i], "confusion": cm.tolist()}
    return {"n": int(n), "zones": per_zone, "overall": {"agreement": float(same.mean()), "ci": intervals[6]}}


def best_constant(ref_scores: np.ndarray) -> dict:
    """The no-skill baseline: the constant score c in 0..6 with the lowest MAE (ties: smaller c)."""
    ref = _as_scores(ref_scores, "ref_scores")
    maes = [float(np.abs(ref - c).mean()) if len(ref) else float("nan") for c in SCORE_LABELS]
    c = int(np.nanargmin(maes)) if len(ref) else 0
    return {"constant": c, "mae": maes[c]}


# ----------------------------------------------------------------------------------------- report

def _compare(pred_zones: np.ndarray, ref_grades: np.ndarray, groups: pd.DataFrame | None, by: Sequence[str],
             n_boot: int, seed: int, skipped: list[dict], name: str) -> dict:
    """Score and zone agreement of ``pred_zones`` (or another reader's grades) against ``ref_grades``,
    overall and per group; images where either side has a missing grade are left out."""
    pred_zones, ref_grades = np.asarray(pred_zones), np.asarray(ref_grades)
    ok = np.ones(len(ref_grades), bool)
    for z in (pred_zones, ref_grades):
        if z.dtype != bool:
            ok &= (z >= 0).all(axis=1)

    def stats(mask: np.ndarray) -> dict:
        p, r = pred_zones[mask] > 0, ref_grades[mask] > 0
        return {"n": int(mask.sum()),
                "score": score_agreement(p.sum(axis=1), r.sum(axis=1), n_boot, seed),
                "zones": zone_agreement(p, r, n_boot, seed)}

    out = {**stats(ok), "n_missing": int((~ok).sum())}
    if by:
        assert groups is not None  # checked by reader_report
        out["by"] = {}
        for col in by:
            values = groups[col].astype(object).where(groups[col].notna(), "").astype(str).to_numpy()
            out["by"][col] = {}
            for value in sorted(set(values[ok])):
                mask = ok & (values == value)
                if mask.sum() < MIN_GROUP:
                    skipped.append({"comparison": name, "by": col, "value": value, "n": int(mask.sum()),
                                    "reason": f"fewer than {MIN_GROUP} images"})
                    continue
                out["by"][col][value] = stats(mask)
    return out


def reader_report(pred_zones: np.ndarray, readers: dict[str, np.ndarray], groups: pd.DataFrame | None = None,
                  by: Sequence[str] = (), n_boot: int = 2000, seed: int = 0) -> dict:
    """The model against each reader and each reader against each other reader, side by side.

    ``pred_zones``: N x 6 bool; ``readers``: id -> N x 6 grades (0-3, -1 = missing, as from
    :func:`cxrtune.data.manifest.reader_grades`); ``groups``: a table aligned with the rows (e.g. the
    manifest) holding the ``by`` columns. Returns a JSON-safe dict:

    - ``readers[R]``: model vs reader R (score and zone agreement, overall and ``by`` group) and
      ``baseline``: the best constant score's MAE against R, the bar any model must clear;
    - ``pairs["X_vs_Y"]``: reader X against reader Y (Y as reference): the human yardstick;
    - ``skipped``: groups left out for having fewer than 5 images.
    """
    pred_zones = np.asarray(pred_zones)
    if pred_zones.ndim != 2 or pred_zones.shape[1] != 6:
        raise ValueError(f"pred_zones must be N x 6, got shape {pred_zones.shape}")
    n = len(pred_zones)
    for r, g in readers.items():
        if np.shape(g) != (n, 6):
            raise ValueError(f"reader {r}: grades of shape {np.shape(g)}, expected {(n, 6)}")
    by = list(by)
    if by:
        if groups is None:
            raise ValueError("by= needs groups (a table with those columns, one row per image)")
        missing = [c for c in by if c not in groups.columns]
        if missing:
            raise ValueError(f"groups has no column(s) {', '.join(missing)}")
        if len(groups) != n:
            raise ValueError(f"groups has {len(groups)} rows for {n} images")
        groups = groups.reset_index(drop=True)
    skipped: list[dict] = []
    report: dict = {"n_images": int(n), "readers": {}, "pairs": {}, "skipped": skipped}
    for r in sorted(readers):
        grades = np.asarray(readers[r])
        entry = _compare(pred_zones, grades, groups, by, n_boot, seed, skipped, f"model_vs_{r}")
        valid = (grades >= 0).all(axis=1)
        entry["baseline"] = best_constant((grades[valid] > 0).sum(axis=1))
        report["readers"][r] = entry
    for x, y in itertools.combinations(sorted(readers), 2):
        entry = _compare(np.asarray(readers[x]), np.asarray(readers[y]), groups, by, n_boot, seed, skipped,
                         f"{x}_vs_{y}")
        report["pairs"][f"{x}_vs_{y}"] = {"readers": [x, y], "reference": y, **entry}
    return json_safe(report)


# ------------------------------------------------------------------------------------------ plots

def plot_reader_agreement(pred_zones: np.ndarray, readers: dict[str, np.ndarray], out_dir: str) -> list[str]:
    """Write ``score_agreement.png`` (predicted vs reader 0-6 density, a panel per reader) and
    ``zone_agreement.png`` (agreement per zone; rows: the model vs each reader, then each reader
    pair) from the model's N x 6 affected zones. Returns the URIs written."""
    plt = pyplot()

    pred_zones = np.asarray(pred_zones)
    if pred_zones.ndim != 2 or pred_zones.shape[1] != 6:  # 0-6 scores alone would drop the model's zone rows
        raise ValueError(f"pred_zones must be N x 6 affected zones, got shape {pred_zones.shape}")
    pred_zones = pred_zones > 0
    scores = pred_zones.sum(axis=1)
    names = sorted(readers)
    written = []
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4.6 * max(len(names), 1), 4.2), squeeze=False)
    for ax, r in zip(axes[0], names):
        grades = np.asarray(readers[r])
        ok = (grades >= 0).all(axis=1)
        density = np.zeros((7, 7))
        np.add.at(density, (scores[ok], (grades[ok] > 0).sum(axis=1)), 1)
        im = ax.imshow(density / max(density.sum(), 1), origin="lower", cmap="viridis", vmin=0)
        for (y, x), count in np.ndenumerate(density):
            if count:
                ax.text(x, y, int(count), ha="center", va="center", color="w", fontsize=8)
        mae = np.abs(scores[ok] - (grades[ok] > 0).sum(axis=1)).mean() if ok.any() else float("nan")
        ax.set(xlabel=f"reader {r} score", ylabel="predicted score", title=f"vs {r} (n={ok.sum()}, MAE {mae:.2f})",
               xticks=range(7), yticks=range(7))
        fig.colorbar(im, ax=ax, label="share of images", fraction=0.046)
    fig.tight_layout()
    uri = storage.join(out_dir, "score_agreement.png")
    save_figure(fig, uri)
    written.append(uri)

    rows, labels = [], []
    comparisons = [(f"model vs {r}", pred_zones, readers[r]) for r in names]
    comparisons += [(f"{x} vs {y}", readers[x], readers[y]) for x, y in itertools.combinations(names, 2)]
    for label, a, b in comparisons:
        a, b = np.asarray(a), np.asarray(b)
        ok = (b >= 0).all(axis=1) & ((a >= 0).all(axis=1) if a.dtype != bool else True)
        rows.append(((a[ok] > 0) == (b[ok] > 0)).mean(axis=0) if ok.any() else np.full(6, np.nan))
        labels.append(label)
    fig, ax = plt.subplots(figsize=(6.5, 1.2 + 0.5 * max(len(rows), 1)))
    matrix = np.array(rows) if rows else np.full((1, 6), np.nan)
    im = ax.imshow(matrix, cmap="RdYlGn", vmin=0.5, vmax=1.0, aspect="auto")
    for (y, x), v in np.ndenumerate(matrix):
        if np.isfinite(v):
            ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set(xticks=range(6), xticklabels=[f"zone {z}" for z in ZONE_LETTERS], yticks=range(len(labels) or 1),
           yticklabels=labels or ["(no comparison)"], title="Zone agreement (affected = grade > 0)")
    fig.colorbar(im, ax=ax, label="agreement")
    fig.tight_layout()
    uri = storage.join(out_dir, "zone_agreement.png")
    save_figure(fig, uri)
    written.append(uri)
    return written
