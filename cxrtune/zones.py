"""Seed 004's post-processing: lung splitter, equal-area segmenter and zone scoring (Fig. 6, B2-B3).

Written by hand because no library does it; connected components come from OpenCV.

* :func:`split_lungs` finds the two lungs in Stage I's mask (rules below); the lung on the
  image's left is the patient's right lung on a standard frontal view.
* :func:`equal_area_zones` cuts one lung by two horizontal lines into three parts of equal area from
  its row-wise cumulative sum (the paper's two binary searches find the same rows), which is
  invariant to translation and scaling and needs no alignment network.
* :func:`score_masks` turns a lung mask and an opacity mask into cxrtune's record: zones A-F
  (Brixia letters: A/B/C = right lung upper/middle/lower, D/E/F = left), a 0-6 score, opacity
  percent per lung (seed 002) and the per-lung 0-3 grade (seed 000).

Defined behaviour on odd masks (never an exception):
* no lung pixels: both lungs empty, every zone unaffected, ``lungs_found`` 0;
* specks go first: blobs under ``MIN_LUNG_BLOB_FRACTION`` of the *image* (not of the largest blob:
  a white-out lung that Stage I under-segments is small and must survive);
* the largest blob is two merged lungs when it straddles the image centre, its column heights
  dip between two peaks there, neither half is a speck, and no lung stands beside it (a blob
  beside it under ``MERGED_SPECK`` of the smaller half is a speck, dropped): it is cut at the
  column with the fewest lung pixels in its central part;
* otherwise the other lung is the largest blob beside it and level with it; with two lungs, a
  blob in one lung's columns and level with the other lung is a fragment of that lung and joins
  it (its zones are cut over all its parts); anything else (stray marks above or below a lung) is
  dropped;
* one blob that is not two merged lungs (a single lung pushed over the centre included) is one
  lung, on the side of its centroid, and the other lung is empty (``lungs_found`` 1);
* a horizontally flipped image has its sides swapped, as it should: sides are read off the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

ZONE_LETTERS = ("A", "B", "C", "D", "E", "F")
RIGHT_ZONES = ("A", "B", "C")  # patient's right lung: upper, middle, lower
LEFT_ZONES = ("D", "E", "F")
MIN_LUNG_BLOB_FRACTION = 0.002  # of the image area; smaller blobs are specks, not lungs

DEFAULT_ZONE_THRESHOLD = 0.1  # T until a bundle is calibrated; also the mask-derived reference's T


@dataclass
class LungPair:
    """The patient's right and left lung masks (bool, image-sized) and how many were found."""

    right: np.ndarray
    left: np.ndarray
    lungs_found: int


MERGED_VALLEY = 0.75  # two merged lungs dip below this share of the lower of their two peaks between them
MERGED_SPECK = 0.5  # beside merged lungs, a blob under this share of the smaller one is a speck, not a lung


def _merged_pair_cut(blob: np.ndarray) -> int | None:
    """The column that cuts one blob into two merged lungs, or None if it is one lung. Merged
    lungs straddle the image centre, span more than 0.35 of its width, and their column heights
    (lung pixels per column) dip between two peaks: the lowest column of the blob's central part
    holds under ``MERGED_VALLEY`` of the lower peak on either side of it. A single lung pushed over
    the centre (a shifted mediastinum) rises to one peak and has no such valley."""
    width = blob.shape[1]
    cols = np.flatnonzero(blob.any(axis=0))
    x0, x1 = int(cols[0]), int(cols[-1]) + 1
    if not (x0 < width / 2 < x1 - 1 and (x1 - 1 - x0) > 0.35 * width):
        return None
    heights = blob.sum(axis=0)
    lo, hi = x0 + int(0.3 * (x1 - x0)), x0 + int(0.7 * (x1 - x0))
    cut = lo + int(np.argmin(heights[lo:hi]))
    if heights[cut] >= MERGED_VALLEY * min(heights[x0:cut].max(initial=0), heights[cut:x1].max(initial=0)):
        return None
    return cut


def _overlap(a0: int, a1: int, b0: int, b1: int) -> int:
    return max(0, min(a1, b1) - max(a0, b0))


