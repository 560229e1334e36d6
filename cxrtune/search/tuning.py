"""``cxrtune tune``: Ray Tune + Optuna (TPE, for one objective or two) + ASHA/HyperBand.

Every trial runs the same :class:`~cxrtune.model.train.Trainer` as ``cxrtune train`` and reports each
epoch with ``tune.report(metrics, checkpoint=...)``. Results and checkpoints go to a local folder or
S3 (through a pyarrow filesystem with the same endpoint as everything else). The experiment folder
also holds ``cxrtune.json`` (the options, the search space and the manifest URI), so
``--resume EXP_URI`` and ``cxrtune report`` need nothing else. Tune saves the searcher (the Optuna
study with every finished trial) beside the experiment, so a resumed sweep continues the study
rather than starting a new one.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from ray.tune import Stopper

from .. import storage
from ..cluster import check_fits, full_disk, init_ray, keep_secrets_out_of_trial_runtime_envs, max_parallel, ray_temp_dir
from ..config_files import known_settings, load_yaml
from ..data import manifest
from ..data.phantom import embedded_manifest
from ..data.splits import split_hash
from ..errors import CxrtuneError
from ..model.artifacts import DEFAULT_OPACITY_THRESHOLD, check_format, read_json_object
from ..model.grading import GradeConfig, flat_metrics, train_grader
from ..model.models import model_gmacs
from ..model.train import (
    TrainConfig,
    Trainer,
    check_tuning_subset,
    load_training_state,
    patience_step,
    remove_orphaned_staging,
)
from ..preprocessing import load_scan
from ..scoring.evaluation import choose_cls_threshold
from ..scoring.scorer import (
    StageModel,
    load_bundle,
    normal_fp_rate,
    reference_zones,
    score_error,
    stage_one_lungs,
    sweep_threshold,
    zone_fractions,
)
from .latency_table import TRIAL_COLUMN, load_latency_table, parse_latency_table
from .search_space import SearchSpace, load_space, parse_space, settings_of
from .study_storage import DatabaseStorage, check_storage_url

log = logging.getLogger(__name__)
EXPERIMENT_FILE = "cxrtune.json"
EXPERIMENT_FORMAT = "cxrtune-experiment/2"  # experiments written before it was recorded read as /1
COST_METRIC = "gmacs"  # the second objective of --multi-objective: the network's GMACs per image, unless
# a latency table gives each network's measured int8 ms (TuneOptions.cost_metric)
UNKNOWN_VIOLATION = 1e6  # a constraint on a metric the trial never reported (finite: storages keep JSON)
JOURNAL_FILE = "optuna.journal"
LATENCY_TABLE_FILE = "latency_table.csv"  # the sweep's copy of --latency-table, which its trials read
SCHEDULERS = ("asha", "hyperband", "none")
SAMPLERS = ("tpe", "gp", "random")
DEFAULT_EPOCHS = 16
EMBEDDED_OPTIONS = {"num_samples": 6, "max_epochs": 4, "grace": 1}  # the embedded default: minutes on a laptop

# The embedded default's space: a small lung-segmentation sweep that finishes in a few minutes on
# a laptop CPU over the phantom dataset (the full seed-004 spaces are in search_spaces/).
EMBEDDED_SPACE = {
    "description": "embedded default: small lung-segmentation sweep on phantoms",
    "task": "lung", "objective": "dice",
    "fixed": {"batch_size": 4, "model": {"in_channels": 1}},
    "parameters": {
        "arch": {"type": "choice", "values": ["FPN", "Unet", "Linknet"]},
        "encoder": {"type": "choice", "values": ["resnet18"]},
        "size": {"type": "int", "low": 64, "high": 96, "step": 32},
        "seg_loss": {"type": "choice", "values": ["dice", "bce", "focal"]},
        "optimizer": {"type": "choice", "values": ["adam", "adamw", "sgd"]},
        "lr": {"type": "log-float", "low": 1e-4, "high": 1e-2},
    },
}


def cost_metric_for(latency_table: str | None) -> str:
    """The second objective's metric: ``int8_ms`` with a latency table, else ``gmacs``. The one
    rule, for a sweep's options and for a script that has none yet."""
    return TRIAL_COLUMN if latency_table else COST_METRIC


def split_condition(text: str, what: str) -> tuple[str, str, str]:
    """``NAME<=VALUE`` or ``NAME>=VALUE`` as (name, op, value text): the one parser of the
    conditions of ``--constraint`` and ``promote --pick``; ``what`` names the flag in errors."""
    for op in ("<=", ">="):
        name, sep, value = str(text).partition(op)
        if sep and name.strip() and value.strip():
            return name.strip(), op, value.strip()
    raise CxrtuneError(f"{what} {text!r}: expected NAME<=VALUE or NAME>=VALUE")


@dataclass(frozen=True)
class Constraint:
    """A limit on a metric every trial reports (``--constraint 'val_fp_rate_normal<=0.10'``). Set on
    the Optuna trial before it is told (``Trial.set_constraint``: <= 0 is feasible), so it is stored
    in the study, survives a resume, steers TPE away from infeasible regions and keeps violators
    out of ``best_trials`` and the report's front."""
    metric: str
    op: str  # "<=" or ">="
    limit: float

    @classmethod
    def parse(cls, text: str) -> Constraint:
        name, op, value = split_condition(text, "--constraint")
        try:
            limit = float(value)
        except ValueError:
            limit = math.nan
        if not math.isfinite(limit):
            raise CxrtuneError(f"--constraint {text!r}: the limit must be a finite number, "
                               "e.g. val_fp_rate_normal<=0.10")
        return cls(name, op, limit)

    def violation(self, value: float) -> float:
        """How far ``value`` is past the limit (<= 0: feasible)."""
        return float(value) - self.limit if self.op == "<=" else self.limit - float(value)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.limit:g}"


