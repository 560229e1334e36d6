"""``cxrtune tune``: Ray Tune + Optuna (TPE, or NSGA-II for two objectives) + ASHA/HyperBand.

Every trial runs the same :class:`~cxrtune.train.Trainer` as ``cxrtune train`` and reports each
epoch with ``tune.report(metrics, checkpoint=...)``. Results and checkpoints go to a local folder or
S3 (through a pyarrow filesystem with the same endpoint as everything else). The experiment folder
also holds ``cxrtune.json`` (the options, the search space and the manifest URI), so
``--resume EXP_URI`` and ``cxrtune report`` need nothing else. Tune saves the searcher (the Optuna
study with every finished trial) beside the experiment, so a resumed sweep continues the study
rather than starting a new one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from ray.tune import Stopper

from . import manifest, storage
from .cluster import check_fits, init_ray
from .errors import CxrtuneError
from .search_space import SearchSpace, parse_space

log = logging.getLogger(__name__)
EXPERIMENT_FILE = "cxrtune.json"
SCHEDULERS = ("asha", "hyperband", "none")

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


@dataclass
class TuneOptions:
    space: dict
    manifest: str
    name: str
    storage: str
    num_samples: int = 16
    scheduler: str = "asha"
    max_epochs: int = 16
    grace: int = 4
    reduction_factor: float = 2
    patience: int = 6  # per-trial early stopping (0 = off)
    min_delta: float = 0.01
    cpus_per_trial: float = 1
    gpus_per_trial: float = 0
    max_concurrent: int | None = None
    time_budget_s: float | None = None
    objective: str | None = None
    multi_objective: bool = False
    lung_bundle: str | None = None
    wandb_project: str | None = None
    seed: int = 0
    sampler: str = "tpe"  # "tpe" (Bayesian) or "random" (the baseline)
    max_failures: int = 2
    num_cpus: int | None = None  # for a local Ray instance
    space_source: str = ""
    created: float = field(default_factory=time.time)

    @property
    def experiment_uri(self) -> str:
        return storage.join(self.storage, self.name)

    def search_space(self) -> SearchSpace:
        data = dict(self.space)
        if self.objective:
            data["objective"] = self.objective
        return parse_space(data, self.space_source or "<space>")


# ------------------------------------------------------------------------------------ the trial

def measure_latency_ms(model, size: int, in_channels: int, device, repeats: int = 5) -> float:
    """Median forward time of one image at batch size 1: the multi-objective's cost axis."""
    import torch

    model.eval()
    x = torch.rand(1, in_channels, size, size, device=device)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append(1000 * (time.perf_counter() - t))
    model.train()
    return float(np.median(times))


class ClinicalObjective:
    """Validation severity-score MAE of a Stage II trial through a fixed Stage I bundle, scored by
    the scoring policy (:meth:`cxrtune.scorer.Scorer.score_images`).

    Stage I is fixed, so the validation images (through ``load_scan``), their cleaned lung masks
    and their reference zones are computed once; each epoch only Stage II runs. The zone threshold
    is the bundle's (not fit on the validation images). A record that is not ``scored`` counts
    with the worst error its reference allows: a trial gains nothing by failing to score."""

    def __init__(self, bundle_uri: str, rows, limit: int | None = 64):
        from .preprocessing import load_scan
        from .scorer import load_bundle, reference_zones

        self.bundle = load_bundle(bundle_uri)
        cache = storage.ContentCache()
        self.images, self.refs = [], []
        for _, row in rows.iterrows():
            ref = reference_zones(row, cache=cache)
            if ref is None:
                continue
            try:
                self.images.append(load_scan(cache.read_bytes(row["image"])).image)
            except CxrtuneError as exc:  # an unreadable or refused image must not end the sweep
                log.warning("score_mae: a validation image is skipped: %s", exc)
                continue
            self.refs.append(sum(ref))
            if limit and len(self.images) >= limit:
                break
        if not self.images:
            raise CxrtuneError("score_mae needs validation rows with reference zone scores or masks")
        self.lungs = self.bundle.lung_masks(self.images)

    def __call__(self, model, pre, config: dict) -> float:
        from .scorer import StageModel

        model.eval()
        self.bundle.disease = StageModel(model, pre, config)
        errors = []
        for (record, _), ref in zip(self.bundle.score_images(self.images, lungs=self.lungs), self.refs):
            errors.append(abs(record["score"] - ref) if record["status"] == "scored" else max(ref, 6 - ref))
        model.train()
        return float(np.mean(errors))


OVERLAY_KEY = "overlays_png_b64"


def validation_overlays(trainer, n: int = 3) -> str:
    """A few validation images with the reference (green) and predicted (red) masks, as one
    base64 PNG string: small enough for Tune's result files, decoded for W&B by the callback."""
    import base64

    import cv2
    import torch

    tiles = []
    trainer.model.eval()
    with torch.inference_mode():
        for i in range(min(n, len(trainer.val_ds))):
            item = trainer.val_ds[i]
            out = trainer.model(item["image"][None].to(trainer.device))
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
    trainer.model.train()
    ok, buf = cv2.imencode(".png", np.hstack(tiles)) if tiles else (False, None)
    return base64.b64encode(buf.tobytes()).decode("ascii") if ok else ""


