"""The scoring policy: one code path from bytes to a record, for every caller.

    bytes -> :func:`~cxrtune.preprocessing.load_scan` (decode keeping the DICOM header, input
    checks, working size) -> Stage I -> lung cleanup (:func:`~cxrtune.zones.clean_lungs`) ->
    ROI from the cleaned lungs -> Stage II -> opacity map back in image coordinates -> refinement
    by the classifier (map x [p >= T_cls], seed 004 Eq. 1-2) cut at the bundle's opacity threshold
    -> lung split, equal-area zones, zone scores -> :func:`build_record`.

``cxrtune score``, ``evaluate``, ``calibrate``, the clinical objective of sweeps and the Serve
ingress all call it; Serve splits it at the stage boundaries: the stage deployments run only
:meth:`Scorer.forward` (the networks), the ingress everything around them with the same functions
(:func:`stage_input`, :func:`lung_output`, :func:`disease_input`, :func:`opacity_output`,
:func:`build_record`).

Records carry ``status``: ``scored``; ``partial`` (one lung found: only its zones are scored, the
other lung's zones are null); ``unscored`` (no lungs found, with a ``reason``). ``score`` is null
unless the status is ``scored``: a failure never reads as a healthy 0.

Imports neither the trainer nor the dataset: inference stands below training.
"""

from __future__ import annotations

import copy
import io
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import cv2
import numpy as np
import pandas as pd
import torch

from .. import images, zones
from ..errors import CxrtuneError
from ..model.artifacts import (
    BundleMeta,
    CheckpointMeta,
    Thresholds,
    bundle_hash,
    read_bundle_file,
    read_bundle_meta,
)
from ..model.models import ModelConfig, build_model, choose_device
from ..preprocessing import (
    Preprocessing,
    Scan,
    extract_roi,
    from_uint8,
    resize_image,
    to_uint8,
)
from ..zones import DEFAULT_ZONE_THRESHOLD
from .onnx_runtime import ONNX_RUNTIMES, RUNTIMES, load_onnx_stage, onnxruntime_available
from .plausibility import APPEARANCE_FILE, DEFAULT_CHECK, VIEW_FILE, AppearanceModel, PlausibilityCheck, ViewModel
from .record import ScoreRecord

MIN_LUNG_FRACTION = 0.005  # cleaned lungs under this share of the image: no lungs found
NO_LUNGS = "no lungs found: not a frontal chest radiograph, or Stage I failed on it"


@dataclass
class Detail:
    """What the record summarises, for overlays and evaluation."""
    lung: np.ndarray
    opacity: np.ndarray
    lungs: zones.LungPair


@dataclass
class StageModel:
    model: Any  # a torch module, or an OnnxStage that stands in for one (called alike)
    pre: Preprocessing
    config: dict
    metrics: dict = field(default_factory=dict)


def stage_name(meta: CheckpointMeta) -> str:
    """``arch/encoder@size``: how records and ``/v1/models`` name a stage's model."""
    m = meta.config["model"]
    return f"{m['arch']}/{m['encoder']}@{meta.preprocessing['size']}"


def has_lungs(lung: np.ndarray) -> bool:
    """Whether a cleaned Stage I mask holds lungs at all (at least ``MIN_LUNG_FRACTION`` of the
    image); without them a record is ``unscored`` and Stage II is not run."""
    return bool(lung.mean() >= MIN_LUNG_FRACTION)


def unscored_reason(image: np.ndarray, lung: np.ndarray, check: PlausibilityCheck = DEFAULT_CHECK) -> str | None:
    """Why an image is not scored, decided after Stage I and before Stage II: no lungs found, or
    not a frontal chest radiograph by the bundle's ``check`` (:mod:`.plausibility`); None: score it."""
    if not has_lungs(lung):
        return NO_LUNGS
    return check.refusal(image, lung)


def load_plausibility(uri: str, meta: BundleMeta) -> PlausibilityCheck:
    """The bundle's plausibility check: the nine ranges, with the appearance and view models that
    ``cxrtune calibrate`` stored in it (each checked against its hash), if any."""
    if APPEARANCE_FILE not in meta.files and VIEW_FILE not in meta.files:
        return DEFAULT_CHECK
    appearance = (AppearanceModel.from_bytes(read_bundle_file(uri, APPEARANCE_FILE, meta))
                  if APPEARANCE_FILE in meta.files else None)
    view = ViewModel.from_bytes(read_bundle_file(uri, VIEW_FILE, meta)) if VIEW_FILE in meta.files else None
    return PlausibilityCheck(appearance=appearance, view=view)


