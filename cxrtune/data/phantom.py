"""Synthetic chest radiograph phantoms with known lungs, opacities, labels and zone scores.

They feed the unit tests and the embedded default (a sweep with no dataset at all). Each phantom
is a frontal CXR cartoon: body, spine, heart overlapping the patient's left lung, ribs, two dark
lung fields, and for disease cases ground-glass opacities inside the lungs; a random shift,
scale and small rotation per image, blur and noise. Reference zone scores A-F come from the
true masks through :func:`cxrtune.zones.score_masks`, so they agree with the scorer by construction.
Written by hand: no library draws CXR phantoms.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from .. import images, storage, zones
from ..zones import (
    DEFAULT_ZONE_THRESHOLD as REFERENCE_ZONE_THRESHOLD,  # the one default T
)
from . import manifest
from .splits import assign_splits

LABEL_MIX = (("normal", 0.4), ("covid", 0.4), ("other_pneumonia", 0.2))


@dataclass
class Phantom:
    image: np.ndarray  # float32 [0, 1]
    lung: np.ndarray  # bool
    opacity: np.ndarray  # bool
    label: str


SHORTCUT_CORNER = {"covid": "left", "other_pneumonia": "right"}  # normal: no marker


def make_phantom(size: int = 256, label: str = "covid", seed: int = 0, shortcut: bool = False) -> Phantom:
    """One phantom; ``label`` ``normal`` has no opacity, any other label has 1-4 opacities.
    ``shortcut`` plants a bright marker outside the body that gives the label away (top left for
    COVID-19, top right for other pneumonia, none for normal), like a site's burned-in marker: the
    shortcut the audits (hide-and-seek, HCS) must catch."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.85, 1.05)
    shift = rng.uniform(-0.08, 0.08, size=2)
    theta = np.deg2rad(rng.uniform(-6, 6))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    px = (xs + 0.5) / size * 2 - 1 - shift[0]
    py = (ys + 0.5) / size * 2 - 1 - shift[1]
    c, s = np.cos(theta), np.sin(theta)
    u = (c * px + s * py) / scale
    v = (-s * px + c * py) / scale

    body = (u / 0.92) ** 2 + (v / 1.1) ** 2 < 1
    img = np.where(body, 0.42 + 0.08 * v, 0.04).astype(np.float32)
    img += 0.05 * body * np.clip(np.sin(v * np.pi * 6.5 + 2.5 * u * u), 0, None)  # ribs

    def lung_shape(cx: float, a: float, b: float, cy: float) -> np.ndarray:
        du, dv = (u - cx) / a, (v - cy) / b
        return (np.abs(du) ** 2.4 + np.abs(dv) ** 2 < 1) & (v < cy + 0.82 * b - 0.25 * du * du * b)

    right = lung_shape(-0.40 + rng.uniform(-0.03, 0.03), 0.25 * rng.uniform(0.9, 1.1),
                       0.55 * rng.uniform(0.9, 1.1), -0.05)
    left = lung_shape(0.40 + rng.uniform(-0.03, 0.03), 0.24 * rng.uniform(0.9, 1.1),
                      0.52 * rng.uniform(0.9, 1.1), -0.03)
    heart = ((u - 0.13) / 0.27) ** 2 + ((v - 0.33) / 0.24) ** 2 < 1
    lung = (right | left) & ~heart
    img = np.where(lung, 0.16 + 0.04 * (v + 1), img)
    img += 0.04 * lung * np.clip(np.sin(v * np.pi * 6.5 + 2.5 * u * u), 0, None)
    img = np.where(heart & body, 0.62, img)
    img = np.where((np.abs(u) < 0.07) & body & ~lung, 0.66, img)

    opacity = np.zeros_like(lung)
    if label != "normal" and lung.any():
        field = np.zeros_like(img)
        lung_y, lung_x = np.nonzero(lung)
        for _ in range(int(rng.integers(1, 5))):
            k = int(rng.integers(len(lung_y)))
            sigma = rng.uniform(0.05, 0.16) * size / 2
            d2 = (xs - lung_x[k]) ** 2 + (ys - lung_y[k]) ** 2
            field = np.maximum(field, np.exp(-d2 / (2 * sigma * sigma)))
        opacity = (field > 0.5) & lung
        img += 0.32 * field * lung
    if shortcut and label in SHORTCUT_CORNER:
        m, side = max(3, size // 32), max(4, size // 10)
        x0 = m if SHORTCUT_CORNER[label] == "left" else size - m - side
        img[m:m + side, x0:x0 + side] = 0.95
    img = np.asarray(cv2.GaussianBlur(img, (0, 0), sigmaX=max(0.6, size / 256)), np.float32)
    img += rng.normal(0, 0.015, img.shape).astype(np.float32)
    return Phantom(np.clip(img, 0, 1).astype(np.float32), lung, opacity, label)


def _pick_label(rng: np.random.Generator) -> str:
    names = [name for name, _ in LABEL_MIX]
    return str(rng.choice(names, p=[p for _, p in LABEL_MIX]))


def write_phantoms(out_dir: str | Path, n: int, size: int = 256, seed: int = 0,
                   val: float = 0.2, test: float = 0.1, progress: bool = False, shortcut: bool = False) -> pd.DataFrame:
    """Write ``n`` phantoms (images, lung and opacity masks) and ``manifest.parquet`` under
    ``out_dir``. ``other_pneumonia`` phantoms have opacities in the image but their mask is
    recorded as not annotated, like COVID-QU-Ex's Non-COVID images.

    Args:
        size: side of the square images, pixels.
        val, test: shares of the patients in the val and test splits (:func:`assign_splits`).
        shortcut: every phantom carries the label-revealing marker of :func:`make_phantom` (for
            the hide-and-seek audit's tests).

    Returns:
        The manifest, as written."""

    out = Path(out_dir)
    for sub in ("images", "lung_masks", "opacity_masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in tqdm(range(n), desc="phantoms", disable=not progress):
        label = _pick_label(rng)
        ph = make_phantom(size, label, seed=int(rng.integers(2**31)), shortcut=shortcut)
        name = f"phantom_{i:05d}.png"
        images.write_png(str(out / "images" / name), (ph.image * 255).round().astype(np.uint8))
        images.write_png(str(out / "lung_masks" / name), ph.lung)
        row: dict = {"image": str(out / "images" / name), "lung_mask": str(out / "lung_masks" / name),
               "opacity_mask": "", "label": label, "patient_id": f"phantom-{i:05d}",
               "source": "phantom", "view": "PA"}
        record = zones.score_masks(ph.lung, ph.opacity, REFERENCE_ZONE_THRESHOLD)
        if label != "other_pneumonia":
            images.write_png(str(out / "opacity_masks" / name), ph.opacity)
            row["opacity_mask"] = str(out / "opacity_masks" / name)
            row.update({f"zone_{z}": int(record["zones"][z]["affected"]) for z in zones.ZONE_LETTERS})
            row["score"] = record["score"]
            row["grade_right"] = record["lungs"]["right"]["grade"]
            row["grade_left"] = record["lungs"]["left"]["grade"]
        rows.append(row)
    df = manifest.new_manifest(rows)
    df = assign_splits(df, val=val, test=test, seed=seed)
    manifest.save_manifest(manifest.relative_to(df, str(out.resolve())), str(out / "manifest.parquet"))
    return df


def embedded_manifest(n: int = 48, size: int = 128) -> str:
    """The embedded default dataset (what runs without ``--manifest``): ``n`` phantoms in a local
    cache folder, generated once. Returns the manifest's path."""
    root = storage.default_cache_dir() / f"phantoms-n{n}-s{size}"
    target = root / "manifest.parquet"
    if not target.exists():
        print(f"no --manifest: generating {n} phantom CXRs in {root}", file=sys.stderr)
        write_phantoms(root, n, size=size, seed=0)
    return str(target)
