"""Seed 000's cross-validation of grading recipes: patient-level K folds, subgroup tables,
Grad-CAM heatmaps in the image frame with their concordance with the lungs (HCS), left and right
heatmaps averaged, and the reports ``cxrtune grade cv`` writes."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace

import cv2
import numpy as np
import pandas as pd
import torch

from .. import storage, zones
from ..data.manifest import without_eval_only
from ..data.splits import patient_folds
from ..errors import CxrtuneError
from ..images import read_image, read_mask
from ..jsonsafe import json_safe
from ..model.classify import fit_classifier, predict
from ..model.grading import (
    CV_SUMMARY,
    GRADES,
    GradeConfig,
    flat_metrics,
    grade_labels,
    grade_metrics,
    load_grade_data,
    midline,
    subgroup_table,
)
from ..preprocessing import Preprocessing, to_uint8
from ..scoring.scorer import stage_one_lungs
from .heatmaps import average_heatmaps, concordance, heatmap_png, heatmaps
from .hide_and_seek import heatmap_rows

log = logging.getLogger(__name__)


def heatmap_in_image(heat: np.ndarray, shape: tuple[int, int], lung: np.ndarray | None, side: str,
                     roi: str) -> np.ndarray:
    """A side model's heatmap (at its input size) in the image's frame: over the whole image for
    ROI ``none``/``lung_masked``, over the side's half for ``split`` (0 on the other half), the
    inverse of :func:`grading_input`'s geometry. Left and right maps then average pixel by pixel."""
    h, w = shape
    if roi != "split":
        return cv2.resize(heat, (w, h), interpolation=cv2.INTER_LINEAR)
    x = midline(zones.split_lungs(lung), w) if lung is not None else w // 2
    out = np.zeros((h, w), np.float32)
    if side == "right":
        out[:, :x] = cv2.resize(heat, (x, h), interpolation=cv2.INTER_LINEAR)
    else:
        out[:, x:] = cv2.resize(heat, (w - x, h), interpolation=cv2.INTER_LINEAR)
    return out


def _reference_lungs(row: pd.Series, shape: tuple[int, ...]) -> np.ndarray | None:
    """A row's reference lung mask for its heatmap's HCS, or None where it has none that fits its
    image (ROI ``none`` trains without reading masks, so they are first read here)."""
    uri = row.get("lung_mask", "")
    if not (isinstance(uri, str) and uri):
        return None
    try:
        lung = read_mask(uri).astype(bool)
    except CxrtuneError as exc:  # by type only: the message may quote a path that names a patient
        log.warning("grading cross-validation: a heatmap's lung mask cannot be read (%s)", type(exc).__name__)
        return None
    return lung if lung.shape == tuple(shape) else None


