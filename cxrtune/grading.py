"""Per-lung ordinal opacity grading (seed 000): labels, ROI schemes and the per-side inputs.

Each lung side (the patient's right or left) gets its own classifier and a 0-3 grade: 0 clear,
1 mild (1-33 % of the lung opacified), 2 moderate (34-66 %), 3 severe (67-100 %). Labels are the
manifest's reader grades (``grade_right``/``grade_left``) where it has them, else they are derived
from the reference lung and opacity masks (:func:`~cxrtune.zones.grade_from_percent`).

ROI schemes, from the lung mask (the reference's in training, Stage I's in use):

* ``none``: the whole image;
* ``lung_masked``: the image with everything outside the lungs set to 0;
* ``split``: the side's half of the image, cut at the midline between the two lungs (seed 000's
  lateral split at the spine).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import zones
from .errors import CxrtuneError
from .preprocessing import resize_image

SIDES = ("right", "left")
ROI_SCHEMES = ("none", "lung_masked", "split")
GRADES = ("clear", "mild", "moderate", "severe")


def mask_grades(lung: np.ndarray, opacity: np.ndarray) -> dict[str, int]:
    """``{"right": g, "left": g}`` from a lung and an opacity mask of the same shape."""
    rec = zones.score_masks(lung, opacity, threshold=1.0)
    return {side: int(rec["lungs"][side]["grade"]) for side in SIDES}


def midline(lungs: zones.LungPair) -> int:
    """The column between the patient's right lung (image left) and left lung (image right)."""
    if lungs.lungs_found < 2:
        raise CxrtuneError("the split ROI scheme needs both lungs")
    right_end = int(np.flatnonzero(lungs.right.any(axis=0))[-1]) + 1
    left_start = int(np.flatnonzero(lungs.left.any(axis=0))[0])
    return (right_end + left_start) // 2


def grading_input(image: np.ndarray, lung: np.ndarray, side: str, scheme: str, size: int) -> np.ndarray:
    """One side's classifier input (float [0, 1], ``size`` x ``size``) in ROI ``scheme``."""
    if side not in SIDES:
        raise CxrtuneError(f"side must be right or left, got {side!r}")
    if scheme not in ROI_SCHEMES:
        raise CxrtuneError(f"ROI scheme must be one of {', '.join(ROI_SCHEMES)}, got {scheme!r}")
    if scheme == "none":
        return resize_image(image, size)
    lungs = zones.split_lungs(lung)
    if scheme == "lung_masked":
        return resize_image(np.where(lungs.right | lungs.left, image, 0).astype(np.float32), size)
    x = midline(lungs)
    half = image[:, :x] if side == "right" else image[:, x:]
    return resize_image(np.ascontiguousarray(half), size)


def grade_labels(df: pd.DataFrame, read_mask) -> pd.DataFrame:
    """Rows with a grade per side: ``grade_right``/``grade_left`` where the manifest has them,
    else derived from the reference masks (rows with neither are dropped, and so are ``eval_only``
    rows). Adds ``grade_source``."""
    from .manifest import without_eval_only

    df = without_eval_only(df)  # radiologists' reference sets (brixia-dev) never train or select
    rows, index = [], []
    for i, row in df.iterrows():
        out = row.to_dict()
        have = all(c in row.index and pd.notna(row[c]) and row[c] != "" for c in ("grade_right", "grade_left"))
        if have:
            out["grade_source"] = "manifest"
        elif row.get("lung_mask", "") and row.get("opacity_mask", ""):
            grades = mask_grades(read_mask(row["lung_mask"]), read_mask(row["opacity_mask"]))
            out["grade_right"], out["grade_left"], out["grade_source"] = grades["right"], grades["left"], "masks"
        else:
            continue
        rows.append(out)
        index.append(i)
    if not rows:
        raise CxrtuneError("no row has per-lung grades or the lung and opacity masks to derive them")
    result = pd.DataFrame(rows, index=index)
    result[["grade_right", "grade_left"]] = result[["grade_right", "grade_left"]].astype(int)
    return result