def _sampled(config: dict) -> dict:
    """Tune's config holds Optuna's names; conditional ones look like ``encoder|Unet``."""
    return {k.split("|", 1)[0]: v for k, v in config.items()}


def run_trial(config: dict, opts: dict) -> None:
    """The Tune function trainable: one config, trained epoch by epoch, reported to Tune."""
    import torch
    from ray import tune

    from .train import Trainer

    o = TuneOptions(**opts)
    space = o.search_space()
    cfg = space.train_config(_sampled(config))
    cfg.epochs, cfg.patience, cfg.seed = o.max_epochs, o.max_epochs + 1, o.seed  # Tune stops trials
    df = manifest.load_manifest(o.manifest, check_files=False)
    trainer = Trainer(cfg, df)
    ckpt = tune.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            trainer.load_state(torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False))
    latency = measure_latency_ms(trainer.model, cfg.size, cfg.model.in_channels, trainer.device)
    clinical = None
    if space.objective == "score_mae":
        if not o.lung_bundle:
            raise CxrtuneError("--objective score_mae needs --lung-bundle (a fixed Stage I bundle)")
        clinical = ClinicalObjective(o.lung_bundle, trainer.val_ds.df, limit=cfg.max_val_images or 64)

    def on_epoch(metrics: dict, ckpt_dir: Path) -> None:
        metrics = {k: (0.0 if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
        metrics["latency_ms"] = latency
        epoch = metrics["epoch"]
        if o.wandb_project and (epoch == 1 or epoch % 4 == 0 or epoch == o.max_epochs):
            metrics[OVERLAY_KEY] = validation_overlays(trainer)
        if clinical is not None:
            metrics["val_score_mae"] = clinical(trainer.model, trainer.pre, cfg.to_dict())
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)))

    trainer.fit(on_epoch=on_epoch)


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
        from .train import patience_step  # the one patience rule, shared with `cxrtune train`

        value = self.sign * float(result[self.metric])
        self.stale[trial_id], self.best[trial_id] = patience_step(
            self.best.get(trial_id), value, self.stale.get(trial_id, 0), self.min_delta)
        return self.stale[trial_id] >= self.patience

    def stop_all(self) -> bool:
        return False


def _scheduler(o: TuneOptions):
    """Metric and mode come from TuneConfig (Ray refuses them twice)."""
    from ray.tune.schedulers import ASHAScheduler, HyperBandScheduler

    if o.scheduler not in SCHEDULERS:
        raise CxrtuneError(f"--scheduler must be one of {', '.join(SCHEDULERS)}")
    if o.multi_objective and o.scheduler != "none":
        raise CxrtuneError("multi-objective mode needs --scheduler none: Ray's OptunaSearch drops "
                           "intermediate results for several objectives, so ASHA/HyperBand cannot compare trials")
    if o.scheduler == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=o.max_epochs,
                             grace_period=min(o.grace, o.max_epochs), reduction_factor=o.reduction_factor)
    if o.scheduler == "hyperband":
        return HyperBandScheduler(time_attr="training_iteration", max_t=o.max_epochs,
                                  reduction_factor=o.reduction_factor)
    return None


def _searcher(o: TuneOptions, space: SearchSpace):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    if o.multi_objective:
        sampler = optuna.samplers.NSGAIISampler(seed=o.seed)
        return OptunaSearch(space, metric=[space.metric, "latency_ms"], mode=[space.mode, "min"],
                            sampler=sampler, study_name=o.name)
    if o.sampler not in ("tpe", "random"):
        raise CxrtuneError(f"--sampler must be tpe or random, got {o.sampler!r}")
    sampler = (optuna.samplers.TPESampler(seed=o.seed) if o.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=o.seed))
    # a define-by-run searcher does not take metric/mode from TuneConfig: it needs its own
    return OptunaSearch(space, metric=space.metric, mode=space.mode, sampler=sampler, study_name=o.name)


def _wandb(o: TuneOptions) -> list:
    if not o.wandb_project:
        return []
    from ray.air.integrations.wandb import WandbLoggerCallback

    class OverlayWandbCallback(WandbLoggerCallback):
        """Ray's W&B callback, plus the trials' overlay PNGs logged as images."""

        def log_trial_result(self, iteration, trial, result):
            if result.get(OVERLAY_KEY):
                import base64

                import cv2

                result = dict(result)
                png = np.frombuffer(base64.b64decode(result.pop(OVERLAY_KEY)), np.uint8)
                image = cv2.imdecode(png, cv2.IMREAD_COLOR)
                if image is not None:
                    result["overlays"] = image[:, :, ::-1].copy()  # HxWx3 RGB: Ray logs it as wandb.Image
            super().log_trial_result(iteration, trial, result)

    kwargs = {}
    if not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"  # no key: write runs locally, sync later with `wandb sync`
        kwargs["mode"] = "offline"
    # the key travels in the environment only; it is never put in a config, a log or storage
    return [OverlayWandbCallback(project=o.wandb_project, group=o.name, log_config=True, **kwargs)]


