"""Metrics: segmentation (seed 002 conventions), classification, and severity scores.

Dice and IoU are undefined on empty-vs-empty masks, so they are averaged over images whose reference
is non-empty; images whose reference is annotated-empty give the false-positive rate instead (the
share of them with any predicted pixel).
"""

from __future__ import annotations

import numpy as np


def agreement_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice between two predicted masks (e.g. FP32 against int8), 1.0 when both are empty: they
    agree. Against a reference, use :class:`SegmentationMeter` (empty references apart, seed 002)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * (a & b).sum() / total)


class SegmentationMeter:
    """Accumulates per-image Dice/IoU over non-empty references and FPs over empty ones."""

    def __init__(self) -> None:
        self.dice: list[float] = []
        self.iou: list[float] = []
        self.empty_refs = 0
        self.false_positives = 0

    def update(self, pred: np.ndarray, ref: np.ndarray) -> None:
        """``pred`` and ``ref``: bool arrays (N, H, W) or (H, W)."""
        pred = np.asarray(pred, bool).reshape(-1, *np.shape(pred)[-2:])
        ref = np.asarray(ref, bool).reshape(-1, *np.shape(ref)[-2:])
        for p, r in zip(pred, ref):
            if not r.any():
                self.empty_refs += 1
                self.false_positives += int(p.any())
                continue
            inter = float((p & r).sum())
            union = float((p | r).sum())
            self.dice.append(2 * inter / (p.sum() + r.sum()))
            self.iou.append(inter / union)

    def result(self, prefix: str = "") -> dict:
        out = {f"{prefix}dice": float(np.mean(self.dice)) if self.dice else float("nan"),
               f"{prefix}iou": float(np.mean(self.iou)) if self.iou else float("nan"),
               f"{prefix}n_nonempty": len(self.dice)}
        if self.empty_refs:
            out[f"{prefix}fp_rate_empty"] = self.false_positives / self.empty_refs
            out[f"{prefix}n_empty"] = self.empty_refs
        return out


def classification_metrics(prob: np.ndarray, label: np.ndarray, threshold: float = 0.5) -> dict:
    """F1, precision, recall (disease = 1) at ``threshold``, and ROC AUC where both classes occur."""
    from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

    prob, label = np.asarray(prob, float), np.asarray(label).astype(int)
    pred = (prob >= threshold).astype(int)
    out = {"f1": float(f1_score(label, pred, zero_division=0)),
           "precision": float(precision_score(label, pred, zero_division=0)),
           "recall": float(recall_score(label, pred, zero_division=0)),
           "accuracy": float((pred == label).mean()) if len(label) else float("nan")}
    out["roc_auc"] = float(roc_auc_score(label, prob)) if len(set(label)) == 2 else float("nan")
    return out


def multiclass_metrics(label: np.ndarray, prob: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, per-class sensitivity and PPV (seed 001), weighted precision/recall/F1 (seed 000)
    and the confusion matrix (rows: reference) of N x C probabilities."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    label = np.asarray(label).astype(int)
    pred = np.asarray(prob).argmax(1)
    idx = list(range(len(classes)))
    ppv, sens, _, support = precision_recall_fscore_support(label, pred, labels=idx, zero_division=0)
    wp, wr, wf, _ = precision_recall_fscore_support(label, pred, labels=idx, average="weighted", zero_division=0)
    counts = np.bincount(label, minlength=len(classes))
    return {"n": int(len(label)), "accuracy": float((pred == label).mean()) if len(label) else float("nan"),
            "chance": float(counts.max() / max(len(label), 1)),  # always the commonest class
            "sensitivity": {c: float(v) for c, v in zip(classes, sens)},
            "ppv": {c: float(v) for c, v in zip(classes, ppv)},
            "support": {c: int(v) for c, v in zip(classes, support)},
            "weighted_precision": float(wp), "weighted_recall": float(wr), "weighted_f1": float(wf),
            "confusion": confusion_matrix(label, pred, labels=idx).tolist()}


GRADE_COLLAPSES = {"none_vs_any": 1, "mild_or_less_vs_moderate_or_more": 2, "not_severe_vs_severe": 3}


def ordinal_metrics(label: np.ndarray, pred: np.ndarray, n_classes: int = 4) -> dict:
    """Seed 000's metrics of ordinal grades 0..n-1: the macro-averaged MAE (the mean over the
    classes present of each class's MAE: the rare severe grades count as much as the common
    clear ones) and the three binary collapses (grade >= 1, >= 2, >= 3) with F1, sensitivity and
    specificity."""
    from sklearn.metrics import f1_score

    label, pred = np.asarray(label).astype(int), np.asarray(pred).astype(int)
    per_class = {int(c): float(np.abs(pred[label == c] - c).mean()) for c in range(n_classes) if (label == c).any()}
    out: dict = {"macro_mae": float(np.mean(list(per_class.values()))) if per_class else float("nan"),
                 "mae": float(np.abs(pred - label).mean()) if len(label) else float("nan"),
                 "mae_by_grade": per_class, "collapses": {}}
    for name, cut in GRADE_COLLAPSES.items():
        t, p = label >= cut, pred >= cut
        out["collapses"][name] = {  # F1 undefined (NaN) with no positive among references and predictions
            "f1": float(f1_score(t, p, zero_division=0)) if (t.any() or p.any()) else float("nan"),
            "sensitivity": float((p & t).sum() / t.sum()) if t.any() else float("nan"),
            "specificity": float((~p & ~t).sum() / (~t).sum()) if (~t).any() else float("nan")}
    return out
