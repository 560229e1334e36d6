"""Seed 001's ROI Hide-and-Seek: train and test a classifier recipe on five representations of
the same data, and flag a recipe whose models stay accurate when the lungs are hidden.

It audits the recipe and the data (a :class:`~cxrtune.model.classify.ClassifyConfig` on a manifest), not
one trained model: a dataset whose classes come from different hospitals lets any recipe read
the hospital instead of the lungs. Each representation gets its own model, trained on the train
rows and tested on the test rows (the val rows when there is no test split), with accuracy,
per-class sensitivity and PPV, and the Heatmap Concordance Score of its Grad-CAM heatmaps.

The verdict: with the lungs removed, a model that reads the lungs falls to chance. ``retained``
is the share of the original representation's skill above chance that survives:
``(acc_removed - chance) / (acc_original - chance)``; the recipe is flagged when that is at least
``max_retained`` (0.5) and the accuracy with the lungs removed is at least ``min_margin`` (0.1)
above chance.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

from .. import storage
from ..data.manifest import is_labelled, without_eval_only
from ..errors import CxrtuneError
from ..images import read_image, read_mask
from ..jsonsafe import json_safe
from ..model.classify import ClassifyConfig, fit_classifier, predict
from ..model.metrics import multiclass_metrics
from ..preprocessing import Preprocessing, resize_image, resize_mask, to_uint8
from .heatmaps import concordance, heatmap_png, heatmaps
from .representations import HIDDEN, REPRESENTATIONS, represent

log = logging.getLogger(__name__)


@dataclass
class Verdict:
    max_retained: float = 0.5
    min_margin: float = 0.1


@dataclass
class AuditData:
    """Images (uint8, model size), lung masks (bool) and integer labels of one split."""
    images: np.ndarray
    lungs: np.ndarray
    labels: np.ndarray


def load_rows(df: pd.DataFrame, size: int, classes: list[str]) -> AuditData:
    """The rows' images and reference lung masks at ``size`` (rows without a lung mask are
    refused by the caller: hide-and-seek needs the lungs)."""
    imgs, lungs, labels, skipped = [], [], [], 0
    for uri, lung_uri, label in zip(df["image"], df["lung_mask"], df["label"]):
        try:
            image, lung = read_image(uri), read_mask(lung_uri)
        except CxrtuneError:  # one unreadable file must not end the audit; counted, never named
            skipped += 1
            continue
        imgs.append(to_uint8(resize_image(image, size)))
        lungs.append(resize_mask(lung, size).astype(bool))
        labels.append(classes.index(label))
    if skipped:
        log.warning("hide-and-seek: %d row(s) whose image or lung mask could not be read left out", skipped)
    if not imgs:
        raise CxrtuneError("hide-and-seek: no image of the split could be read")
    return AuditData(np.stack(imgs), np.stack(lungs), np.array(labels, int))


def split_rows(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Train rows and evaluation rows (test, else val), labelled and with lung masks; ``eval_only``
    rows (radiologists' reference sets) never train or test an audit model."""
    df = without_eval_only(df)
    if "split" not in df.columns:
        raise CxrtuneError("hide-and-seek needs train and test (or val) splits: run `cxrtune data split`")
    usable = df[df["label"].map(is_labelled) & (df.get("lung_mask", pd.Series("", index=df.index)) != "")]
    if len(usable) < len(df):
        log.warning("hide-and-seek: %d row(s) without a label or a lung mask left out", len(df) - len(usable))
    train = usable[usable["split"] == "train"]
    for name in ("test", "val"):
        held = usable[usable["split"] == name]
        if len(held):
            break
    if len(train) == 0 or len(held) == 0:
        raise CxrtuneError("hide-and-seek needs labelled train rows and test (or val) rows with lung masks")
    return train, held, name


def represented(data: AuditData, name: str) -> np.ndarray:
    """The audit images in representation ``name`` (:data:`REPRESENTATIONS`), stacked."""
    return np.stack([represent(im, lung, name) for im, lung in zip(data.images, data.lungs)])


def heatmap_rows(count: int, n: int) -> np.ndarray:
    """``n`` evaluation rows spread evenly over all ``count`` (manifests are often in class order:
    the first rows alone would be one class)."""
    return np.unique(np.linspace(0, count - 1, min(n, count)).round().astype(int)) if n > 0 and count else np.zeros(0, int)


def mean_concordance(model, images: np.ndarray, lungs: np.ndarray, pre: Preprocessing) -> dict:
    """Mean HCS (both definitions) of the given evaluation images' heatmaps."""

    if not len(images):
        return {}
    x = torch.stack([pre.to_tensor(im) for im in images])
    heat, _ = heatmaps(model, x)
    scores = [concordance(h, lung) for h, lung in zip(heat, lungs)]
    return {"hcs": float(np.mean([s["hcs"] for s in scores])),
            "hcs_pixels": float(np.mean([s["hcs_pixels"] for s in scores])), "heatmaps": heat}