@dataclass(frozen=True)
class TuneOptions:
    """Every setting of a sweep, with its default: the one place they are defined (the CLI's
    flags take their defaults from here). Saved as ``cxrtune.json`` in the experiment."""
    space: dict
    manifest: str
    name: str
    storage: str
    num_samples: int = 16
    scheduler: str = "asha"
    max_epochs: int | None = None  # None: the space's `fixed: epochs`, else DEFAULT_EPOCHS
    grace: int = 4
    reduction_factor: float = 2
    patience: int = 6  # per-trial early stopping (0 = off)
    min_delta: float = 0.01
    cut_below: float | None = None  # a trial whose metric is still worse than this after epoch 1 stops there
    cpus_per_trial: float = 1
    gpus_per_trial: float = 0
    max_concurrent: int | None = None
    time_budget_s: float | None = None
    objective: str | None = None
    multi_objective: bool = False
    latency_table: str = ""  # the second objective: the int8 ms measured per network in this table, not GMACs
    lung_bundle: str | None = None
    wandb_project: str | None = None
    wandb_images: bool = False  # validation overlays of the manifest's images to W&B: patient images leave the site
    seed: int = 0
    sampler: str = "tpe"  # "tpe" or "gp" (Bayesian), or "random" (the baseline)
    startup_trials: int | None = None  # the sampler's random start-up trials; None: sized to the budget
    max_failures: int = 2
    num_cpus: int | None = None  # for a local Ray instance
    optuna_storage: str | None = None  # a database URL without its password; default: a journal file beside the experiment
    warm_start: list = field(default_factory=list)  # configurations tried first, besides the space's own
    reference: str = "auto"  # score_mae's reference: a reader id (reader_<ID>_A..F columns), zones, masks or auto
    constraints: list = field(default_factory=list)  # "METRIC<=LIMIT" / "METRIC>=LIMIT": feasible trials only on the front
    split_hash: str = ""  # the manifest's split and tuning assignment when the sweep started (splits.split_hash)
    grid: bool = False  # every combination of the space's choice parameters, once each (seed 000's design)
    space_source: str = ""
    created: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        """Every check of the options together, once, before anything starts (the space's own
        checks run in :func:`~cxrtune.search.search_space.parse_space`)."""
        space = self.search_space()
        checks = (
            (self.scheduler in SCHEDULERS, f"--scheduler must be one of {', '.join(SCHEDULERS)}"),
            (self.sampler in SAMPLERS, f"--sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}"),
            (not self.multi_objective or space.objective in ("dice", "dice_cls", "score_mae"),
             "multi-objective mode supports the dice, dice_cls and score_mae objectives"),
            (not (self.grid and (self.multi_objective or self.warm_start or space.warm_start)),
             "--grid runs every combination once: it takes no --multi-objective and no warm start"),
            (not self.latency_table or self.multi_objective,
             "--latency-table gives a multi-objective sweep its cost: add --multi-objective"),
            (not self.constraints or self.multi_objective,
             "--constraint shapes a multi-objective front (add --multi-objective): with one objective the best "
             "trial would be chosen whatever its constraints"),
            (space.objective != "score_mae" or bool(self.lung_bundle),
             "--objective score_mae needs --lung-bundle (a fixed Stage I bundle)"),
            (not self.wandb_images or bool(self.wandb_project), "--wandb-images needs --wandb-project"),
            (self.startup_trials is None or 1 <= self.startup_trials <= self.num_samples,
             f"--startup-trials must be between 1 and --num-samples ({self.num_samples}), got {self.startup_trials}"),
        )
        for ok, message in checks:
            if not ok:
                raise CxrtuneError(message)
        if self.optuna_storage:
            check_storage_url(self.optuna_storage)
        self.trial_constraints()  # each one parses
        for i, point in enumerate(self.warm_start):  # each one is a point of the space
            space.optuna_params(point, f"--warm-start point {i}")

    @property
    def cost_metric(self) -> str:
        """The second objective's metric (see :func:`cost_metric_for`)."""
        return cost_metric_for(self.latency_table)

    def trial_constraints(self) -> list[Constraint]:
        return [Constraint.parse(c) for c in self.constraints]

    @property
    def experiment_uri(self) -> str:
        return storage.join(self.storage, self.name)

    def train_epochs(self, space: SearchSpace) -> int:
        """The recipe's ``epochs``: ``--max-epochs`` if given, else the space's fixed epochs."""
        return int(self.max_epochs or space.fixed.get("epochs") or DEFAULT_EPOCHS)

    def epochs(self, space: SearchSpace) -> int:
        """Epochs per trial (I_max), the results a trial reports: :meth:`train_epochs`, plus a
        grading trial's head-only transfer epochs."""
        n = self.train_epochs(space)
        cfg = space.train_config({"epochs": n})
        return cfg.total_epochs if isinstance(cfg, GradeConfig) else n

    def search_space(self) -> SearchSpace:
        data = dict(self.space)
        if self.objective:
            data["objective"] = self.objective
        return parse_space(data, self.space_source or "<space>")


# the settings `cxrtune tune` takes as flags of the same name (their defaults are TuneOptions')
TUNE_FLAGS = {f for f in TuneOptions.__dataclass_fields__} - {
    "space", "manifest", "name", "storage", "space_source", "created", "time_budget_s", "warm_start", "constraints",
    "split_hash"}


# ------------------------------------------------------------------------------------ the trial

@dataclass(frozen=True)
class OperatingPoint:
    """A Stage II trial judged at its own operating point on its validation rows: T_cls at
    maximum F1 on the labelled rows, then T at minimum score MAE on the rows with a reference,
    and what the scoring policy gives there."""
    score_mae: float
    cls_threshold: float
    zone_threshold: float
    f1: float | None
    fp_rate_normal: float | None  # Normal rows whose record has a score > 0 (unscored: not counted as FP)
    n: int
    n_normal: int

    def metrics(self) -> dict:
        """What the trial reports to Tune (``val_`` names; a missing value as NaN -> 0 is not
        reported, so a constraint on it fails loudly rather than passing)."""
        out = {"val_score_mae": self.score_mae, "val_cls_threshold": self.cls_threshold,
               "val_zone_threshold": self.zone_threshold, "val_n": self.n, "val_n_normal": self.n_normal}
        if self.f1 is not None:
            out["val_f1_at_t_cls"] = self.f1  # val_f1 is the trainer's, at 0.5
        if self.fp_rate_normal is not None:
            out["val_fp_rate_normal"] = self.fp_rate_normal
        return out


