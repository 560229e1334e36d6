"""The two-stage severity scorer and its bundle.

Pipeline (seed 004): Stage I -> threshold -> image AND lung mask -> crop to the lungs' box ->
Stage II -> refinement by the classifier (mask x [p >= T_cls], Eq. 1-2) -> masks back in image
coordinates -> lung split, equal-area zones, zone scores (:mod:`cxrtune.zones`) -> the record.

A *bundle* is a folder (local or S3) holding both models' weights, their configs and
preprocessing, the thresholds and the versions: ``bundle.json``, ``lung.pt``, ``disease.pt``.
It is the unit ``cxrtune score``, ``evaluate`` and the Serve application load.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from . import storage, zones
from .dataset import Preprocessing, extract_roi, resize_image
from .errors import CxrtuneError
from .metrics import json_safe
from .models import ModelConfig, build_model

BUNDLE_FORMAT = "cxrtune-bundle/1"
DEFAULT_ZONE_THRESHOLD = 0.1


@dataclass
class Detail:
    """What the record summarises, for overlays and evaluation."""

    lung: np.ndarray
    opacity: np.ndarray
    lungs: zones.LungPair


@dataclass
class StageModel:
    model: torch.nn.Module
    pre: Preprocessing
    config: dict
    metrics: dict = field(default_factory=dict)


def stage_name(config: dict, size: int) -> str:
    """``arch/encoder@size``: how records and ``/v1/models`` name a stage's model."""
    m = config["model"]
    return f"{m['arch']}/{m['encoder']}@{size}"


def build_record(lung: np.ndarray, opacity: np.ndarray, p_disease: float, threshold: float,
                 models: dict) -> tuple[dict, Detail]:
    """The record of one scored image from the two stages' outputs (CLI and HTTP alike), and
    the masks behind it; the lungs are split once, for the zones and for any overlay."""
    opacity = opacity & lung
    lungs = zones.split_lungs(lung)
    record = zones.score_lungs(lungs, opacity, threshold)
    record["disease_probability"] = round(float(p_disease), 4)
    record["models"] = models
    return record, Detail(lung, opacity, lungs)


def _device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_stage(state_bytes: bytes, meta: dict, device: torch.device) -> StageModel:
    cfg = dict(meta["config"]["model"])
    cfg["encoder_weights"] = None  # the bundle's weights replace any pretrained ones
    cfg["classification"] = meta["config"]["task"] == "disease"
    model = build_model(ModelConfig(**cfg))
    model.load_state_dict(torch.load(io.BytesIO(state_bytes), map_location="cpu", weights_only=True))
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return StageModel(model, Preprocessing.from_dict(meta["preprocessing"]), meta["config"], meta.get("metrics", {}))


