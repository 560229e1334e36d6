"""Per-lung ordinal opacity grading (seed 000): labels, ROI schemes and the per-side inputs.

Each lung side (the patient's right or left) gets its own classifier and a 0-3 grade: 0 clear,
1 mild (1-33 % of the lung opacified), 2 moderate (34-66 %), 3 severe (67-100 %). Labels are the
manifest's reader grades (``grade_right``/``grade_left``) where it has them, else they are derived
from the reference lung and opacity masks (:func:`~cxrtune.zones.grade_from_percent`).

ROI schemes, from a lung mask: the manifest's reference mask, or, with ``lung_bundle``, the cleaned
lungs of a scorer bundle's Stage I, which is what the ROI will come from in use:

* ``none``: the whole image;
* ``lung_masked``: the image with everything outside the lungs set to 0;
* ``split``: the side's half of the image, cut at the midline between the two lungs (seed 000's
  lateral split at the spine; the image's centre when only one lung is found).

A :class:`GradeConfig` is one recipe (backbone, ROI scheme, balancing, side...): what ``cxrtune
tune`` searches (``search_spaces/opacity_classification.yaml``; ``--grid`` runs seed 000's 27
combinations per side), and what :func:`cross_validate` checks with patient-level folds and
subgroup tables (``cxrtune grade cv``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Callable

import numpy as np
import pandas as pd

from .. import zones
from ..data.manifest import without_eval_only
from ..errors import CxrtuneError
from ..images import read_image, read_mask
from ..preprocessing import Preprocessing, resize_image, to_uint8
from .classifiers import ClassifierConfig
from .classify import BALANCING, ClassifyConfig, fit_classifier, predict
from .metrics import multiclass_metrics, ordinal_metrics

log = logging.getLogger(__name__)

SIDES = ("right", "left")
ROI_SCHEMES = ("none", "lung_masked", "split")
GRADES = ("clear", "mild", "moderate", "severe")

LungFinder = Callable[[np.ndarray], np.ndarray]
"""An image (2-D float) -> its bool lung mask: how a ROI is found without a reference mask (e.g.
:func:`cxrtune.scoring.scorer.stage_one_lungs`, the cleaned lungs of a bundle's Stage I)."""


def mask_grades(lung: np.ndarray, opacity: np.ndarray) -> dict[str, int | None]:
    """``{"right": g, "left": g}`` from a lung and an opacity mask of the same shape; ``None`` for
    a side whose lung the mask does not have (no area, no percent: never "clear")."""
    lungs = zones.split_lungs(lung)
    rec = zones.score_lungs(lungs, opacity, threshold=1.0)
    present = {"right": lungs.right.any(), "left": lungs.left.any()}
    return {side: int(rec["lungs"][side]["grade"]) if present[side] else None for side in SIDES}


def midline(lungs: zones.LungPair, width: int) -> int:
    """The column between the patient's right lung (image left) and left lung (image right); the
    image's centre column when fewer than two lungs are found (a white-out lung Stage I misses),
    so that every ROI scheme keeps the same rows."""
    if lungs.lungs_found < 2:
        return width // 2
    right_end = int(np.flatnonzero(lungs.right.any(axis=0))[-1]) + 1
    left_start = int(np.flatnonzero(lungs.left.any(axis=0))[0])
    return (right_end + left_start) // 2


def grading_input(image: np.ndarray, lung: np.ndarray | None, side: str, scheme: str, size: int) -> np.ndarray:
    """One side's classifier input (float [0, 1], ``size`` x ``size``) in ROI ``scheme`` (``lung``
    may be None for ``none``, which takes the whole image)."""
    if side not in SIDES:
        raise CxrtuneError(f"side must be right or left, got {side!r}")
    if scheme not in ROI_SCHEMES:
        raise CxrtuneError(f"ROI scheme must be one of {', '.join(ROI_SCHEMES)}, got {scheme!r}")
    if scheme == "none":
        return resize_image(image, size)
    if lung is None:
        raise CxrtuneError(f"ROI scheme {scheme!r} needs a lung mask")
    lungs = zones.split_lungs(lung)
    if scheme == "lung_masked":
        return resize_image(np.where(lungs.right | lungs.left, image, 0).astype(np.float32), size)
    x = midline(lungs, image.shape[1])
    half = image[:, :x] if side == "right" else image[:, x:]
    return resize_image(np.ascontiguousarray(half), size)


def grade_labels(df: pd.DataFrame, read_mask) -> pd.DataFrame:
    """Rows with a grade per side: ``grade_right``/``grade_left`` where the manifest has them,
    else derived from the reference masks (rows with neither are dropped, and so are ``eval_only``
    rows; a side whose lung the mask lacks, or whose masks cannot be read, gets no grade: NA).
    Adds ``grade_source``. The grade columns are nullable integers."""
    df = without_eval_only(df)  # radiologists' reference sets (brixia-dev) never train or select
    rows, index = [], []
    for i, row in df.iterrows():
        out = row.to_dict()
        have = all(c in row.index and pd.notna(row[c]) and row[c] != "" for c in ("grade_right", "grade_left"))
        if have:
            out["grade_source"] = "manifest"
        elif row.get("lung_mask", "") and row.get("opacity_mask", ""):
            try:
                grades = mask_grades(read_mask(row["lung_mask"]), read_mask(row["opacity_mask"]))
            except (CxrtuneError, ValueError) as exc:  # unreadable, or masks of different shapes
                # by type only: a read error's message quotes the path, which may name a patient
                log.warning("grading: the masks of row %s give no grade (%s)", i, type(exc).__name__)
                continue
            out["grade_right"], out["grade_left"], out["grade_source"] = grades["right"], grades["left"], "masks"
        else:
            continue
        rows.append(out)
        index.append(i)
    if not rows:
        raise CxrtuneError("no row has per-lung grades or the lung and opacity masks to derive them")
    result = pd.DataFrame(rows, index=index)
    for col in ("grade_right", "grade_left"):
        result[col] = pd.array([None if pd.isna(v) else int(v) for v in result[col]], dtype="Int64")
    return result


@dataclass
class GradeConfig(ClassifyConfig):
    """A grading recipe: a classification recipe for one lung ``side`` in one ROI scheme (``roi``).
    ``max_train_images``/``max_val_images`` cap the rows a trial reads (a tuning-sized subset)."""

    side: str = "right"
    roi: str = "none"
    lung_bundle: str | None = None  # a scorer bundle whose Stage I gives the ROI lungs; None: the reference masks
    max_train_images: int | None = None
    max_val_images: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.side not in SIDES:
            raise CxrtuneError(f"side must be right or left, got {self.side!r}")
        if self.roi not in ROI_SCHEMES:
            raise CxrtuneError(f"roi must be one of {', '.join(ROI_SCHEMES)}, got {self.roi!r}")
        if self.classifier.num_classes != len(GRADES):
            raise CxrtuneError(f"a grading classifier has {len(GRADES)} classes (grades 0-3), "
                               f"got num_classes {self.classifier.num_classes}")


# the settings a search space may name for task: grade (recipe, and classifier under `classifier:`)
GRADE_KEYS = {f.name for f in fields(GradeConfig)} - {"classifier"}
CLASSIFIER_KEYS = {f.name for f in fields(ClassifierConfig)} - {"num_classes"}


@dataclass
class GradeData:
    """One side's classifier inputs (uint8, N x size x size), grades, and their manifest rows."""

    images: np.ndarray
    grades: np.ndarray
    rows: pd.DataFrame


def load_grade_data(graded: pd.DataFrame, side: str, roi: str, size: int,
                    find_lungs: LungFinder | None = None) -> GradeData:
    """The inputs of ``graded`` rows (from :func:`grade_labels`) in ROI scheme ``roi``, the ROI
    taken from the reference lung mask, or from ``find_lungs`` (e.g. a bundle's Stage I, which is
    what the ROI will come from in use). A row the scheme cannot use (no lungs; a single lung for
    ``split``) or an unreadable image is left out with a warning, never guessed."""
    graded = graded[graded[f"grade_{side}"].notna()]  # no grade for this side: nothing to learn or test
    images, keep, skipped = [], [], []
    for i, row in graded.iterrows():
        try:
            image = read_image(row["image"])
            if roi == "none":
                lung = None
            elif find_lungs is not None:
                lung = find_lungs(image)
            else:
                lung = read_mask(row["lung_mask"])
        except (CxrtuneError, KeyError, TypeError) as exc:  # its message may quote a path, which may name a patient
            skipped.append(f"row {i}: unreadable ({type(exc).__name__})")  # the manifest's row label
            continue
        try:
            if lung is not None and not lung.any():
                raise CxrtuneError("empty lung mask")
            if lung is not None and lung.shape != image.shape:  # a mask of another image, or of another size
                raise CxrtuneError(f"lung mask {lung.shape[1]}x{lung.shape[0]} on a "
                                   f"{image.shape[1]}x{image.shape[0]} image")
            images.append(to_uint8(grading_input(image, lung, side, roi, size)))
            keep.append(i)
        except CxrtuneError as exc:  # cxrtune's own reasons: no path in them
            skipped.append(f"row {i}: {exc}")
    if skipped:
        log.warning("grading (%s, %s): %d row(s) left out, e.g. %s", side, roi, len(skipped), skipped[0])
    if not keep:
        raise CxrtuneError(f"no row could be prepared for the {side} lung in ROI scheme {roi!r}")
    rows = graded.loc[keep]
    return GradeData(np.stack(images), rows[f"grade_{side}"].to_numpy(int), rows)


def grade_metrics(grades: np.ndarray, prob: np.ndarray) -> dict:
    """Seed 000's metrics of N x 4 grade probabilities: macro-averaged MAE, MAE by grade, the
    three binary collapses, weighted precision/recall/F1, accuracy and the confusion matrix."""
    mc = multiclass_metrics(grades, prob, list(GRADES))
    keep = ("n", "accuracy", "weighted_precision", "weighted_recall", "weighted_f1", "confusion")
    return {**ordinal_metrics(grades, prob.argmax(1), len(GRADES)), **{k: mc[k] for k in keep}}


def flat_metrics(m: dict, prefix: str = "") -> dict:
    """The scalar metrics of :func:`grade_metrics` as one flat dict (Tune results, tables)."""
    out = {f"{prefix}{k}": m[k] for k in ("macro_mae", "mae", "accuracy", "weighted_precision",
                                            "weighted_recall", "weighted_f1")}
    out.update({f"{prefix}{name}_f1": c["f1"] for name, c in m["collapses"].items()})
    return out


def _sample(df: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    return df.sample(n=limit, random_state=seed).sort_index() if limit and len(df) > limit else df


def train_grader(cfg: GradeConfig, df: pd.DataFrame, on_epoch: Callable[[int, dict], None] | None = None,
                 find_lungs: LungFinder | None = None):
    """Train ``cfg`` on the manifest's train rows and validate after every epoch on its val rows
    (``on_epoch(epoch, metrics)``: a Tune trial reports there). ``find_lungs`` finds the ROI's lungs
    when ``cfg.lung_bundle`` is set (:func:`load_grade_data`). Returns the model and the last
    validation metrics. ``eval_only`` rows never take part."""
    df = without_eval_only(df)
    if "split" not in df.columns:
        raise CxrtuneError("grading needs train and val splits (cxrtune data split)")
    parts = {}
    for split, limit in (("train", cfg.max_train_images), ("val", cfg.max_val_images)):
        rows = _sample(df[df["split"] == split], limit, cfg.seed)
        if not len(rows):
            raise CxrtuneError(f"grading needs {split} rows")
        parts[split] = load_grade_data(grade_labels(rows, read_mask), cfg.side, cfg.roi, cfg.size, find_lungs)
    pre = Preprocessing(size=cfg.size, in_channels=cfg.classifier.in_channels)
    val, last = parts["val"], dict[str, float]()

    def epoch(n: int, model) -> None:
        last.clear()
        last.update(grade_metrics(val.grades, predict(model, val.images, pre)))
        if on_epoch is not None:
            on_epoch(n, last)

    model = fit_classifier(cfg, parts["train"].images, parts["train"].grades, on_epoch=epoch)
    return model, dict(last)


def subgroup_table(rows: pd.DataFrame, grades: np.ndarray, prob: np.ndarray, column: str) -> list[dict]:
    """Metrics per value of manifest ``column`` (sex, site, label...), over the given predictions."""
    if column not in rows.columns:
        raise CxrtuneError(f"no manifest column {column!r} for a subgroup table; columns: {', '.join(rows.columns)}")
    values = np.array(["(missing)" if pd.isna(v) or str(v) == "" else str(v) for v in rows[column]], dtype=object)
    out = []
    for value in sorted(set(values)):
        sel = values == value
        out.append({"column": column, "value": value, "n": int(sel.sum()),
                    **flat_metrics(grade_metrics(grades[sel], prob[sel]))})
    return out


CV_SUMMARY = ("macro_mae", "mae", "weighted_f1", "weighted_precision", "weighted_recall", "accuracy",
              "none_vs_any_f1", "mild_or_less_vs_moderate_or_more_f1", "not_severe_vs_severe_f1")


GRID_ROWS, GRID_COLUMNS = ("backbone", "roi"), "balancing"


def grid_table(trials: pd.DataFrame, metric: str = "best_val_macro_mae",
               second: str | None = "val_weighted_f1@best") -> str:
    """Seed 000's compact results table (Markdown) from a grid sweep's trials table (``param:``
    columns): one block per lung side, rows backbone x ROI scheme, columns the balancing; each
    cell the trial's best macro MAE (and its weighted F1 at that epoch). The best cell per side is
    in bold."""
    col = {name: f"param:{name}" for name in (*GRID_ROWS, GRID_COLUMNS, "side")}
    missing = [name for name, c in col.items() if c not in trials.columns]
    if missing or metric not in trials.columns:
        raise CxrtuneError(f"not a grading grid: the trials have no {', '.join(missing) or metric}")
    lines: list[str] = []
    for side, block in trials.groupby(col["side"], sort=False):
        best = block[metric].min()
        seen = list(dict.fromkeys(block[col[GRID_COLUMNS]]))
        balancings = sorted(seen, key=lambda b: BALANCING.index(b) if b in BALANCING else len(BALANCING))
        lines += [f"**{side} lung**: macro MAE" + (" (weighted F1)" if second else ""), "",
                  "| backbone | ROI | " + " | ".join(balancings) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in balancings) + " |"]
        backbones = list(dict.fromkeys(block[col["backbone"]]))
        order = lambda key: (backbones.index(key[0]), ROI_SCHEMES.index(key[1]) if key[1] in ROI_SCHEMES else 9)  # noqa: E731
        for (backbone, roi), cells in sorted(block.groupby([col["backbone"], col["roi"]], sort=False),
                                             key=lambda kv: order(kv[0])):  # the paper's order: backbone, then ROI
            out = []
            for bal in balancings:
                hit = cells[cells[col[GRID_COLUMNS]] == bal]
                if hit.empty or pd.isna(hit[metric].iloc[0]):
                    out.append("-")
                    continue
                value = hit[metric].iloc[0]
                text = f"{value:.3f}" + (f" ({hit[second].iloc[0]:.3f})" if second and second in hit else "")
                out.append(f"**{text}**" if value == best else text)
            lines.append(f"| {backbone} | {roi} | " + " | ".join(out) + " |")
        lines.append("")
    return "\n".join(lines)