def cross_validate(cfg: GradeConfig, df: pd.DataFrame, folds: int = 5, seed: int = 0,
                   by: tuple[str, ...] = (), heatmap_images: int = 8) -> dict:
    """Seed 000's patient-level K-fold cross-validation of one recipe on the non-test rows: each
    fold's model is trained on the other folds. Returns per-fold metrics, their mean and SD, the
    pooled out-of-fold metrics, subgroup tables ``by`` manifest columns, the out-of-fold
    predictions (``oof``: row, patient, fold, grade, predicted grade), and Grad-CAM heatmaps of
    ``heatmap_images`` held-out images (spread over the rows) in the image frame with their HCS
    against the lungs (``heatmaps``: manifest row -> (uint8 image, heatmap, lung mask))."""
    df = without_eval_only(df)
    if "split" in df.columns:
        df = df[df["split"] != "test"]  # the test split stays unseen
    for col in by:
        if col not in df.columns:
            raise CxrtuneError(f"no manifest column {col!r} for a subgroup table")
    find_lungs = stage_one_lungs(cfg.lung_bundle) if cfg.lung_bundle else None
    data = load_grade_data(grade_labels(df, read_mask), cfg.side, cfg.roi, cfg.size, find_lungs)
    fold = patient_folds(data.rows, data.grades, folds, seed)
    pre = Preprocessing(size=cfg.size, in_channels=cfg.classifier.in_channels)
    prob = np.zeros((len(data.grades), len(GRADES)), np.float32)
    per_fold, shown, maps = [], set(heatmap_rows(len(data.grades), heatmap_images).tolist()), {}
    for k in range(folds):
        held = fold == k
        log.info("grading cross-validation: fold %d of %d (%d held out)", k + 1, folds, int(held.sum()))
        model = fit_classifier(replace(cfg, seed=cfg.seed + k), data.images[~held], data.grades[~held])
        prob[held] = predict(model, data.images[held], pre)
        per_fold.append({"fold": k, **flat_metrics(grade_metrics(data.grades[held], prob[held]))})
        picked = [i for i in np.flatnonzero(held) if i in shown]
        if picked:
            heat, _ = heatmaps(model, torch.stack([pre.to_tensor(data.images[i]) for i in picked]))
            for i, hmap in zip(picked, heat):
                row = data.rows.iloc[i]
                image = read_image(row["image"])
                lung = find_lungs(image) if find_lungs is not None else _reference_lungs(row, image.shape)
                if lung is None:
                    continue  # no lungs to judge a heatmap against (ROI none needs no mask to train)
                maps[data.rows.index[i]] = (to_uint8(image), heatmap_in_image(hmap, image.shape, lung, cfg.side, cfg.roi),
                                            lung)
    summary = {m: {"mean": float(np.nanmean([f[m] for f in per_fold])), "sd": float(np.nanstd([f[m] for f in per_fold]))}
               for m in CV_SUMMARY}
    pooled = grade_metrics(data.grades, prob)
    patients = data.rows.get("patient_id", pd.Series(index=data.rows.index)).to_numpy()
    oof = pd.DataFrame({"row": data.rows.index, "patient_id": patients,
                        "fold": fold, "grade": data.grades, "pred": prob.argmax(1)})
    hcs = [concordance(heat, lung)["hcs"] for _, heat, lung in maps.values()]
    return {"config": cfg.to_dict(), "folds": folds, "images": int(len(data.grades)), "per_fold": per_fold,
            "summary": summary, "pooled": pooled,
            "hcs": {"mean": float(np.mean(hcs)) if hcs else None, "images": len(hcs)},
            "subgroups": {col: subgroup_table(data.rows, data.grades, prob, col) for col in by}, "oof": oof,
            "heatmaps": maps}


def paired_heatmaps(right: dict, left: dict) -> dict:
    """Seed 000's heatmap of an image: the right-lung and left-lung models' heatmaps averaged, on
    the images both cross-validations drew (two :func:`cross_validate` results of one recipe,
    one per side), with the HCS of each against the lungs."""
    out = {}
    for row in sorted(set(right["heatmaps"]) & set(left["heatmaps"])):
        image, heat_r, lung = right["heatmaps"][row]
        heat = average_heatmaps(heat_r, left["heatmaps"][row][1])
        out[row] = (image, heat, lung, concordance(heat, lung)["hcs"])
    return out


def cv_markdown(results: list[dict]) -> str:
    """The cross-validation results of several recipes as Markdown: mean +- SD over the folds,
    then each recipe's subgroup tables (pooled out-of-fold predictions)."""
    def pm(r: dict, m: str) -> str:
        return f"{r['summary'][m]['mean']:.3f} +- {r['summary'][m]['sd']:.3f}"

    lines = ["| side | backbone | ROI | balancing | images | macro MAE | weighted F1 | none vs any F1 | "
             "<=mild vs >=moderate F1 | severe F1 | HCS |", "| --- " * 11 + "|"]
    for r in results:
        c = r["config"]
        hcs = r.get("hcs", {}).get("mean")
        lines.append(f"| {c['side']} | {c['classifier']['backbone']} | {c['roi']} | {c['balancing']} | {r['images']} | "
                     + " | ".join(pm(r, m) for m in ("macro_mae", "weighted_f1", "none_vs_any_f1",
                                                      "mild_or_less_vs_moderate_or_more_f1", "not_severe_vs_severe_f1"))
                     + f" | {'-' if hcs is None else f'{hcs:.3f}'} |")
    for i, r in enumerate(results):
        for col, table in r["subgroups"].items():
            c = r["config"]
            lines += ["", f"Recipe {i + 1} ({c['side']}, {c['classifier']['backbone']}, {c['roi']}, {c['balancing']}) "
                      f"by {col}, pooled out-of-fold:", "",
                      f"| {col} | n | macro MAE | MAE | weighted F1 | accuracy |", "| --- " * 6 + "|"]
            lines += [f"| {t['value']} | {t['n']} | {t['macro_mae']:.3f} | {t['mae']:.3f} | {t['weighted_f1']:.3f} | "
                      f"{t['accuracy']:.3f} |" for t in table]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class GradeCvReport:
    """What :func:`write_grade_cv` wrote: each recipe's results (cv.json's ``recipes``), the
    left+right pairs (``both_sides``) and the Markdown table (cv.md)."""
    recipes: list
    both_sides: list
    markdown: str


