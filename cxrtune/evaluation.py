"""``cxrtune calibrate`` and ``cxrtune evaluate``: a bundle against a labelled manifest."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd

from . import images, manifest, storage, zones
from .errors import CxrtuneError
from .metrics import SegmentationMeter, classification_metrics, json_safe, score_metrics
from .scorer import Scorer, reference_zones, sweep_threshold, zone_fractions

log = logging.getLogger(__name__)


def _rows(df: pd.DataFrame, split: str | None, limit: int | None) -> pd.DataFrame:
    rows = df if not split else df[df["split"].isin(split.split(","))]
    if limit:
        rows = rows.head(limit)
    if rows.empty:
        raise CxrtuneError(f"no manifest rows in split(s) {split!r}")
    return rows


def _score_rows(scorer: Scorer, rows: pd.DataFrame, cache, progress: bool):
    from tqdm import tqdm

    batch = max(1, scorer.batch_size)
    for i in tqdm(range(0, len(rows), batch), desc="score", unit="batch", disable=not progress):
        chunk = rows.iloc[i:i + batch]
        imgs = [images.read_image(u, cache) for u in chunk["image"]]
        for (_, row), img, (record, detail) in zip(chunk.iterrows(), imgs, scorer.score_images(imgs)):
            yield row, img, record, detail


def calibrate(scorer: Scorer, df: pd.DataFrame, split: str | None = "train,val",
              reference_threshold: float = 0.1, limit: int | None = None, progress: bool = True) -> dict:
    """Seed 004: choose the zone threshold T by minimum score MAE on labelled training and
    validation images (never test). Reference scores: ``zone_*`` columns, or derived from the
    reference masks with ``reference_threshold``."""
    cache = storage.ContentCache()
    rows = _rows(df, split, limit)
    fracs, refs = [], []
    for row, _, record, _ in _score_rows(scorer, rows, cache, progress):
        ref = reference_zones(row, reference_threshold, cache)
        if ref is not None:
            fracs.append(zone_fractions(record))
            refs.append(ref)
    if not refs:
        raise CxrtuneError("no row has reference zone scores (zone_A..zone_F) or both reference masks; "
                           "calibration needs labelled images")
    return sweep_threshold(np.array(fracs), np.array(refs))


def evaluate(scorer: Scorer, df: pd.DataFrame, out_dir: str, split: str | None = "test",
             reference_threshold: float = 0.1, limit: int | None = None, progress: bool = True) -> dict:
    """Metrics JSON and plots: lung Dice, opacity Dice/IoU over non-empty references and the
    false-positive rate on annotated-empty ones, classification metrics, score MAE/RMSE/rho/kappa,
    the predicted-vs-reference score density heatmap (seed 004 Fig. 9) and per-zone confusion
    matrices."""
    cache = storage.ContentCache()
    rows = _rows(df, split, limit)
    lung_meter, opac_meter = SegmentationMeter(), SegmentationMeter()
    probs, labels, pred_zones, ref_zones, records = [], [], [], [], []
    for row, img, record, detail in _score_rows(scorer, rows, cache, progress):
        if row.get("lung_mask", ""):
            lung_meter.update(detail.lung, images.read_mask(row["lung_mask"], cache))
        if row.get("opacity_mask", ""):
            opac_meter.update(detail.opacity, images.read_mask(row["opacity_mask"], cache))
        probs.append(record["disease_probability"])
        labels.append(int(manifest.is_disease(row["label"])))
        ref = reference_zones(row, reference_threshold, cache)
        if ref is not None:
            pred_zones.append([int(record["zones"][z]["affected"]) for z in zones.ZONE_LETTERS])
            ref_zones.append(ref)
        records.append({"image": row["image"], **{k: record[k] for k in ("score", "opacity_percent", "disease_probability")}})
    result = {"n_images": len(rows), "split": split, "zone_threshold": scorer.zone_threshold,
              "models": scorer.models_info(),
              "lung": lung_meter.result(), "opacity": opac_meter.result(),
              "classification": classification_metrics(np.array(probs), np.array(labels), scorer.cls_threshold)}
    if ref_zones:
        p, r = np.array(pred_zones), np.array(ref_zones)
        result["score"] = score_metrics(p.sum(axis=1), r.sum(axis=1))
        result["zones"] = {z: {"accuracy": float((p[:, i] == r[:, i]).mean())} for i, z in enumerate(zones.ZONE_LETTERS)}
        _plots(p, r, out_dir)
    storage.write_text(storage.join(out_dir, "metrics.json"), json.dumps(json_safe(result), indent=2))
    storage.write_text(storage.join(out_dir, "scores.csv"), pd.DataFrame(records).to_csv(index=False))
    return result


def _plots(pred: np.ndarray, ref: np.ndarray, out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    _save(fig, storage.join(out_dir, "score_density.png"))
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
    _save(fig, storage.join(out_dir, "zone_confusion.png"))


def _save(fig, uri: str) -> None:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())