def split_lungs(lung_mask: np.ndarray) -> LungPair:
    """Stage I's mask -> (patient's right, patient's left): the lung cleanup and split of the
    scoring policy (the module's docstring lists the rules; :func:`clean_lungs` is their union).

    The largest blob is kept. If it is two merged lungs (a valley between two peaks of its column
    heights, and no lung beside it) it is cut there, and that is all. Otherwise the largest other
    blob beside it (overlapping at most half of its own width with the first blob's columns) and
    level with it (at least half of its own height in the first blob's rows) is the other lung; a
    marker above or below is not. With two lungs, a further blob
    in one lung's columns and level with the other lung is a fragment of that lung (Stage I broke
    it, e.g. at a consolidation it missed) and joins it. Blobs under ``MIN_LUNG_BLOB_FRACTION`` of
    the image are specks. Size is never judged against the other lung, so a small, fully opaque
    lung is kept."""
    mask = np.ascontiguousarray(lung_mask > 0, dtype=np.uint8)
    empty = np.zeros(mask.shape, dtype=bool)
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    min_area = max(1.0, MIN_LUNG_BLOB_FRACTION * mask.size)
    blobs = [i for _, i in sorted(((int(stats[i, cv2.CC_STAT_AREA]), i) for i in range(1, n)
                                   if stats[i, cv2.CC_STAT_AREA] >= min_area), reverse=True)]
    if not blobs:
        return LungPair(empty, empty.copy(), 0)
    first = labels == blobs[0]

    def columns(i: int) -> tuple[int, int]:
        return stats[i, cv2.CC_STAT_LEFT], stats[i, cv2.CC_STAT_LEFT] + stats[i, cv2.CC_STAT_WIDTH]

    def rows(i: int) -> tuple[int, int]:
        return stats[i, cv2.CC_STAT_TOP], stats[i, cv2.CC_STAT_TOP] + stats[i, cv2.CC_STAT_HEIGHT]

    def in_columns_of(i: int, lung: int) -> bool:
        return _overlap(*columns(i), *columns(lung)) > 0.5 * stats[i, cv2.CC_STAT_WIDTH]

    def level_with(i: int, lung: int) -> bool:
        return _overlap(*rows(i), *rows(lung)) >= 0.5 * stats[i, cv2.CC_STAT_HEIGHT]

    second = next((i for i in blobs[1:] if not in_columns_of(i, blobs[0]) and level_with(i, blobs[0])), None)
    cut = _merged_pair_cut(first)
    if cut is not None:
        right = first.copy()
        right[:, cut:] = False
        left = first & ~right
        smaller = min(int(right.sum()), int(left.sum()))
        # two lungs, unless a half is a speck, or a lung stands beside the blob (then the blob is
        # one lung with a dip, e.g. a consolidation Stage I missed from below)
        if smaller >= min_area and (second is None or stats[second, cv2.CC_STAT_AREA] < MERGED_SPECK * smaller):
            return LungPair(right, left, 2)
    if second is None:
        return LungPair(first, empty, 1) if centroids[blobs[0]][0] < mask.shape[1] / 2 else LungPair(empty, first, 1)
    parts = {blobs[0]: [blobs[0]], second: [second]}
    for i in blobs[1:]:
        if i == second:
            continue
        for lung, other in ((blobs[0], second), (second, blobs[0])):
            if in_columns_of(i, lung) and level_with(i, other):
                parts[lung].append(i)
                break
    a, b = (blobs[0], second) if centroids[blobs[0]][0] < centroids[second][0] else (second, blobs[0])
    return LungPair(np.isin(labels, parts[a]), np.isin(labels, parts[b]), 2)


def clean_lungs(lung_mask: np.ndarray) -> np.ndarray:
    """Stage I's mask -> its lungs (bool), the union of :func:`split_lungs`: the lung cleanup of
    the scoring policy, which the ROI crop, the split and the zones use, in training and in use."""
    pair = split_lungs(lung_mask)
    return pair.right | pair.left