def _same_recipe_both_sides(right: dict, left: dict) -> bool:
    """One recipe cross-validated for the right and for the left lung (seed 000 pairs them)."""
    other = {k: v for k, v in right["config"].items() if k != "side"}
    return (right["config"]["side"] == "right" and left["config"]["side"] == "left"
            and other == {k: v for k, v in left["config"].items() if k != "side"})


def write_grade_cv(recipes: list[GradeConfig], df: pd.DataFrame, out: str, folds: int = 5, seed: int = 0,
                   by: tuple[str, ...] = (), heatmap_images: int = 8, log_progress=None) -> GradeCvReport:
    """``cxrtune grade cv``: :func:`cross_validate` each recipe, then :func:`write_cv_report`.

    Args:
        log_progress: called with a line per recipe as it starts (the CLI prints it)."""
    results = []
    for i, cfg in enumerate(recipes):
        if log_progress:
            log_progress(f"recipe {i + 1}/{len(recipes)}: {cfg.side} lung, {cfg.classifier.backbone}, {cfg.roi}, "
                         f"{cfg.balancing}")
        results.append(cross_validate(cfg, df, folds=folds, seed=seed, by=by, heatmap_images=heatmap_images))
    return write_cv_report(results, out)


def write_cv_report(results: list[dict], out: str) -> GradeCvReport:
    """Write the reports of cross-validated recipes to ``out``: the out-of-fold predictions
    (``oof_N.csv``), the heatmaps of each recipe (``heatmaps/recipeN_SIDE_rowR.png``) and of each
    recipe cross-validated for both sides, left and right averaged (seed 000,
    ``heatmaps/recipesI+J_both_rowR.png``), ``cv.json`` and ``cv.md``.

    Args:
        results: :func:`cross_validate` results, in recipe order (not modified).

    Returns:
        What was written, without the out-of-fold tables and heatmap arrays."""
    for i, r in enumerate(results):
        storage.write_text(storage.join(out, f"oof_{i + 1}.csv"), r["oof"].to_csv(index=False))
        for row, (image, heat, lung) in r["heatmaps"].items():
            storage.write_bytes(storage.join(out, "heatmaps", f"recipe{i + 1}_{r['config']['side']}_row{row}.png"),
                                heatmap_png(image, heat, lung, concordance(heat, lung)["hcs"]))
    pairs = []
    for i, right in enumerate(results):
        for j, left in enumerate(results):
            if not _same_recipe_both_sides(right, left):
                continue
            paired = paired_heatmaps(right, left)
            for row, (image, heat, lung, hcs) in paired.items():
                storage.write_bytes(storage.join(out, "heatmaps", f"recipes{i + 1}+{j + 1}_both_row{row}.png"),
                                    heatmap_png(image, heat, lung, hcs))
            pairs.append({"right": i + 1, "left": j + 1, "images": len(paired),
                          "hcs": float(sum(p[3] for p in paired.values()) / len(paired)) if paired else None})
    recipes = [{k: v for k, v in r.items() if k not in ("oof", "heatmaps")} for r in results]
    storage.write_text(storage.join(out, "cv.json"),
                       json.dumps(json_safe({"recipes": recipes, "both_sides": pairs}), indent=2))
    table = cv_markdown(recipes)
    if pairs:
        table += "\nLeft and right heatmaps averaged (seed 000), HCS against the lungs:\n\n" + "\n".join(
            f"- recipes {p['right']} (right) + {p['left']} (left): HCS {p['hcs']:.3f} on {p['images']} images"
            for p in pairs if p["hcs"] is not None) + "\n"
    storage.write_text(storage.join(out, "cv.md"), table)
    return GradeCvReport(recipes, pairs, table)