def build_record(lung: np.ndarray, opacity: np.ndarray | None, p_disease: float | None, threshold: float,
                 models: dict | None, scan: Scan | None = None, reason: str | None = None) -> tuple[ScoreRecord, Detail]:
    """The record of one image from the two stages' outputs (CLI and HTTP alike), and the masks
    behind it. ``lung`` is the cleaned Stage I mask; ``opacity`` is None when Stage II did not run
    (no lungs). The lungs are split once, for the zones and for any overlay.

    Args:
        p_disease: Stage II's p(disease); None when no classifier ran (a record from masks).
        models: what made the record (:func:`bundle_models`); None leaves the key out (masks).
        reason: why Stage II did not run (:func:`unscored_reason`): the unscored record's reason."""
    lungs = zones.split_lungs(lung)
    empty = np.zeros(lung.shape, bool)
    source = {"models": models,
              "input": {"format": scan.format, "width": scan.width, "height": scan.height} if scan is not None else None}
    if opacity is None or lungs.lungs_found == 0 or not has_lungs(lung):
        record = ScoreRecord.model_validate({
            "status": "unscored", "reason": reason or NO_LUNGS, "score": None, "zones": None, "lungs": None,
            "opacity_percent": None, "threshold": float(threshold), "lungs_found": 0, "disease_probability": None,
            **source})
        return record, Detail(lung, empty, lungs)
    opacity = opacity & lung
    scored = zones.score_lungs(lungs, opacity, threshold)
    status, reason, score = "scored", None, scored["score"]
    if lungs.lungs_found != 2:
        missing = "left" if not lungs.left.any() else "right"
        for letter in zones.LEFT_ZONES if missing == "left" else zones.RIGHT_ZONES:
            scored["zones"][letter] = {"affected": None, "opacity_fraction": None}
        scored["lungs"][missing] = None
        status, reason, score = "partial", f"one lung found: the patient's {missing} lung's zones are not scored", None
    record = ScoreRecord.model_validate({**scored, "status": status, "reason": reason, "score": score, **source,
                                         "disease_probability": None if p_disease is None else round(float(p_disease), 4)})
    return record, Detail(lung, opacity, lungs)


def score_mask_files(lung_uri: str, opacity_uri: str, threshold: float) -> dict:
    """``cxrtune score-masks``: the record of given lung and opacity masks, made by the scoring
    policy (:func:`build_record`): ``unscored`` without lungs, ``partial`` with null zones for a
    lung not found, never a 0 that reads as healthy."""
    lung, opacity = images.read_mask(lung_uri), images.read_mask(opacity_uri)
    if lung.shape != opacity.shape:
        raise CxrtuneError(f"{opacity_uri}: {opacity.shape[1]}x{opacity.shape[0]} does not match the lung "
                           f"mask's {lung.shape[1]}x{lung.shape[0]}")
    return build_record(lung, opacity, None, threshold, None)[0].to_dict()