class ClinicalObjective:
    """Validation severity-score MAE of a Stage II trial through a fixed Stage I bundle, scored by
    the scoring policy (:meth:`cxrtune.scoring.scorer.Scorer.score_images`), at the trial's own
    operating point (:class:`OperatingPoint`).

    Stage I is fixed, so the validation images (through ``load_scan``), their cleaned lung masks,
    labels and reference zones are computed once; each epoch runs Stage II twice: once with every
    opacity map kept (T_cls 0) to choose T_cls (:func:`~cxrtune.scoring.evaluation.choose_cls_threshold`,
    maximum F1) and T (:func:`~cxrtune.scoring.scorer.sweep_threshold` on the fractions refined at
    that T_cls), once at (T_cls, T) for the records the MAE and the FP rate on Normal are read from.
    The opacity map is cut at the default 0.5 (the bundle's calibrated cut belongs to its own
    Stage II). A record that is not ``scored`` counts with the worst error its reference allows: a
    trial gains nothing by failing to score. The thresholds are chosen on the rows they are judged
    on, as calibration later does on its own rows: the objective ranks trials, the bundle's
    figures come from held-out rows."""
    def __init__(self, bundle_uri: str, rows, limit: int | None = None, reference: str = "auto"):
        self.bundle = load_bundle(bundle_uri).with_thresholds(opacity=DEFAULT_OPACITY_THRESHOLD)
        cache = storage.ContentCache()
        self.images: list[np.ndarray] = []
        self.refs: list[list[int] | None] = []
        self.labels: list[int | None] = []
        for _, row in rows.iterrows():
            ref = reference_zones(row, cache=cache, reference=reference)
            label = row.get("label")
            if ref is None and not manifest.is_labelled(label):
                continue
            try:
                self.images.append(load_scan(cache.read_bytes(row["image"])).image)
            except CxrtuneError as exc:  # an unreadable or refused image must not end the sweep
                log.warning("score_mae: a validation image is skipped: %s", exc)
                continue
            self.refs.append(ref)
            self.labels.append(int(manifest.is_disease(label)) if manifest.is_labelled(label) else None)
            if limit and len(self.images) >= limit:
                break
        if not any(r is not None for r in self.refs):
            raise CxrtuneError(f"score_mae needs validation rows with reference {reference!r} zone scores")
        self.lungs = self.bundle.lung_masks(self.images)

    def __call__(self, model, pre, config: dict) -> OperatingPoint:
        was_training = model.training
        model.eval()
        try:
            trial = self.bundle.with_stage("disease", StageModel(model, pre, config))
            every_map = [r for r, _ in trial.with_thresholds(cls=0.0).score_images(self.images, lungs=self.lungs)]
            t_cls, f1 = self._cls_threshold(every_map)
            fracs, refs = [], []
            for record, ref in zip(every_map, self.refs):
                f = zone_fractions(record)
                if ref is not None and f is not None:
                    fracs.append(f if record["disease_probability"] >= t_cls else [0.0] * 6)
                    refs.append(ref)
            t_zone = (sweep_threshold(np.array(fracs), np.array(refs))["threshold"] if refs
                      else self.bundle.thresholds.zone)
            records = [r for r, _ in trial.with_thresholds(cls=t_cls, zone=t_zone).score_images(self.images,
                                                                                                 lungs=self.lungs)]
        finally:
            model.train(was_training)
        errors = [score_error(r, sum(ref)) for r, ref in zip(records, self.refs) if ref is not None]
        normal = [r for r, label in zip(records, self.labels) if label == 0]
        fp = normal_fp_rate([r.get("score") for r in normal])
        return OperatingPoint(score_mae=float(np.mean(errors)), cls_threshold=t_cls, zone_threshold=t_zone,
                              f1=f1, fp_rate_normal=fp, n=len(errors), n_normal=len(normal))

    def _cls_threshold(self, records: list[dict]) -> tuple[float, float | None]:
        """T_cls at maximum F1 over the labelled rows Stage II scored; the bundle's own without
        both classes among them."""
        pairs = [(r["disease_probability"], label) for r, label in zip(records, self.labels)
                 if label is not None and r.get("disease_probability") is not None]
        if len({label for _, label in pairs}) < 2:
            return self.bundle.thresholds.cls, None
        prob, label = (np.array(column) for column in zip(*pairs))
        choice = choose_cls_threshold(prob, label)
        return choice["threshold"], choice["f1"]


OVERLAY_KEY = "overlays_png_b64"


def validation_overlays(trainer, n: int = 3) -> str:
    """A few validation images with the reference (green) and predicted (red) masks, as one
    base64 PNG string: small enough for Tune's result files, decoded for W&B by the callback."""
    tiles = []
    model = trainer.eval_model  # what is validated and checkpointed
    model.eval()
    with torch.inference_mode():
        for i in range(min(n, len(trainer.val_ds))):
            item = trainer.val_ds[i]
            out = model(item["image"][None].to(trainer.device))
            logits = out[0] if isinstance(out, tuple) else out
            pred = (torch.sigmoid(logits.float())[0, 0] >= 0.5).cpu().numpy().astype(np.uint8)
            ref_key = "lung_mask" if trainer.cfg.task == "lung" else "opacity_mask"
            ref = (item[ref_key][0].numpy() > 0.5).astype(np.uint8)
            grey = item["image"][0].numpy() * trainer.pre.std + trainer.pre.mean
            tile = cv2.cvtColor((np.clip(grey, 0, 1) * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
            for mask, colour in ((ref, (80, 220, 80)), (pred, (40, 40, 230))):
                contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
                cv2.drawContours(tile, contours, -1, colour, 1)
            tiles.append(tile)
    model.train()
    if not tiles:
        return ""
    ok, buf = cv2.imencode(".png", np.hstack(tiles))
    return base64.b64encode(buf.tobytes()).decode("ascii") if ok else ""


def run_trial(config: dict, opts: dict, space: SearchSpace) -> None:
    """The Tune function trainable: one config, trained epoch by epoch, reported to Tune. The
    search space arrives parsed (``tune.with_parameters``), never re-read."""
    from ray import tune


    o = TuneOptions(**opts)
    if space.task == "grade":
        return run_grade_trial(config, o, space)
    sampled = space.train_config(settings_of(config))
    assert isinstance(sampled, TrainConfig)  # a segmentation space (grade spaces went above)
    epochs = o.epochs(space)
    cfg = replace(sampled, epochs=epochs, patience=epochs + 1, seed=o.seed)  # Tune's stoppers stop trials
    df = manifest.load_manifest(o.manifest, check_files=False)
    trainer = Trainer(cfg, df)
    ckpt = tune.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            trainer.load_state(load_training_state(str(Path(d) / "state.pt")))
    cost = model_gmacs(trainer.eval_model, cfg.size, cfg.model.in_channels) if o.multi_objective else None
    measured = (load_latency_table(storage.join(o.experiment_uri, LATENCY_TABLE_FILE)).latency_of(cfg, "this trial")
                if o.latency_table else None)
    clinical = None
    if space.objective == "score_mae" and o.lung_bundle:  # TuneOptions refuses score_mae without one
        clinical = ClinicalObjective(o.lung_bundle, trainer.val_ds.df, limit=cfg.max_val_images,
                                     reference=o.reference)

    constrained = {c.metric for c in o.trial_constraints()}

    def on_epoch(metrics: dict, ckpt_dir: Path) -> None:
        # NaN reaches neither ASHA nor Optuna: 0.0, except a constrained metric, which is left out
        # (a metric not reported counts as violating its constraint)
        metrics = {k: (0.0 if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()
                   if not (k in constrained and isinstance(v, float) and math.isnan(v))}
        if cost is not None:
            metrics[COST_METRIC] = cost  # reported with a latency table too: a constraint may use it
        if measured is not None:
            metrics[TRIAL_COLUMN] = measured
        epoch = metrics["epoch"]
        if wants_overlays(o, epoch, epochs):
            metrics[OVERLAY_KEY] = validation_overlays(trainer)
        if clinical is not None:
            metrics.update(clinical(trainer.eval_model, trainer.pre, cfg.to_dict()).metrics())
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)))

    trainer.fit(on_epoch=on_epoch)