def equal_area_zones(lung: np.ndarray) -> tuple[int, int]:
    """Rows ``(y_top, y_bot)`` cutting one lung into upper ``[0, y_top)``, middle
    ``[y_top, y_bot)`` and lower ``[y_bot, H)`` parts whose areas differ by at most one row."""
    rows = np.asarray(lung, dtype=bool).sum(axis=1).astype(np.int64)
    cum = np.concatenate([[0], np.cumsum(rows)])  # cum[k] = pixels in rows < k
    total = cum[-1]
    if total == 0:
        return 0, 0
    y_top = int(np.argmin(np.abs(cum - total / 3.0)))
    y_bot = int(np.argmin(np.abs(cum - 2.0 * total / 3.0)))
    return y_top, max(y_top, y_bot)


def zone_masks(lungs: LungPair) -> dict[str, np.ndarray]:
    """Six bool masks keyed by Brixia letter."""
    out: dict[str, np.ndarray] = {}
    for letters, lung in ((RIGHT_ZONES, lungs.right), (LEFT_ZONES, lungs.left)):
        y_top, y_bot = equal_area_zones(lung)
        bands = ((0, y_top), (y_top, y_bot), (y_bot, lung.shape[0]))
        for letter, (y0, y1) in zip(letters, bands):
            zone = np.zeros_like(lung, dtype=bool)
            zone[y0:y1] = lung[y0:y1]
            out[letter] = zone
    return out


def grade_from_percent(percent: float) -> int:
    """Seed 000's per-lung opacity grade: 0 clear, 1 for 1-33 %, 2 for 34-66 %, 3 for 67-100 %."""
    p = int(round(percent))
    if p <= 0:
        return 0
    if p <= 33:
        return 1
    if p <= 66:
        return 2
    return 3


def score_masks(lung_mask: np.ndarray, opacity_mask: np.ndarray, threshold: float) -> dict:
    """The severity record from a lung mask and an opacity mask of the same shape.

    A zone is affected when (opacity AND zone) / zone area >= ``threshold``; the score is the number
    of affected zones (0-6). Opacity outside the lungs is ignored.
    """
    if lung_mask.shape != opacity_mask.shape:
        raise ValueError(f"lung mask {lung_mask.shape} and opacity mask {opacity_mask.shape} differ in shape")
    return score_lungs(split_lungs(lung_mask), opacity_mask, threshold)


def zone_opacity(zones: dict[str, np.ndarray], opacity_mask: np.ndarray) -> dict[str, tuple[int, float]]:
    """Each zone's (area in pixels, share of those pixels that ``opacity_mask`` covers, to the 4
    places a record shows; 0 with no area), keyed by Brixia letter: a zone with area is affected
    when its share is >= T. Rounded here, once, so that the record, calibration and the reader
    figures judge the same number: a zone a record shows at 0.1000 is affected at T = 0.1.
    ``zones``: :func:`zone_masks` (made once for several masks)."""
    opacity = np.asarray(opacity_mask, dtype=bool)
    out = {}
    for letter, zone in zones.items():
        area = int(zone.sum())
        out[letter] = (area, round(float((opacity & zone).sum() / area), 4) if area else 0.0)
    return out


def score_lungs(lungs: LungPair, opacity_mask: np.ndarray, threshold: float) -> dict:
    """:func:`score_masks` for lungs already split (callers that also draw them split once)."""
    opacity = np.asarray(opacity_mask, dtype=bool)
    zones = {letter: {"affected": bool(area > 0 and frac >= threshold), "opacity_fraction": frac}
             for letter, (area, frac) in zone_opacity(zone_masks(lungs), opacity).items()}
    per_lung = {}
    for side, lung in (("right", lungs.right), ("left", lungs.left)):
        area = int(lung.sum())
        pct = 100.0 * float((opacity & lung).sum()) / area if area else 0.0
        per_lung[side] = {"opacity_percent": round(pct, 2), "grade": grade_from_percent(pct)}
    both = lungs.right | lungs.left
    total_area = int(both.sum())
    overall = 100.0 * float((opacity & both).sum()) / total_area if total_area else 0.0
    return {
        "score": int(sum(z["affected"] for z in zones.values())),
        "zones": zones,
        "lungs": per_lung,
        "opacity_percent": round(overall, 2),
        "threshold": float(threshold),
        "lungs_found": lungs.lungs_found,
    }