def stage_input(image: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """A stage's input, uint8: the image at the model's size, or as it is when it has fewer
    pixels than that (the stage resizes it: a 256-px image is not sent at 512 px)."""
    if image.shape[0] * image.shape[1] > pre.size * pre.size:
        image = resize_image(image, pre.size)
    return to_uint8(image)


def lung_output(prob: np.ndarray, shape: tuple[int, int], threshold: float = 0.5) -> np.ndarray:
    """Stage I's uint8 probabilities -> the cleaned bool lung mask at the image's size (a threshold
    that is not a multiple of 1/255 is met within 1/510 of it)."""
    full = cv2.resize(from_uint8(prob), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return zones.clean_lungs(full >= threshold)


def disease_input(image: np.ndarray, lung: np.ndarray, pre: Preprocessing) -> tuple[np.ndarray, tuple | None]:
    """Stage II's input: the ROI of the cleaned lungs (uint8, :func:`stage_input`), and its box."""
    roi, _, box = extract_roi(image, lung)
    return stage_input(roi, pre), box


def opacity_probability(prob: np.ndarray, box: tuple | None, shape: tuple[int, int]) -> np.ndarray:
    """Stage II's uint8 opacity map of the ROI -> float32 probabilities in image coordinates (0
    outside the ROI's box)."""
    canvas = np.zeros(shape, np.float32)
    if box is None:
        canvas[:] = cv2.resize(from_uint8(prob), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    else:
        y0, y1, x0, x1 = box
        canvas[y0:y1, x0:x1] = cv2.resize(from_uint8(prob), (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    return canvas


def refine(probability: np.ndarray, p_disease: float, cls_threshold: float, threshold: float) -> np.ndarray:
    """Seed 004 Eq. 1-2: the opacity map counts only when p(disease) >= T_cls; it is opacity where
    it is >= the bundle's ``opacity_threshold``."""
    if p_disease < cls_threshold:
        return np.zeros(probability.shape, bool)
    return probability >= threshold


def opacity_output(prob: np.ndarray, p_disease: float, box: tuple | None, shape: tuple[int, int],
                   cls_threshold: float, threshold: float) -> tuple[np.ndarray, float]:
    """Stage II's outputs -> the refined opacity mask in image coordinates (:func:`refine`), and p."""
    return refine(opacity_probability(prob, box, shape), p_disease, cls_threshold, threshold), float(p_disease)


def _to_model_size(u8: np.ndarray, size: int) -> np.ndarray:
    return u8 if u8.shape == (size, size) else resize_image(u8, size)


def _to_input_shape(prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A model-size probability map at its input's shape (smaller inputs get smaller answers), uint8."""
    if prob.shape != tuple(shape):
        prob = cv2.resize(prob, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return to_uint8(prob)


def _load_stage(uri: str, stage: str, meta: BundleMeta, device: torch.device, runtime: str) -> StageModel:
    """One stage of a bundle: its torch network, or (ONNX runtimes) the ONNX Runtime session that
    stands in for it; the torch network is then never built."""
    m = meta.stage(stage)
    pre = Preprocessing.from_dict(m.preprocessing)
    if runtime in ONNX_RUNTIMES:

        return StageModel(load_onnx_stage(uri, stage, meta.onnx, int8=runtime == "onnx-int8"), pre, m.config, m.metrics)
    cfg = dict(m.config["model"])
    cfg["encoder_weights"] = None  # the bundle's weights replace any pretrained ones
    cfg["classification"] = m.task == "disease"
    model = build_model(ModelConfig(**cfg))
    state = read_bundle_file(uri, f"{stage}.pt", meta)  # checked against bundle.json's hash
    model.load_state_dict(torch.load(io.BytesIO(state), map_location="cpu", weights_only=True))
    # channels_last on every device: on a 2-core CPU, ResNet-18 U-Net/FPN inference 1.23-1.49x (bench/memory_format.py)
    model = model.to(device, memory_format=torch.channels_last).eval()  # type: ignore[call-overload]  # torch's stub lacks memory_format
    return StageModel(model, pre, m.config, m.metrics)


class Scorer:
    """Both stages, loaded once; scores lists of working images in batches (on GPU if any)."""
    def __init__(self, lung: StageModel | None, disease: StageModel | None, thresholds: Thresholds = Thresholds(),
                 device: torch.device | None = None, batch_size: int = 8, models: dict | None = None,
                 runtime: str = "torch", plausibility: PlausibilityCheck = DEFAULT_CHECK):
        """Either stage may be None where only the other is used (one Serve deployment each).
        ``models`` names them in records (:func:`bundle_models`). A scorer is not changed after it
        is made: :meth:`with_thresholds` and :meth:`with_stage` make new ones."""
        self.lung, self.disease = lung, disease
        self.thresholds = thresholds
        loaded = lung or disease
        if loaded is None:
            raise ValueError("a scorer needs at least one stage")
        self.device = device or next(loaded.model.parameters()).device
        self.batch_size = batch_size
        self.models = models or {}
        self.runtime = runtime  # "torch", "onnx" or "onnx-int8": which runs the networks
        self.plausibility = plausibility  # what decides, before Stage II, that an input is not a frontal CXR

    def with_thresholds(self, **changes) -> "Scorer":
        """The same networks with some thresholds changed (``zone``, ``cls``, ``lung``, ``opacity``
        and their calibrations, as :class:`~cxrtune.model.artifacts.Thresholds` names them)."""
        return copy.copy(self)._set(thresholds=replace(self.thresholds, **changes))

    def with_stage(self, stage: str, model: StageModel) -> "Scorer":
        """The same scorer with ``stage`` (``lung`` or ``disease``) run by another network: a
        sweep's trial scored through a fixed Stage I."""
        if stage not in ("lung", "disease"):
            raise ValueError(f"stage must be lung or disease, got {stage!r}")
        return copy.copy(self)._set(**{stage: model})

    def stage(self, name: str) -> StageModel:
        """The loaded ``lung`` or ``disease`` stage (a scorer made for one stage has only it)."""
        model = self.lung if name == "lung" else self.disease
        if model is None:
            raise CxrtuneError(f"this scorer was loaded without its {name} stage")
        return model

    def _set(self, **fields) -> "Scorer":
        self.__dict__.update(fields)
        return self

    # ---------------------------------------------------------------------------------- stages
    # Each stage is input -> forward -> output. Inputs are uint8, at the model's size or smaller
    # (:func:`stage_input`); outputs are uint8 probabilities at each input's shape: the lean
    # payloads Serve moves between the ingress and the stage deployments (which run ``forward``
    # only). The library path runs the same three steps, so the CLI and HTTP give the same records.
    def forward(self, stage: str, inputs: list[np.ndarray]):
        """Run one stage's network on uint8 inputs (resized here to the model's size), in batches.
        Lung: a uint8 probability map per input, at the input's shape; disease: ``(uint8 map,
        p(disease))`` per input."""
        model = self.stage(stage)
        out: list = []
        for i in range(0, len(inputs), self.batch_size):
            batch = inputs[i:i + self.batch_size]
            x = self.model_input(stage, batch)
            if self.runtime == "torch":  # ONNX Runtime wants plain NCHW: it would copy a channels_last array
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                        enabled=self.device.type == "cuda"):
                y = model.model(x)
            seg = y if stage == "lung" else y[0]
            probs = [_to_input_shape(p, u8.shape) for p, u8 in zip(torch.sigmoid(seg.float())[:, 0].cpu().numpy(), batch)]
            if stage == "lung":
                out += probs
            else:
                out += list(zip(probs, torch.sigmoid(y[1].float())[:, 0].cpu().numpy().tolist()))
        return out

    def model_input(self, stage: str, inputs: list[np.ndarray]) -> torch.Tensor:
        """A stage's uint8 inputs as the network's normalised NCHW batch, on the scorer's device
        (also what int8 calibration feeds ONNX Runtime)."""
        pre = self.stage(stage).pre
        return torch.stack([pre.to_tensor(_to_model_size(u8, pre.size)) for u8 in inputs]).to(self.device)

    def lung_masks(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Stage I and the lung cleanup: cleaned bool lung masks at each image's size."""
        probs = self.forward("lung", [stage_input(im, self.stage("lung").pre) for im in images])
        return [lung_output(p, im.shape, self.thresholds.lung) for im, p in zip(images, probs)]

    def opacity_maps(self, images: list[np.ndarray], lungs: list[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        """Stage II on the ROI of the cleaned lungs: ``(opacity probabilities in image coordinates,
        p(disease))`` per image, before refinement (what calibration sweeps the thresholds on)."""
        prepared = [disease_input(im, lung, self.stage("disease").pre) for im, lung in zip(images, lungs)]
        outs = self.forward("disease", [x for x, _ in prepared])
        return [(opacity_probability(prob, box, im.shape), p) for im, (_, box), (prob, p) in zip(images, prepared, outs)]

    def opacity_masks(self, images: list[np.ndarray], lungs: list[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        """Stage II refined by the classifier (:func:`refine`): ``(mask, p)`` per image, the mask
        in image coordinates. A scorer ``with_thresholds(cls=0.0)`` keeps every mask (calibration
        chooses T_cls afterwards)."""
        return [(refine(prob, p, self.thresholds.cls, self.thresholds.opacity), float(p))
                for prob, p in self.opacity_maps(images, lungs)]

    # ---------------------------------------------------------------------------------- policy
    def score_images(self, images: list[np.ndarray], lungs: list[np.ndarray] | None = None,
                     scans: list[Scan] | None = None) -> list[tuple[dict, Detail]]:
        """Records (and the masks behind them) for working images (float32 in [0, 1]).
        ``lungs`` skips Stage I with masks already made by :meth:`lung_masks`."""
        if not images:
            return []
        t0 = time.perf_counter()
        lungs = self.lung_masks(images) if lungs is None else lungs
        t1 = time.perf_counter()
        reasons = [unscored_reason(image, lung, self.plausibility) for image, lung in zip(images, lungs)]
        found = [i for i, reason in enumerate(reasons) if reason is None]
        stage2 = dict(zip(found, self.opacity_masks([images[i] for i in found], [lungs[i] for i in found]))) if found else {}
        t2 = time.perf_counter()
        n = len(images)
        results = []
        for i, lung in enumerate(lungs):
            opacity, p = stage2.get(i, (None, None))
            digest = self.models.get("bundle_hash")
            models = record_models(self.models_info(), {"lung": digest, "disease": digest if i in stage2 else None},
                                   {"lung": self.runtime, "disease": self.runtime if i in stage2 else None})
            typed, detail = build_record(lung, opacity, p, self.thresholds.zone, models, scans[i] if scans else None,
                                         reasons[i])
            record = typed.to_dict()
            record["timings_ms"] = {"stage1": round(1000 * (t1 - t0) / n, 2), "stage2": round(1000 * (t2 - t1) / n, 2)}
            results.append((record, detail))
        return results

    def score_scans(self, scans: list[Scan]) -> list[tuple[dict, Detail]]:
        """:meth:`score_images` for inputs from :func:`~cxrtune.preprocessing.load_scan`."""
        return self.score_images([s.image for s in scans], scans=scans)

    def models_info(self) -> dict:
        return dict(self.models)


def bundle_models(meta: BundleMeta, content_hash: str = "") -> dict:
    """How records (CLI and HTTP) name a bundle's models."""
    return {"lung": stage_name(meta.lung), "disease": stage_name(meta.disease), "cls_threshold": meta.cls_threshold,
            "opacity_threshold": meta.opacity_threshold, "lung_threshold": meta.lung_threshold, "bundle": meta.name,
            "bundle_hash": content_hash, "created": meta.created}


def record_models(base: dict, stage_bundles: dict, stage_runtimes: dict) -> dict:
    """A record's ``models``: the bundle's (:func:`bundle_models`) with the content hash of the
    bundle behind each stage's answer and what ran it (None for a stage that did not run)."""
    return {**base, "stage_bundles": stage_bundles, "stage_runtimes": stage_runtimes}


def choose_runtime(runtime: str, device: torch.device, meta: BundleMeta) -> str:
    """``auto``: ONNX Runtime (FP32) on a CPU when the bundle has an ONNX export and onnxruntime is
    installed, else torch. ``onnx`` and ``onnx-int8`` insist (and say what is missing); int8 is
    never chosen for you: its numbers differ slightly from the FP32 networks'."""
    if runtime not in RUNTIMES:
        raise CxrtuneError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "auto":
        return "onnx" if device.type == "cpu" and meta.onnx and onnxruntime_available() else "torch"
    if runtime in ONNX_RUNTIMES:
        if device.type != "cpu":
            raise CxrtuneError(f"runtime {runtime} runs on the CPU; use torch on a GPU")
        if not meta.onnx:
            raise CxrtuneError("the bundle has no ONNX export: run `cxrtune bundle export onnx BUNDLE --out NEW`")
        if runtime == "onnx-int8" and not meta.onnx.get("int8"):
            raise CxrtuneError("the bundle has no int8 export: run `cxrtune bundle export onnx-int8 BUNDLE "
                               "--out NEW --calibration IMAGES`")
        if not onnxruntime_available():
            raise CxrtuneError(f"runtime {runtime} needs onnxruntime: pip install onnxruntime")
    return runtime


def load_bundle(uri: str, device: str | None = None, batch_size: int = 8,
                stages: tuple[str, ...] = ("lung", "disease"), runtime: str = "auto") -> Scorer:
    """Load a bundle's models (``stages`` picks which) onto ``device`` (default: GPU if any),
    run by torch or ONNX Runtime (:func:`choose_runtime`)."""
    meta = read_bundle_meta(uri)
    dev = choose_device(device)
    runtime = choose_runtime(runtime, dev, meta)
    loaded = {stage: _load_stage(uri, stage, meta, dev, runtime) for stage in stages}
    return Scorer(loaded.get("lung"), loaded.get("disease"), Thresholds.of(meta), device=dev, batch_size=batch_size,
                  models=bundle_models(meta, bundle_hash(uri)), runtime=runtime,
                  plausibility=load_plausibility(uri, meta))


def stage_one_lungs(uri: str, batch_size: int = 8) -> Callable[[np.ndarray], np.ndarray]:
    """A bundle's Stage I with the lung cleanup as an image -> bool lung mask function: the ROI a
    grading recipe is trained on when it takes its lungs from a scorer (``lung_bundle``)."""
    stage1 = load_bundle(uri, stages=("lung",), batch_size=batch_size)
    return lambda image: stage1.lung_masks([image])[0]


# -------------------------------------------------------------------------- references and sweeps

def reference_zones(row, reference_threshold: float = DEFAULT_ZONE_THRESHOLD, cache=None,
                    reference: str = "auto") -> list[int] | None:
    """Reference zone scores A-F (0/1) of a manifest row, or None when it has none.

    ``reference``: a reader id (``S`` or ``reader:S``: that reader's grades > 0, from the
    ``reader_S_A`` .. ``reader_S_F`` columns); ``zones`` (the ``zone_*`` columns); ``masks``
    (derived from the reference lung and opacity masks with ``reference_threshold``); ``auto``
    (zone columns, else masks)."""
    if reference not in ("auto", "zones", "masks"):
        reader = reference.split(":", 1)[-1]
        cols = [f"reader_{reader}_{z}" for z in zones.ZONE_LETTERS]
        if not all(c in row.index for c in cols) or any(_missing(row[c]) for c in cols):
            return None
        return [int(int(row[c]) > 0) for c in cols]
    cols = [f"zone_{z}" for z in zones.ZONE_LETTERS]
    if reference != "masks" and all(c in row.index for c in cols) and not any(_missing(row[c]) for c in cols):
        return [int(row[c]) for c in cols]
    if reference != "zones" and row.get("lung_mask", "") and row.get("opacity_mask", ""):
        lung = images.read_mask(row["lung_mask"], cache)
        opacity = images.read_mask(row["opacity_mask"], cache)
        rec = zones.score_masks(lung, opacity, reference_threshold)
        return [int(rec["zones"][z]["affected"]) for z in zones.ZONE_LETTERS]
    return None


def _missing(v) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return v is None


def zone_fractions(record: dict) -> list[float] | None:
    """The six zones' opacity fractions of a scored record (None unless status is scored)."""
    if record.get("status") != "scored":
        return None
    return [record["zones"][z]["opacity_fraction"] for z in zones.ZONE_LETTERS]


def score_error(record: dict, reference_score: int) -> int:
    """A record's 0-6 score error against a reference score. A record that is not ``scored``
    (partial or unscored) gives none, so it counts as the worst error possible for that reference:
    a model cannot look better by failing on the hard images (the sweep objective, the release gate)."""
    if record.get("status") == "scored":
        return abs(int(record["score"]) - int(reference_score))
    return max(int(reference_score), 6 - int(reference_score))


def normal_fp_rate(scores) -> float | None:
    """The FP rate on Normal: the share of Normal images' records with a score > 0 (a record
    without a score, partial or unscored, is not a false positive); None without Normal images.
    ``scores``: those records' scores (None or NaN where there is none)."""
    values = [0.0 if s is None or s != s else float(s) for s in scores]
    return float(np.mean([v > 0 for v in values])) if values else None


ZONE_GRID = np.round(np.arange(0.01, 1.0001, 0.01), 4)  # candidate zone thresholds T (seed 004 Table 9)


def sweep_threshold(fractions: np.ndarray, refs: np.ndarray, grid: np.ndarray | None = None) -> dict:
    """Choose the zone threshold T by minimum score MAE (ties: lower RMSE, then smaller T).

    ``fractions`` (N x 6) are predicted opacity fractions, ``refs`` (N x 6) reference zone scores.
    The grid starts above 0, so a zone with no opacity (or no lung) is never counted.
    """
    grid = ZONE_GRID if grid is None else grid
    ref_scores = refs.sum(axis=1)
    rows = []
    for t in grid:
        pred = (fractions >= t).sum(axis=1)
        err = pred - ref_scores
        rows.append((float(np.abs(err).mean()), float(np.sqrt((err ** 2).mean())), float(t)))
    mae, rmse, t = min(rows)
    return {"threshold": t, "mae": mae, "rmse": rmse, "n": int(len(refs)),
            "curve": [{"threshold": r[2], "mae": r[0], "rmse": r[1]} for r in rows]}