def run_grade_trial(config: dict, o: TuneOptions, space: SearchSpace) -> None:
    """A grading trial (seed 000): one recipe for one lung side, validated after every epoch of
    both transfer phases (``val_macro_mae``, weighted F1, the binary collapses). It reports no
    checkpoint: a ResNet-50 per epoch per trial would fill the storage, and the recipes worth
    keeping are retrained under cross-validation (``cxrtune grade cv --experiment``)."""
    from ray import tune


    sampled = space.train_config(settings_of(config))
    assert isinstance(sampled, GradeConfig)  # run_trial sends grade spaces here
    cfg = replace(sampled, epochs=o.train_epochs(space), seed=o.seed)
    df = manifest.load_manifest(o.manifest, check_files=False)

    def on_epoch(epoch: int, metrics: dict) -> None:
        tune.report({"epoch": epoch, **flat_metrics(metrics, "val_"), "val_n": metrics["n"]})

    find_lungs = stage_one_lungs(cfg.lung_bundle) if cfg.lung_bundle and cfg.roi != "none" else None
    train_grader(cfg, df, on_epoch=on_epoch, find_lungs=find_lungs)


# ------------------------------------------------------------------------------------- the sweep

class PatienceStopper(Stopper):
    """Per-trial early stopping as in seed 004: stop a trial when its metric has not improved by
    ``min_delta`` for ``patience`` epochs. Hand-written because Ray's TrialPlateauStopper measures
    a standard deviation over a window, not improvement over the best value."""
    def __init__(self, metric: str, mode: str, min_delta: float, patience: int):
        self.metric, self.sign = metric, 1.0 if mode == "max" else -1.0
        self.min_delta, self.patience = min_delta, patience
        self.best: dict[str, float] = {}
        self.stale: dict[str, int] = {}

    def __call__(self, trial_id: str, result: dict) -> bool:
        if self.metric not in result:
            return False

        value = self.sign * float(result[self.metric])
        self.stale[trial_id], self.best[trial_id] = patience_step(
            self.best.get(trial_id), value, self.stale.get(trial_id, 0), self.min_delta)
        return self.stale[trial_id] >= self.patience

    def stop_all(self) -> bool:
        return False


@dataclass(frozen=True)
class HopelessTrial:
    """True for a trial whose metric after its first epoch is still worse than ``threshold``
    (Dice 0: it has learnt nothing), so it stops there instead of running to ASHA's first rung.
    At small budgets those epochs are what random search wastes. Used through Ray's FunctionStopper."""
    metric: str
    mode: str
    threshold: float
    after: int = 1

    def __call__(self, trial_id: str, result: dict) -> bool:
        if self.metric not in result or result.get("training_iteration") != self.after:
            return False
        value = float(result[self.metric])
        return value < self.threshold if self.mode == "max" else value > self.threshold


def _scheduler(o: TuneOptions, space: SearchSpace):
    """ASHA or HyperBand on the accuracy objective. With one objective its metric and mode come
    from TuneConfig (Ray refuses them twice); with several, TuneConfig has none, and the
    scheduler is given the accuracy one: trials are cut on accuracy alone (a trial's cost does not
    change as it trains), and the searcher tells Optuna the stopped ones as pruned."""
    from ray.tune.schedulers import ASHAScheduler, HyperBandScheduler

    epochs = o.epochs(space)
    metric, mode = (space.metric, space.mode) if o.multi_objective else (None, None)
    if o.scheduler == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=epochs,
                             grace_period=min(o.grace, epochs), reduction_factor=o.reduction_factor,
                             metric=metric, mode=mode)
    if o.scheduler == "hyperband":
        log.warning("HyperBand brackets (trials, milestones in epochs): %s",
                    "; ".join(f"{b['trials']} x {b['milestones']}" for b in hyperband_brackets(epochs, o.reduction_factor)))
        return HyperBandScheduler(time_attr="training_iteration", max_t=epochs,
                                  reduction_factor=o.reduction_factor, metric=metric, mode=mode)
    return None