def hide_and_seek(cfg: ClassifyConfig, df: pd.DataFrame, representations: tuple[str, ...] = REPRESENTATIONS,
                  verdict: Verdict = Verdict(), heatmap_images: int = 16) -> dict:
    """Run the protocol; returns per-representation metrics, HCS and the verdict (heatmaps of the
    evaluation images under ``heatmaps``, for the report's PNGs)."""
    unknown = [r for r in representations if r not in REPRESENTATIONS]
    if unknown:  # before any training: a typo must not cost the first representation's run
        raise CxrtuneError(f"unknown representation {unknown[0]!r}; choose from {', '.join(REPRESENTATIONS)}")
    if "original" not in representations or "lungs_removed" not in representations:
        raise CxrtuneError("hide-and-seek needs at least the original and lungs_removed representations")
    train_df, held_df, held_name = split_rows(df)
    classes = sorted(set(train_df["label"]))
    held_df = held_df[held_df["label"].isin(classes)]
    cfg = replace(cfg, classifier=replace(cfg.classifier, num_classes=len(classes)))  # the data's classes
    pre = Preprocessing(size=cfg.size, in_channels=cfg.classifier.in_channels)
    train, held = load_rows(train_df, cfg.size, classes), load_rows(held_df, cfg.size, classes)
    out: dict = {"classes": classes, "train_images": len(train.labels), "eval_images": len(held.labels),
                 "eval_split": held_name, "config": cfg.to_dict(), "representations": {}, "heatmaps": {}}
    for name in representations:
        log.info("hide-and-seek: %s", name)
        model = fit_classifier(cfg, represented(train, name), train.labels)
        x_eval = represented(held, name)
        metrics = multiclass_metrics(held.labels, predict(model, x_eval, pre), classes)
        shown = heatmap_rows(len(x_eval), heatmap_images)
        hcs = mean_concordance(model, x_eval[shown], held.lungs[shown], pre)
        out["heatmaps"][name] = (x_eval[shown], hcs.pop("heatmaps", None), held.lungs[shown])
        out["representations"][name] = {**metrics, **hcs}
    reps = out["representations"]
    chance = reps["original"]["chance"]
    skill = reps["original"]["accuracy"] - chance

    learnt = skill >= verdict.min_margin  # retained skill means nothing if there was none to keep

    def retained(name: str) -> float | None:
        return (reps[name]["accuracy"] - chance) / skill if learnt else None

    out["retained_skill"] = {name: retained(name) for name in HIDDEN if name in reps}
    removed = reps["lungs_removed"]["accuracy"]
    kept = out["retained_skill"]["lungs_removed"]
    # beating chance with the lungs hidden is a shortcut whether or not the original models learnt
    flagged = removed - chance >= verdict.min_margin and (kept is None or kept >= verdict.max_retained)
    reason = (f"with the lungs removed the models still reach accuracy {removed:.3f} (chance {chance:.3f}): "
              f"they read something outside the lungs" if flagged else
              f"with the lungs removed accuracy falls to {removed:.3f} (chance {chance:.3f})")
    if not learnt:
        reason += (f"; the original-image models did not beat chance by {verdict.min_margin} "
                   f"(accuracy {reps['original']['accuracy']:.3f}): train longer or from pretrained weights")
    out["verdict"] = {"flagged": bool(flagged), "original_learnt": bool(learnt), "max_retained": verdict.max_retained,
                      "min_margin": verdict.min_margin, "reason": reason}
    return out


def write_heatmaps(shown: dict, out_uri: str, per_representation: int = 4) -> None:
    """The first heatmaps of each representation (``result["heatmaps"]``) as PNGs under
    ``OUT/heatmaps/``, with the lung outline and each image's HCS."""
    for name, (images, heat, lungs) in shown.items():
        for i in range(min(per_representation, len(images)) if heat is not None else 0):
            storage.write_bytes(storage.join(out_uri, "heatmaps", f"{name}_{i:02d}.png"),
                                heatmap_png(images[i], heat[i], lungs[i], concordance(heat[i], lungs[i])["hcs"]))


def run_hide_and_seek(cfg: ClassifyConfig, df: pd.DataFrame, out_uri: str,
                      representations: tuple[str, ...] = REPRESENTATIONS, verdict: Verdict = Verdict(),
                      heatmap_images: int = 8) -> dict:
    """``cxrtune audit hide-and-seek``: :func:`hide_and_seek`, its heatmaps and
    ``hide_and_seek.json`` (the report a release gate reads) written to ``out_uri``. Returns the
    report."""
    result = hide_and_seek(cfg, df, representations, verdict, heatmap_images=heatmap_images)
    write_heatmaps(result.pop("heatmaps"), out_uri)
    storage.write_text(storage.join(out_uri, "hide_and_seek.json"), json.dumps(json_safe(result), indent=2))
    return result


def summary_lines(report: dict) -> list[str]:
    """The report of :func:`run_hide_and_seek` as a table for a terminal: accuracy, HCS and
    sensitivity/PPV per class for each representation, then the verdict."""
    lines = [f"{'representation':<16} {'accuracy':>8} {'HCS':>6}  sensitivity / PPV per class"]
    for name, r in report["representations"].items():
        per = ", ".join(f"{c} {r['sensitivity'][c]:.2f}/{r['ppv'][c]:.2f}" for c in report["classes"])
        lines.append(f"{name:<16} {r['accuracy']:>8.3f} {r.get('hcs', float('nan')):>6.2f}  {per}")
    verdict = report["verdict"]
    lines.append(("FLAGGED: " if verdict["flagged"] else "passed: ") + verdict["reason"])
    return lines