class Scorer:
    """Both stages, loaded once; scores lists of images in batches (on GPU when there is one)."""

    def __init__(self, lung: StageModel | None, disease: StageModel | None,
                 zone_threshold: float = DEFAULT_ZONE_THRESHOLD, cls_threshold: float = 0.5,
                 lung_threshold: float = 0.5, device: torch.device | None = None, batch_size: int = 8,
                 models: dict | None = None):
        """Either stage may be None where only the other is used (one Serve deployment each).
        ``models`` names them in records (:func:`bundle_models`)."""
        self.lung, self.disease = lung, disease
        self.zone_threshold, self.cls_threshold, self.lung_threshold = zone_threshold, cls_threshold, lung_threshold
        self.device = device or next((lung or disease).model.parameters()).device
        self.batch_size = batch_size
        self.models = models or {}

    # ---------------------------------------------------------------------------------- models
    def _run(self, stage: StageModel, batch: list[np.ndarray]):
        x = torch.stack([stage.pre.to_tensor(resize_image(im, stage.pre.size)) for im in batch]).to(self.device)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                    enabled=self.device.type == "cuda"):
            return stage.model(x)

    def lung_masks(self, images: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        for i in range(0, len(images), self.batch_size):
            chunk = images[i:i + self.batch_size]
            probs = torch.sigmoid(self._run(self.lung, chunk).float())[:, 0].cpu().numpy()
            for im, p in zip(chunk, probs):
                full = cv2.resize(p, (im.shape[1], im.shape[0]), interpolation=cv2.INTER_LINEAR)
                out.append(full >= self.lung_threshold)
        return out

    def opacity_masks(self, images: list[np.ndarray], lungs: list[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        rois, boxes = [], []
        for im, lung in zip(images, lungs):
            roi, _, box = extract_roi(im, lung)
            rois.append(roi)
            boxes.append(box)
        out = []
        for i in range(0, len(rois), self.batch_size):
            seg, cls = self._run(self.disease, rois[i:i + self.batch_size])
            p_cls = torch.sigmoid(cls.float())[:, 0].cpu().numpy()
            p_seg = torch.sigmoid(seg.float())[:, 0].cpu().numpy()
            for j, (prob, pc) in enumerate(zip(p_seg, p_cls)):
                k = i + j
                refined = prob * float(pc >= self.cls_threshold)  # Eq. 1-2
                canvas = np.zeros(images[k].shape, np.float32)
                if boxes[k] is None:
                    canvas[:] = cv2.resize(refined, (images[k].shape[1], images[k].shape[0]))
                else:
                    y0, y1, x0, x1 = boxes[k]
                    canvas[y0:y1, x0:x1] = cv2.resize(refined, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
                out.append((canvas >= 0.5, float(pc)))
        return out

    # ---------------------------------------------------------------------------------- scoring
    def score_images(self, images: list[np.ndarray]) -> list[tuple[dict, Detail]]:
        """Records (and the masks behind them) for 2-D float images in [0, 1]."""
        if not images:
            return []
        t0 = time.perf_counter()
        lungs = self.lung_masks(images)
        t1 = time.perf_counter()
        opac = self.opacity_masks(images, lungs)
        t2 = time.perf_counter()
        results = [build_record(lung, opacity, p, self.zone_threshold, self.models_info())
                   for lung, (opacity, p) in zip(lungs, opac)]
        n = len(images)
        for record, _ in results:
            record["timings_ms"] = {"stage1": round(1000 * (t1 - t0) / n, 2), "stage2": round(1000 * (t2 - t1) / n, 2)}
        return results

    def models_info(self) -> dict:
        return dict(self.models)


def bundle_models(meta: dict) -> dict:
    """How records (CLI and HTTP) name a bundle's models."""
    names = {stage: stage_name(meta[stage]["config"], meta[stage]["preprocessing"]["size"])
             for stage in ("lung", "disease")}
    return {**names, "cls_threshold": meta.get("cls_threshold", 0.5), "bundle": meta.get("name", ""),
            "created": meta.get("created", "")}


def read_bundle_meta(uri: str) -> dict:
    try:
        meta = json.loads(storage.read_text(storage.join(uri, "bundle.json")))
    except json.JSONDecodeError:
        raise CxrtuneError(f"{uri}/bundle.json: not valid JSON") from None
    if meta.get("format") != BUNDLE_FORMAT:
        raise CxrtuneError(f"{uri}: not a cxrtune bundle (format {meta.get('format')!r})")
    return meta


def load_bundle(uri: str, device: str | None = None, batch_size: int = 8,
                stages: tuple[str, ...] = ("lung", "disease")) -> Scorer:
    """Load a bundle's models (``stages`` picks which) onto ``device`` (default: GPU if any)."""
    meta = read_bundle_meta(uri)
    dev = _device(device)
    loaded = {stage: _load_stage(storage.read_bytes(storage.join(uri, f"{stage}.pt")), meta[stage], dev)
              for stage in stages}
    lung, disease = loaded.get("lung"), loaded.get("disease")
    return Scorer(lung, disease, zone_threshold=meta["zone_threshold"], cls_threshold=meta["cls_threshold"],
                  lung_threshold=meta.get("lung_threshold", 0.5), device=dev, batch_size=batch_size,
                  models=bundle_models(meta))


def make_bundle(lung_run: str, disease_run: str, out_uri: str, zone_threshold: float = DEFAULT_ZONE_THRESHOLD,
                cls_threshold: float = 0.5, name: str = "") -> dict:
    """Copy each run's best weights and meta into a bundle folder."""
    from datetime import datetime, timezone

    from .train import versions

    metas = {}
    for stage, run, task in (("lung", lung_run, "lung"), ("disease", disease_run, "disease")):
        meta = json.loads(storage.read_text(storage.join(run, "best", "meta.json")))
        if meta["config"]["task"] != task:
            raise CxrtuneError(f"{run}: a {meta['config']['task']!r} run, but --{stage} needs a {task!r} run")
        metas[stage] = {**meta, "run": run}
        storage.write_bytes(storage.join(out_uri, f"{stage}.pt"), storage.read_bytes(storage.join(run, "best", "model.pt")))
    bundle = {"format": BUNDLE_FORMAT, "name": name or storage.join(out_uri).rstrip("/").rsplit("/", 1)[-1],
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "zone_threshold": zone_threshold, "cls_threshold": cls_threshold, "lung_threshold": 0.5,
              "calibration": None, "versions": versions(), **metas}
    storage.write_text(storage.join(out_uri, "bundle.json"), json.dumps(json_safe(bundle), indent=2))
    return bundle


def update_bundle(uri: str, **changes) -> dict:
    meta = read_bundle_meta(uri)
    meta.update(changes)
    storage.write_text(storage.join(uri, "bundle.json"), json.dumps(json_safe(meta), indent=2))
    return meta


# -------------------------------------------------------------------------- references and sweeps

def reference_zones(row, reference_threshold: float = DEFAULT_ZONE_THRESHOLD, cache=None) -> list[int] | None:
    """Reference zone scores A-F of a manifest row: its ``zone_*`` columns, else derived from its
    reference lung and opacity masks; None when neither is there."""
    from . import images

    cols = [f"zone_{z}" for z in zones.ZONE_LETTERS]
    if all(c in row.index for c in cols) and not any(_missing(row[c]) for c in cols):
        return [int(row[c]) for c in cols]
    if row.get("lung_mask", "") and row.get("opacity_mask", ""):
        lung = images.read_mask(row["lung_mask"], cache)
        opacity = images.read_mask(row["opacity_mask"], cache)
        rec = zones.score_masks(lung, opacity, reference_threshold)
        return [int(rec["zones"][z]["affected"]) for z in zones.ZONE_LETTERS]
    return None


def _missing(v) -> bool:
    try:
        import pandas as pd

        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return v is None


def zone_fractions(record: dict) -> list[float]:
    return [record["zones"][z]["opacity_fraction"] for z in zones.ZONE_LETTERS]


def sweep_threshold(fractions: np.ndarray, refs: np.ndarray, grid: np.ndarray | None = None) -> dict:
    """Choose the zone threshold T by minimum score MAE (ties: lower RMSE, then smaller T).

    ``fractions`` (N x 6) are predicted opacity fractions, ``refs`` (N x 6) reference zone scores.
    The grid starts above 0, so a zone with no opacity (or no lung) is never counted.
    """
    grid = np.round(np.arange(0.01, 1.0001, 0.01), 4) if grid is None else grid
    ref_scores = refs.sum(axis=1)
    rows = []
    for t in grid:
        pred = (fractions >= t).sum(axis=1)
        err = pred - ref_scores
        rows.append((float(np.abs(err).mean()), float(np.sqrt((err ** 2).mean())), float(t)))
    mae, rmse, t = min(rows)
    return {"threshold": t, "mae": mae, "rmse": rmse, "n": int(len(refs)),
            "curve": [{"threshold": r[2], "mae": r[0], "rmse": r[1]} for r in rows]}