def optuna_storage(o: TuneOptions):
    """The study's Optuna storage: ``--optuna-storage URL`` (a database, e.g. postgresql://USER@HOST/DB
    or sqlite:///..., its password from the environment: :mod:`.study_storage`), else a journal
    file the driver keeps locally (``local_journal``) and copies beside the experiment as trials
    finish (``optuna.journal``, S3 included).
    ``optuna-dashboard`` opens either."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if o.optuna_storage:
        return DatabaseStorage(o.optuna_storage)  # the password comes from the environment, never the URL
    # a new sweep's own file (resume restores the study from the copy: CxrtuneOptunaSearch.restore)
    return optuna.storages.JournalStorage(JournalFileBackend(str(local_journal(o))))


def local_journal(o: TuneOptions) -> Path:
    """The local Optuna journal of a sweep (``$CXRTUNE_OPTUNA_DIR``, else the user's cache): the
    study is written here during the sweep and copied beside the experiment."""
    root = Path(os.environ.get("CXRTUNE_OPTUNA_DIR") or Path.home() / ".cache" / "cxrtune" / "optuna")
    root.mkdir(parents=True, exist_ok=True)
    return root / f"{o.name}-{int(o.created)}.journal"


def startup_trials(num_samples: int) -> int:
    """Random start-up trials of TPE, sized to the budget: Optuna's 10 would make a 16-trial sweep
    mostly random."""
    return max(2, min(10, num_samples // 4))


def optuna_sampler(o: TuneOptions):
    """The sweep's Optuna sampler: TPE (``--sampler tpe``), a Gaussian process (``gp``) or random
    search (``random``, the baseline), for one objective or, with ``--multi-objective``, for two.

    Several objectives use TPE or the GP, not NSGA-II: Ray pickles the searcher, sampler included,
    each time it saves the experiment, and Optuna 5.1's NSGAIISampler holds a lock that cannot be
    pickled; both also model from their first few trials, where NSGA-II needs several generations
    that a sweep of tens of trials does not have. With two objectives TPE's ``multivariate`` and
    ``group`` are set (Optuna 5 makes one objective's TPE multivariate already), so that
    conditional spaces (an encoder per architecture) are modelled jointly. The GP (log expected
    hypervolume improvement with two objectives, times the probability of meeting the constraints)
    models only the parameters every trial has; a conditional one (``encoder|FPN``) is drawn by a
    univariate TPE, which still learns from the trials that had it."""
    import optuna

    if o.sampler == "random":
        return optuna.samplers.RandomSampler(seed=o.seed)
    startup = o.startup_trials or startup_trials(o.num_samples)
    if o.sampler == "gp":
        per_parameter = optuna.samplers.TPESampler(seed=o.seed, n_startup_trials=startup, multivariate=False)
        return optuna.samplers.GPSampler(seed=o.seed, n_startup_trials=startup, independent_sampler=per_parameter,
                                         warn_independent_sampling=False)
    joint: dict[str, Any] = {"multivariate": True, "group": True} if o.multi_objective else {}
    with warnings.catch_warnings():  # `group` is marked experimental in Optuna 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=o.seed, n_startup_trials=startup, **joint)


def pruned_result(metric: str | list[str], ot_trial, result: dict) -> dict | None:
    """What Ray's ``OptunaSearch.on_trial_complete`` must get for a trial stopped early, so that
    it tells Optuna PRUNED (see :func:`_search_class`)."""
    if isinstance(metric, list):
        return None  # several objectives: pruned, without values
    # the stopping result never reached on_trial_result: report it, so that Optuna keeps it as the
    # pruned trial's value (a trial cut at its first rung has no other)
    value = result.get(metric)
    if ot_trial is not None and value is not None:
        try:
            ot_trial.report(float(value), int(result["training_iteration"]))
        except Exception as exc:  # noqa: BLE001 - e.g. that step was reported already
            log.debug("could not report the last value of trial %s: %s", ot_trial.number, exc)
    return {k: v for k, v in result.items() if k != metric}


def set_constraints(ot_trial, result: dict, constraints: tuple[Constraint, ...]) -> None:
    """Each constraint's violation (<= 0 feasible) from a trial's last result onto its Optuna
    trial; a metric the trial never reported counts as far past its limit (UNKNOWN_VIOLATION)."""
    for c in constraints:
        if c.metric in result:
            ot_trial.set_constraint(c.metric, c.violation(result[c.metric]))
        else:
            log.warning("constraint %s: the trial reported no %s; it counts as infeasible", c, c.metric)
            ot_trial.set_constraint(c.metric, UNKNOWN_VIOLATION)


def _search_class():
    from ray.tune.search.optuna import OptunaSearch

    class CxrtuneOptunaSearch(OptunaSearch):
        """Ray's OptunaSearch, plus:

        * a trial stopped before its last epoch (ASHA, HyperBand, the patience stopper) reaches
          Optuna as PRUNED (Ray would tell it COMPLETE, as if it had finished). With one objective
          it keeps its last reported value, which TPE ranks pruned trials by. With several, a
          trial cannot report intermediate values: it is pruned without values, so it is never in
          ``best_trials``, and TPE ranks it after every complete feasible trial (its good group is
          filled from those first, then from pruned trials, then from infeasible ones). A penalty
          value instead would put an invented point in objective space, which could dominate real
          trials;
        * the sweep's constraints (:class:`Constraint`) are set on the Optuna trial from its last
          result before it is told, so they are stored in the study (and its journal copy);
        * the journal is copied beside the experiment; a rerun of a trial the study already
          finished (driver killed in between) leaves the study as it is."""

        def __init__(self, *args, epochs: int, journal_to: tuple[str, str] | None = None,
                     constraints: tuple[Constraint, ...] = (), **kwargs):
            super().__init__(*args, **kwargs)
            self.epochs, self.journal_to, self.constraints = epochs, journal_to, tuple(constraints)

        def restore(self, checkpoint_path: str):
            """A resumed sweep on another machine (or after the local file was lost) gets the
            study back from the copy beside the experiment, before the study is first read."""
            super().restore(checkpoint_path)
            if self.journal_to and not Path(self.journal_to[0]).exists():
                local, remote = self.journal_to
                if storage.exists(remote):
                    Path(local).parent.mkdir(parents=True, exist_ok=True)
                    Path(local).write_bytes(storage.read_bytes(remote))

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            """A driver can die after the study recorded a trial as finished (the journal copy)
            but before Tune saved its own state: the resumed sweep reruns that trial from its
            checkpoint, and its results must leave the finished study trial as it is."""
            from optuna.exceptions import UpdateFinishedTrialError

            if trial_id not in self._ot_trials:  # see _unknown
                self._unknown(trial_id)
                return
            try:
                super().on_trial_result(trial_id, result)
            except UpdateFinishedTrialError:
                log.info("trial %s finished in the study before the driver stopped; its rerun is not told again",
                         trial_id)
                self._completed_trials.add(trial_id)  # Ray's own record: its completion is skipped too

        def _unknown(self, trial_id: str) -> None:
            """A trial Tune restored that this searcher never suggested: its state was saved a
            step before Tune's (a driver killed between the two uploads). Ray's OptunaSearch would
            raise KeyError and end the resumed sweep; the trial runs on, untold to the study."""
            if trial_id not in self._completed_trials:
                log.warning("trial %s is not in the restored searcher (saved before it was proposed): it runs, "
                            "but the Optuna study does not learn from it", trial_id)
                self._completed_trials.add(trial_id)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            from optuna.exceptions import UpdateFinishedTrialError

            if trial_id not in self._ot_trials:
                self._unknown(trial_id)
                return

            ot_trial = self._ot_trials.get(trial_id)
            if result and not error and ot_trial is not None and trial_id not in self._completed_trials:
                try:
                    set_constraints(ot_trial, result, self.constraints)
                except UpdateFinishedTrialError:  # a rerun of a trial the study finished (see on_trial_result)
                    pass
            if result and not error and result.get("training_iteration", self.epochs) < self.epochs:
                result = pruned_result(self.metric, ot_trial, result)
            super().on_trial_complete(trial_id, result, error)
            self._copy_journal()

        def suggest(self, trial_id: str):
            config = super().suggest(trial_id)
            self._copy_journal()  # the new trial is in the copy too: a resumed study knows it
            return config

        def _copy_journal(self) -> None:
            if self.journal_to:
                local, remote = self.journal_to
                try:
                    storage.write_bytes(remote, Path(local).read_bytes())
                except (OSError, CxrtuneError) as exc:  # the sweep goes on; the next event copies again
                    log.warning("could not copy the Optuna journal beside the experiment: %s", exc)

    return CxrtuneOptunaSearch


def hyperband_brackets(max_t: int, reduction_factor: float) -> list[dict]:
    """The brackets Ray's HyperBandScheduler builds, in the order it fills them: trials per
    bracket and the milestones (epochs) at which it keeps the best 1/reduction_factor.

    The one place that reads Ray's private formulas (``_s_max_1``, ``_get_r0``, ``_get_n0``), so the
    docs and logs say what Ray does; tests/test_tune.py pins the result, and a Ray that renames them
    fails here by name."""
    from ray.tune.schedulers import HyperBandScheduler

    hb = HyperBandScheduler(time_attr="training_iteration", max_t=max_t, reduction_factor=reduction_factor)
    try:
        brackets, r0_of, n0_of = hb._s_max_1, hb._get_r0, hb._get_n0
    except AttributeError as exc:
        raise CxrtuneError(f"Ray's HyperBandScheduler changed its internals ({exc}): update hyperband_brackets") from None
    out = []
    for s in range(brackets):
        r0 = r0_of(s)
        if r0 == 0:
            continue
        milestones, r = [], float(r0)
        while True:
            milestones.append(int(min(r, max_t)))
            if r >= max_t:
                break
            r *= reduction_factor
        out.append({"bracket": s, "trials": n0_of(s), "milestones": milestones})
    return out


def _searcher(o: TuneOptions, space: SearchSpace, warm: list[dict] | None = None):
    points = [space.optuna_params(p) for p in [*space.warm_start, *(warm or [])]]
    journal = None if o.optuna_storage else (str(local_journal(o)), storage.join(o.experiment_uri, JOURNAL_FILE))
    common = {"study_name": o.name, "storage": optuna_storage(o), "points_to_evaluate": points or None,
              "epochs": o.epochs(space), "journal_to": journal, "constraints": tuple(o.trial_constraints())}
    # a define-by-run searcher does not take metric/mode from TuneConfig: it needs its own
    metric, mode = (([space.metric, o.cost_metric], [space.mode, "min"]) if o.multi_objective
                    else (space.metric, space.mode))
    return _search_class()(space, metric=metric, mode=mode, sampler=optuna_sampler(o), **common)


def wants_overlays(o: TuneOptions, epoch: int, epochs: int) -> bool:
    """Whether a trial sends validation overlays (the manifest's own radiographs) to W&B after
    ``epoch``: only when asked (``--wandb-images``; real images leave the site with them), at the
    first, every fourth and the last epoch."""
    return bool(o.wandb_project and o.wandb_images) and (epoch == 1 or epoch % 4 == 0 or epoch == epochs)


def _wandb(o: TuneOptions) -> list:
    if not o.wandb_project:
        return []
    from ray.air.integrations.wandb import WandbLoggerCallback, _WandbLoggingActor

    class KeyFileLoggingActor(_WandbLoggingActor):
        """Ray's W&B logging actor, reading the API key from a private file on its node (it runs on
        the driver's) instead of its runtime_env, which Ray's runtime-env agent logs in full."""

        def __init__(self, *args, key_file: str = "", **kwargs):
            if key_file:
                os.environ["WANDB_API_KEY"] = Path(key_file).read_text(encoding="utf-8").strip()
            super().__init__(*args, **kwargs)

    class OverlayWandbCallback(WandbLoggerCallback):
        """Ray's W&B callback, plus the trials' overlay PNGs logged as images; the API key never
        enters a runtime_env (see :class:`KeyFileLoggingActor`)."""
        _logger_actor_cls = KeyFileLoggingActor
        _key_file = ""

        def _start_logging_actor(self, trial, exclude_results, **wandb_init_kwargs):
            key = os.environ.pop("WANDB_API_KEY", None)  # Ray copies it into the actor's runtime_env
            try:
                if key and not self._key_file:
                    folder = tempfile.mkdtemp(prefix="cxrtune-wandb-")  # 0700, on the logging actor's node
                    self._key_file = os.path.join(folder, "api_key")
                    with os.fdopen(os.open(self._key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                        f.write(key)
                extra = {"key_file": self._key_file} if key else {}
                super()._start_logging_actor(trial, exclude_results, **wandb_init_kwargs, **extra)
            finally:
                if key is not None:
                    os.environ["WANDB_API_KEY"] = key

        def on_experiment_end(self, trials, **info):
            super().on_experiment_end(trials, **info)
            if self._key_file:
                shutil.rmtree(os.path.dirname(self._key_file), ignore_errors=True)

        def log_trial_result(self, iteration, trial, result):
            if result.get(OVERLAY_KEY):
                result = dict(result)
                png = np.frombuffer(base64.b64decode(result.pop(OVERLAY_KEY)), np.uint8)
                image = cv2.imdecode(png, cv2.IMREAD_COLOR)
                if image is not None:
                    result["overlays"] = image[:, :, ::-1].copy()  # HxWx3 RGB: Ray logs it as wandb.Image
            super().log_trial_result(iteration, trial, result)

    kwargs: dict = {}
    if not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"  # no key: write runs locally, sync later with `wandb sync`
        kwargs["mode"] = "offline"
    # the key travels in the environment only; it is never put in a config, a log or storage
    return [OverlayWandbCallback(project=o.wandb_project, group=o.name, log_config=True, **kwargs)]


def local_disks(storage_uri: str) -> list[str]:
    """The folders on this machine that a sweep writes to: Ray's temp dir, the system's (where each
    epoch's checkpoint is staged) and the storage unless it is on S3. Only the driver's machine:
    the disks of a joined cluster's other nodes are theirs to watch."""
    return list(dict.fromkeys([ray_temp_dir(), tempfile.gettempdir(), *([] if storage.is_s3(storage_uri)
                                                                         else [storage_uri])]))


def _ray_init(o: TuneOptions, disks: list[str]) -> None:
    if problem := full_disk(disks):
        raise CxrtuneError(f"the sweep cannot start: {problem}")
    env = {}
    if o.wandb_project:
        env["WANDB_PROJECT"] = o.wandb_project
        if not os.environ.get("WANDB_API_KEY"):
            env["WANDB_MODE"] = "offline"
    init_ray(o.num_cpus, env=env)
    keep_secrets_out_of_trial_runtime_envs()
    check_fits("a trial", o.cpus_per_trial, o.gpus_per_trial,
               "Lower --cpus-per-trial / --gpus-per-trial (0 on a CPU machine), raise --num-cpus, "
               "or run on a cluster (RAY_ADDRESS).")


def _trainable(o: TuneOptions, space: SearchSpace):
    from ray import tune

    resources = {"cpu": o.cpus_per_trial, "gpu": o.gpus_per_trial}
    return tune.with_resources(tune.with_parameters(run_trial, opts=asdict(o), space=space), resources)


def _live_trials_callback(limiter):
    """A Tune callback that keeps ``limiter``'s (a :class:`~ray.tune.search.ConcurrencyLimiter`)
    live trials what Tune's are, at the start of every step.

    Tune uploads its experiment state and the searcher's state as separate files, in the
    background: a driver killed between the two leaves a searcher state from another moment,
    whose live trials name one that has since finished (or one Tune never recorded). Restored so,
    the limiter counts it live for ever, is always full, and the resumed sweep waits for ever
    without proposing a trial (the CI failure of 2026-12-07). So a trial the limiter holds live
    that Tune holds finished, or does not hold, is dropped. Written by hand: Ray reconciles
    nothing on restore. Both are in the tuner's one pickle, so a restored sweep's callback holds
    the restored limiter."""
    from ray.tune import Callback

    class LiveTrials(Callback):
        def __init__(self, limiter):
            self.limiter = limiter

        def on_step_begin(self, iteration: int, trials: list, **info) -> None:
            unfinished = {t.trial_id for t in trials if not t.is_finished()}
            stale = set(self.limiter.live_trials) - unfinished
            if stale:
                log.warning("the restored searcher held trial(s) %s live, which Tune holds finished or never "
                            "started: dropped, so that it proposes again", ", ".join(sorted(stale)))
                self.limiter.live_trials = set(self.limiter.live_trials) - stale
                self.limiter.num_unfinished_live_trials = len(self.limiter.live_trials)

    return LiveTrials(limiter)


def _run_config(o: TuneOptions, space: SearchSpace, callbacks: list | None = None):
    from ray import tune

    fs, path = storage.pyarrow_filesystem(o.storage)
    from ray.tune.stopper import CombinedStopper, FunctionStopper

    stoppers: list = []
    if o.patience and not o.multi_objective and not o.grid:  # a grid trains every combination to the end
        stoppers.append(PatienceStopper(space.metric, space.mode, o.min_delta, o.patience))
    if o.cut_below is not None:
        stoppers.append(FunctionStopper(HopelessTrial(space.metric, space.mode, o.cut_below)))
    checkpoint_config = tune.CheckpointConfig(
        num_to_keep=2, checkpoint_score_attribute=None if o.multi_objective else space.metric,
        checkpoint_score_order=space.mode)
    stop = CombinedStopper(*stoppers) if len(stoppers) > 1 else (stoppers[0] if stoppers else None)
    return tune.RunConfig(name=o.name, storage_path=path, storage_filesystem=fs,
                          failure_config=tune.FailureConfig(max_failures=o.max_failures),
                          checkpoint_config=checkpoint_config, stop=stop,
                          callbacks=[*_wandb(o), *(callbacks or [])], verbose=1)


def run_tune(o: TuneOptions) -> dict:
    """Start a sweep; returns the closing summary (also written to ``summary.json``)."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    space = o.search_space()
    df = manifest.load_manifest(o.manifest)  # validated once, here, with a clear error
    o = replace(o, split_hash=split_hash(df))  # what promote checks the manifest against
    check_tuning_subset(space.train_config({}), df, o.manifest)  # once, now: every trial would refuse it
    param_space = space.grid() if o.grid else None  # refuses a space without a grid before Ray starts
    latency_table = storage.read_bytes(o.latency_table) if o.latency_table else None
    if latency_table is not None:  # every network the space can draw is measured, or nothing starts
        parse_latency_table(latency_table, o.latency_table).check_covers(space)
    disks = local_disks(o.storage)
    storage.require_bucket(o.storage)  # a mistyped bucket, said before Ray starts or the study is made
    _ray_init(o, disks)  # before anything is written: a sweep that cannot start leaves no experiment behind
    scheduler = None if o.grid else _scheduler(o, space)
    if storage.exists(storage.join(o.experiment_uri, EXPERIMENT_FILE)):  # its study, trials and journal are its own
        raise CxrtuneError(f"{o.experiment_uri} exists: continue it with `cxrtune tune --resume {o.experiment_uri}` "
                           "or choose another --name")
    # the searcher checks the warm start and opens the Optuna storage: a sweep it refuses keeps its name
    searcher = None if o.grid else _searcher(o, space, o.warm_start)
    options = {"format": EXPERIMENT_FORMAT, **asdict(o)}
    storage.write_text(storage.join(o.experiment_uri, EXPERIMENT_FILE), json.dumps(options, indent=2))
    if latency_table is not None:  # kept with the experiment: the trials read it wherever its storage reaches
        storage.write_bytes(storage.join(o.experiment_uri, LATENCY_TABLE_FILE), latency_table)
    # Ray keeps one trial pending for a custom searcher unless told otherwise: an autoscaler would
    # then grow the cluster one trial at a time. Enough pending trials to fill the cluster at its
    # largest, and no more (more would make TPE propose blind, before results come back).
    concurrent = o.max_concurrent or max_parallel(o.cpus_per_trial, o.gpus_per_trial)
    # the limiter Tune would add for max_concurrent_trials, made here so that a callback keeps it true
    limiter = None if searcher is None else ConcurrencyLimiter(searcher, max_concurrent=concurrent)
    tune_config = tune.TuneConfig(
        metric=None if o.multi_objective else space.metric, mode=None if o.multi_objective else space.mode,
        search_alg=limiter, scheduler=scheduler,
        num_samples=1 if o.grid else o.num_samples, max_concurrent_trials=concurrent if limiter is None else None,
        time_budget_s=o.time_budget_s)
    tuner = tune.Tuner(_trainable(o, space), param_space=param_space, tune_config=tune_config,
                       run_config=_run_config(o, space, [] if limiter is None else [_live_trials_callback(limiter)]))
    if o.grid:
        log.warning("grid mode: %d combinations, each trained to the end (no ASHA/HyperBand, no sampler)",
                    int(np.prod([len(p.values) for p in space.params])))
    log.info("sweep %s over %d rows, up to %d trials at once", o.name, len(df), concurrent)
    return summarize(_fit(tuner, o.experiment_uri, disks), o, space, {"max_concurrent": concurrent})


def _fit(tuner, exp_uri: str, disks: list[str]):
    """``tuner.fit()``, refusing a sweep with no result to summarize, promote or report, and naming
    a full disk (of ``disks``) where there is one: on a disk that filled up, trials fail to write
    and Ray's results of them may fail to load, or load empty."""
    try:
        results = tuner.fit()
    except Exception as exc:
        if problem := full_disk(disks):
            raise CxrtuneError(f"the sweep stopped ({type(exc).__name__}: {exc}); a likely cause: {problem}") from exc
        raise
    if results.get_dataframe().empty:  # (an errored trial's metrics hold Ray's own keys, reported or not)
        n, failed = len(results), sum(1 for r in results if r.error)
        why = ("no trial ran" if not n else
               f"all {n} trials failed before reporting; their error files are in the trial folders" if failed == n
               else f"no trial reported a result ({failed} of {n} failed; the others ended first: the time budget, "
                    "or an interruption)")
        problem = full_disk(disks)
        raise CxrtuneError(f"{exp_uri}: {why}" + (f". {problem}" if problem else ""))
    return results


def cli_options(flags: dict, space: str | None, manifest: str | None, name: str, storage: str) -> TuneOptions:
    """The options of ``cxrtune tune``: ``flags`` (TUNE_FLAGS given on the command line) over the
    defaults; without ``manifest``, the embedded default (phantoms, a small space, few trials).

    Args:
        space: a search-space file (a shipped one's path already resolved), or None for the
            embedded space (only without ``manifest``)."""
    embedded = manifest is None
    if space:
        space_dict, source = load_space(space).to_dict(), space
    elif embedded:
        space_dict, source = EMBEDDED_SPACE, "embedded default"
    else:
        raise CxrtuneError("--space is required with --manifest (see search_spaces/)")
    return TuneOptions(**{**(EMBEDDED_OPTIONS if embedded else {}), **flags}, space=space_dict, space_source=source,
                       manifest=manifest or embedded_manifest(), name=name, storage=storage)


def load_warm_start(uris: list[str]) -> list[dict]:
    """Configurations to try first (``--warm-start``), from YAML/JSON files: each file one
    mapping ``NAME: value`` or a list of them."""
    points = []
    for uri in uris:
        data = load_yaml(uri, expect=None)
        data = data if isinstance(data, list) else [data]
        if not all(isinstance(d, dict) for d in data):
            raise CxrtuneError(f"{uri}: expected a mapping NAME: value, or a list of them")
        points += data
    return points


def check_split_unchanged(o: TuneOptions, why: str) -> str:
    """The manifest's split hash now, checked against the one the sweep started with (resume,
    promote). Returns it.

    Raises:
        CxrtuneError: the split or tuning subset changed; ``why`` says what that would spoil."""
    now = split_hash(manifest.load_manifest(o.manifest, check_files=False))
    if o.split_hash and now != o.split_hash:
        raise CxrtuneError(f"{o.manifest}: its split or tuning subset changed since the sweep started (split hash "
                           f"{o.split_hash[:12]} then, {now[:12]} now): {why}")
    return now


def load_options(exp_uri: str) -> TuneOptions:
    """The options a sweep was started with, from its ``cxrtune.json`` (what resume and report read)."""
    if not storage.exists(storage.join(exp_uri, EXPERIMENT_FILE)):
        raise CxrtuneError(f"{exp_uri}: no {EXPERIMENT_FILE}; is this a cxrtune experiment folder (STORAGE/NAME)?")
    data, uri = read_json_object(exp_uri, EXPERIMENT_FILE)
    if data.get("format", "cxrtune-experiment/1") == "cxrtune-experiment/1":
        data = _migrate_experiment_1(data, uri)
    check_format(data, uri, EXPERIMENT_FORMAT, "experiment")
    options = {k: v for k, v in data.items() if k != "format"}
    return TuneOptions(**known_settings(TuneOptions, options, f"{uri}: experiment"))


def _migrate_experiment_1(data: dict, uri: str) -> dict:
    """Format 1 -> 2: the cost objective became GMACs (``latency_batch`` went). A single-objective
    experiment reads as it was; a multi-objective one reported eager latency, which nothing
    compares with GMACs: it is refused by name."""
    if data.get("multi_objective"):
        raise CxrtuneError(f"{uri}: a multi-objective experiment of format 1 (latency in ms, not GMACs): "
                           "this cxrtune cannot resume or report it; run the sweep again")
    return {**{k: v for k, v in data.items() if k != "latency_batch"}, "format": EXPERIMENT_FORMAT}


def resume_tune(exp_uri: str) -> dict:
    """Continue an interrupted sweep: finished trials kept, errored ones restarted, the Optuna
    searcher restored with its study."""
    from ray import tune

    o = load_options(exp_uri)
    space = o.search_space()
    check_split_unchanged(o, "new trials would train and validate on other rows than the finished ones: put the "
                          "manifest back as it was, or start a new sweep on it")
    disks = local_disks(storage.parent(exp_uri))  # where it is now, wherever it started
    _ray_init(o, disks)
    fs, path = storage.pyarrow_filesystem(exp_uri)
    tuner = tune.Tuner.restore(path, _trainable(o, space), resume_unfinished=True, resume_errored=False,
                               restart_errored=True, storage_filesystem=fs)
    return summarize(_fit(tuner, exp_uri, disks), o, space)


def summarize(results, o: TuneOptions, space: SearchSpace, extra: dict | None = None) -> dict:
    """The closing summary of a sweep (also ``summary.json``): trials, errors, early stops, trial-
    and GPU-hours, and for one objective the best config and metric (a multi-objective sweep's
    trade-offs are in ``cxrtune report``'s Pareto front)."""
    if removed := remove_orphaned_staging():
        log.info("removed %d local epoch folders of killed trials", removed)
    df = results.get_dataframe()
    n_errors = sum(1 for r in results if r.error)
    iters = df["training_iteration"] if "training_iteration" in df else []
    stopped = int(sum(1 for i in iters if i < o.epochs(space)))
    hours = float(df["time_total_s"].sum()) / 3600 if "time_total_s" in df else 0.0
    trials = getattr(getattr(results, "_experiment_analysis", None), "trials", None) or []
    retried = sum(1 for t in trials if getattr(t, "num_failures", 0) > 0)  # failed, then retried (FailureConfig)
    summary = {"experiment": o.experiment_uri, "trials": len(df), "errored": n_errors, "retried": retried,
               "stopped_early": stopped, "gpu_hours": round(hours * o.gpus_per_trial, 4),
               "trial_hours": round(hours, 4), "metric": space.metric, "mode": space.mode, **(extra or {})}
    if not o.multi_objective and len(df):
        best = results.get_best_result(space.metric, space.mode, scope="all")
        summary["best_metric"] = float(best.metrics_dataframe[space.metric].agg(space.mode))
        summary["best_config"] = settings_of(best.config)
        summary["best_trial"] = best.path
    storage.write_text(storage.join(o.experiment_uri, "summary.json"), json.dumps(summary, indent=2, default=str))
    return summary