def _ray_init(o: TuneOptions) -> None:
    init_ray(o.num_cpus)
    check_fits("a trial", o.cpus_per_trial, o.gpus_per_trial,
               "Lower --cpus-per-trial / --gpus-per-trial (0 on a CPU machine), raise --num-cpus, "
               "or run on a cluster (RAY_ADDRESS).")


def _trainable(o: TuneOptions):
    from ray import tune

    resources = {"cpu": o.cpus_per_trial, "gpu": o.gpus_per_trial}
    return tune.with_resources(tune.with_parameters(run_trial, opts=asdict(o)), resources)


def _run_config(o: TuneOptions, space: SearchSpace):
    from ray import tune

    fs, path = storage.pyarrow_filesystem(o.storage)
    stoppers = []
    if o.patience and not o.multi_objective:
        stoppers.append(PatienceStopper(space.metric, space.mode, o.min_delta, o.patience))
    checkpoint_config = tune.CheckpointConfig(
        num_to_keep=2, checkpoint_score_attribute=None if o.multi_objective else space.metric,
        checkpoint_score_order=space.mode)
    return tune.RunConfig(name=o.name, storage_path=path, storage_filesystem=fs,
                          failure_config=tune.FailureConfig(max_failures=o.max_failures),
                          checkpoint_config=checkpoint_config, stop=stoppers[0] if stoppers else None,
                          callbacks=_wandb(o), verbose=1)


def run_tune(o: TuneOptions) -> dict:
    """Start a sweep; returns the closing summary (also written to ``summary.json``)."""
    from ray import tune

    space = o.search_space()
    df = manifest.load_manifest(o.manifest)  # validated once, here, with a clear error
    if o.multi_objective and space.objective == "score_mae":
        raise CxrtuneError("multi-objective mode supports the dice and dice_cls objectives")
    _ray_init(o)  # before anything is written: a sweep that cannot start leaves no experiment behind
    storage.ensure_bucket(o.storage)
    storage.write_text(storage.join(o.experiment_uri, EXPERIMENT_FILE), json.dumps(asdict(o), indent=2))
    tune_config = tune.TuneConfig(
        metric=None if o.multi_objective else space.metric, mode=None if o.multi_objective else space.mode,
        search_alg=_searcher(o, space), scheduler=_scheduler(o),
        num_samples=o.num_samples, max_concurrent_trials=o.max_concurrent, time_budget_s=o.time_budget_s)
    tuner = tune.Tuner(_trainable(o), tune_config=tune_config, run_config=_run_config(o, space))
    log.info("sweep %s over %d rows", o.name, len(df))
    return summarize(tuner.fit(), o, space)


def load_options(exp_uri: str) -> TuneOptions:
    try:
        data = json.loads(storage.read_text(storage.join(exp_uri, EXPERIMENT_FILE)))
    except CxrtuneError:
        raise CxrtuneError(f"{exp_uri}: no {EXPERIMENT_FILE}; is this a cxrtune experiment folder "
                           "(STORAGE/NAME)?") from None
    return TuneOptions(**data)


def resume_tune(exp_uri: str) -> dict:
    """Continue an interrupted sweep: finished trials kept, errored ones restarted, the Optuna
    searcher restored with its study."""
    from ray import tune

    o = load_options(exp_uri)
    space = o.search_space()
    _ray_init(o)
    fs, path = storage.pyarrow_filesystem(exp_uri)
    tuner = tune.Tuner.restore(path, _trainable(o), resume_unfinished=True, resume_errored=False,
                               restart_errored=True, storage_filesystem=fs)
    return summarize(tuner.fit(), o, space)


def summarize(results, o: TuneOptions, space: SearchSpace) -> dict:
    df = results.get_dataframe()
    n_errors = sum(1 for r in results if r.error)
    iters = df["training_iteration"] if "training_iteration" in df else []
    stopped = int(sum(1 for i in iters if i < o.max_epochs))
    hours = float(df["time_total_s"].sum()) / 3600 if "time_total_s" in df else 0.0
    summary = {"experiment": o.experiment_uri, "trials": len(df), "errored": n_errors,
               "stopped_early": stopped, "gpu_hours": round(hours * o.gpus_per_trial, 4),
               "trial_hours": round(hours, 4), "metric": space.metric, "mode": space.mode}
    if not o.multi_objective and len(df):
        best = results.get_best_result(space.metric, space.mode, scope="all")
        summary["best_metric"] = float(best.metrics_dataframe[space.metric].agg(space.mode))
        summary["best_config"] = _sampled(best.config)
        summary["best_trial"] = best.path
    storage.write_text(storage.join(o.experiment_uri, "summary.json"), json.dumps(summary, indent=2, default=str))
    return summary
