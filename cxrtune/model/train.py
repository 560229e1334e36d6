"""One trainer for ``cxrtune train`` and for every Ray Tune trial.

``task="lung"`` trains Stage I (binary lung segmentation, monitored by validation Dice);
``task="disease"`` trains Stage II (opacity segmentation + normal/disease classification on the
lung ROI, combined with Dynamic Loss Weighting, monitored by (Dice + F1) / 2). Rows whose opacity
mask is not annotated are left out of the segmentation loss and still train the classifier.

Each epoch: train, validate, report (the ``on_epoch`` hook: Tune plugs in here), checkpoint
(weights + full config + preprocessing + metrics, to a local or S3 URI), early stopping on the
monitored metric (min delta, patience). ``resume`` continues from the newest checkpoint.
channels_last memory format on every device (on a 2-core CPU, U-Net/ResNet-18 at 128 px: forward +
backward 16 % faster, a whole Stage II epoch 7 %); bf16 autocast on a GPU, and with ``cpu_amp`` on
a CPU that computes bf16 natively (AVX-512 BF16 or AMX: forward + backward 1.3x faster on a 2-core
AVX-512 BF16 machine; elsewhere bf16 is emulated and slower, so it is off by default).

``ema_decay`` > 0 keeps an exponential moving average of the weights and batch-norm statistics
(torch's ``AveragedModel``, updated after every optimiser step, with timm's warm-up so that early
epochs are not judged on the first steps' weights): validation, checkpoints' ``model.pt`` and so
bundles use the average, which smooths the epoch-to-epoch swings of a short run.
"""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pickle
import random
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import config_files, storage
from ..config_files import known_settings, load_yaml
from ..data import manifest
from ..data.dataset import CXRDataset, seed_worker
from ..errors import CxrtuneError
from ..preprocessing import Preprocessing
from .artifacts import CheckpointMeta, RunSummary, versions, write_checkpoint_meta, write_run_summary
from .losses import (
    DynamicLossWeighting,
    build_optimizer,
    classification_loss,
    segmentation_loss,
)
from .metrics import SegmentationMeter, classification_metrics
from .models import ModelConfig, build_model, choose_device

log = logging.getLogger(__name__)
TASKS = ("lung", "disease")


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved with every checkpoint."""

    task: str = "lung"
    model: ModelConfig = field(default_factory=ModelConfig)
    size: int = 256
    batch_size: int = 4
    epochs: int = 16
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_schedule: str = "none"  # "none" or "cosine"
    seg_loss: str = "dice"
    cls_loss: str = "bce"
    dlw_alpha: float = 0.5
    cls_threshold: float = 0.5
    patience: int = 6
    min_delta: float = 0.01
    seed: int = 0
    num_workers: int = 0
    augment: bool = True
    tuning_subset: bool = False  # use only rows marked ``tuning`` (seed 004's tuning subsets)
    max_train_images: int | None = None
    max_val_images: int | None = None
    amp: bool = True  # bf16 autocast on a GPU
    cpu_amp: bool = False  # bf16 autocast on the CPU too: pays where it computes bf16 natively (native_cpu_bf16)
    max_minutes: float | None = None  # wall-clock budget of one fit (a resumed one starts afresh):
    # no epoch starts that would end past it
    ema_decay: float = 0.0  # > 0: validate and save an exponential moving average of the weights
    # what picks best/ and drives patience: "" is val_dice (lung) or val_dice_f1 (disease); any
    # validation metric may be named, losses and FP rates are minimised, the rest maximised
    monitor: str = ""

    def __post_init__(self) -> None:
        if not self.monitor:
            self.monitor = "val_dice" if self.task == "lung" else "val_dice_f1"
        if not self.monitor.startswith("val_"):  # best/ and patience follow validation, never training
            raise CxrtuneError(f"monitor must name a validation metric (val_...), got {self.monitor!r}")
        if self.size % 32:  # the encoders halve the input five times; some decoders fail on the rest
            raise CxrtuneError(f"size must be a multiple of 32, got {self.size}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise CxrtuneError(f"ema_decay must be in [0, 1) (0 turns the average off), got {self.ema_decay}")
        if self.max_minutes is not None and not self.max_minutes > 0:  # 0 would read as "no budget"
            raise CxrtuneError(f"max_minutes must be > 0 (leave it out for no budget), got {self.max_minutes}")

    @property
    def monitor_mode(self) -> str:
        return "min" if self.monitor.endswith("loss") or "fp_rate" in self.monitor else "max"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = known_settings(cls, d, "training")
        model = d.pop("model", {}) or {}
        if isinstance(model, dict):
            model = ModelConfig(**known_settings(ModelConfig, model, "model"))
        cfg = cls(model=model, **d)
        if cfg.task not in TASKS:
            raise CxrtuneError(f"task must be one of {', '.join(TASKS)}, got {cfg.task!r}")
        cfg.model.classification = cfg.task == "disease"
        return cfg

    def with_overrides(self, pairs: Sequence[str]) -> "TrainConfig":
        """A new config with command-line ``key=value`` pairs applied
        (:func:`cxrtune.config_files.with_overrides`), checked as a file's settings are."""
        return TrainConfig.from_dict(config_files.with_overrides(self.to_dict(), pairs)) if pairs else self

    @classmethod
    def from_yaml(cls, uri: str) -> "TrainConfig":
        return cls.from_dict(load_yaml(uri))


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators (the data loader's workers get theirs from torch)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_tuning_subset(cfg, df: pd.DataFrame, source: str = "") -> None:
    """A config that trains on the tuning subset (``tuning_subset``) needs a manifest that marks
    one, not all rows instead: 2-10x the compute the space was sized for.

    Raises:
        CxrtuneError: the manifest (``source``, when named) has no ``tuning`` column."""
    if getattr(cfg, "tuning_subset", False) and "tuning" not in df.columns:  # a GradeConfig has none
        raise CxrtuneError(f"{source + ': ' if source else ''}tuning_subset is set but the manifest marks no tuning "
                           "subset (no 'tuning' column): mark one with `cxrtune data split --tuning-fraction F`, "
                           "or set tuning_subset: false")


def select_rows(df: pd.DataFrame, cfg: TrainConfig, split: str) -> pd.DataFrame:
    """The rows a task trains or validates on in ``split``: never ``eval_only`` rows; the tuning
    subset when ``cfg.tuning_subset``; rows with a lung mask (Stage I's target, and Stage II's
    ROI: without one Stage II would learn from whole radiographs, which it never sees in use),
    for Stage II with a diagnosis."""
    rows = manifest.without_eval_only(df[df["split"] == split])
    check_tuning_subset(cfg, rows)
    if cfg.tuning_subset:
        rows = rows[rows["tuning"]]
    rows = rows[rows["lung_mask"] != ""]  # Stage I's target; Stage II's ROI, as the scorer crops it in use
    if cfg.task != "lung":  # the classifier never trains or validates on rows without a diagnosis
        rows = rows[rows["label"].astype(str) != ""]
    limit = cfg.max_train_images if split == "train" else cfg.max_val_images
    if limit:
        rows = rows.sample(n=min(limit, len(rows)), random_state=cfg.seed) if len(rows) > limit else rows
    if rows.empty:
        raise CxrtuneError(f"no {split} rows for task {cfg.task!r} in the manifest "
                           "(run `cxrtune data split`, and check the rows' lung masks)")
    return rows


def ema_with_warmup(decay: float) -> Callable:
    """torch's EMA update (``get_ema_multi_avg_fn``) with timm's warm-up: at the n-th update the decay
    is ``min(decay, (1 + n) / (10 + n))``, so the average follows the weights closely at first."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        n = float(n_averaged)
        torch.optim.swa_utils.get_ema_multi_avg_fn(min(decay, (1 + n) / (10 + n)))(averaged, current, n_averaged)

    return update


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), where ``cpu_amp`` pays."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)


class Trainer:
    """Builds the model, data and optimiser for a :class:`TrainConfig` and runs epochs."""

    def __init__(self, cfg: TrainConfig, df: pd.DataFrame, cache: storage.ContentCache | None = None):
        seed_everything(cfg.seed)
        self.cfg = cfg
        self.device = choose_device()
        self.pre = Preprocessing(size=cfg.size, in_channels=cfg.model.in_channels)
        roi = cfg.task == "disease"
        self.train_ds = CXRDataset(select_rows(df, cfg, "train"), self.pre, augment=cfg.augment, cache=cache,
                                   roi=roi, seed=cfg.seed)
        self.val_ds = CXRDataset(select_rows(df, cfg, "val"), self.pre, augment=False, cache=cache, roi=roi)
        self.data = {"manifest": df.attrs.get("source_uri", ""),  # for the model card
                     **{f"{name}_images": {"total": len(ds.df), **ds.df["label"].value_counts().to_dict()}
                        for name, ds in (("train", self.train_ds), ("val", self.val_ds))},
                     "sources": sorted(set(ds_df for ds_df in self.train_ds.df.get("source", []) if ds_df))}
        gen = torch.Generator().manual_seed(cfg.seed)
        # a last batch of one image fails in training mode where a decoder has BatchNorm after a
        # global pool (DeepLabV3, DeepLabV3+, PAN): that one image waits for the next epoch's order
        lone_last = len(self.train_ds) > cfg.batch_size and len(self.train_ds) % cfg.batch_size == 1
        self.train_loader = DataLoader(self.train_ds, batch_size=cfg.batch_size, shuffle=True, drop_last=lone_last,
                                       num_workers=cfg.num_workers, generator=gen, worker_init_fn=seed_worker,
                                       pin_memory=self.device.type == "cuda",
                                       persistent_workers=cfg.num_workers > 0)
        self.val_loader = DataLoader(self.val_ds, batch_size=max(cfg.batch_size, 8), shuffle=False,
                                     num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0)
        self.model = build_model(cfg.model).to(self.device).to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(cfg.optimizer, self.model.parameters(), cfg.lr, cfg.weight_decay)
        self.ema = (torch.optim.swa_utils.AveragedModel(self.model, multi_avg_fn=ema_with_warmup(cfg.ema_decay),
                                                         use_buffers=True)
                    if cfg.ema_decay else None)
        self.scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(cfg.epochs, 1))
                          if cfg.lr_schedule == "cosine" else None)
        self.seg_loss = segmentation_loss(cfg.seg_loss)
        self.cls_loss = classification_loss(cfg.cls_loss) if cfg.task == "disease" else None
        self.dlw = DynamicLossWeighting(cfg.dlw_alpha)
        if cfg.cpu_amp and self.device.type == "cpu" and not native_cpu_bf16():
            log.warning("cpu_amp: this CPU has no native bf16 (AVX-512 BF16 or AMX); bf16 is emulated "
                        "here and training will be slower than without cpu_amp")
        self.epoch = 0
        self.history: list[dict] = []
        self.best: dict | None = None
        self.stale = 0
        self.progress_value: float | None = None

    @property
    def eval_model(self) -> torch.nn.Module:
        """The network that is validated, checkpointed and bundled: the weight average when
        ``ema_decay`` is set, else the trained model itself."""
        return self.ema.module if self.ema is not None else self.model

    # ------------------------------------------------------------------------------------ steps
    def _autocast(self):
        enabled = self.cfg.amp if self.device.type == "cuda" else self.cfg.cpu_amp
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _inputs(self, batch: dict) -> torch.Tensor:
        x = batch["image"].to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last)

    def _losses(self, out, batch: dict) -> dict[str, torch.Tensor | None]:
        if self.cfg.task == "lung":
            return {"seg": self.seg_loss(out.float(), batch["lung_mask"].to(self.device))}
        seg_logits, cls_logits = out
        annotated = batch["opacity_annotated"].to(self.device)
        seg: torch.Tensor | None = None
        if annotated.any():
            seg = self.seg_loss(seg_logits[annotated].float(), batch["opacity_mask"].to(self.device)[annotated])
        assert self.cls_loss is not None  # a disease task has one
        cls = self.cls_loss(cls_logits.float().squeeze(1), batch["label"].to(self.device))
        return {"seg": seg, "cls": cls}

    def train_epoch(self, progress: bool = False) -> dict:
        self.model.train()
        total, n = 0.0, 0
        bar = tqdm(self.train_loader, desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}", unit="batch",
                   disable=not progress, leave=False, dynamic_ncols=True)
        for batch in bar:
            with self._autocast():
                out = self.model(self._inputs(batch))
            losses = self._losses(out, batch)
            if self.cfg.task == "disease":
                annotated = batch["opacity_annotated"]
                nonempty = bool((batch["opacity_mask"][annotated] > 0).any()) if annotated.any() else False
                loss = self.dlw(losses, {"seg": nonempty, "cls": True})
            else:
                seg_loss = losses["seg"]
                assert seg_loss is not None  # every lung batch has its masks
                loss = seg_loss
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            total += float(loss.detach()) * len(batch["index"])
            n += len(batch["index"])
            bar.set_postfix(loss=f"{total / n:.4f}", refresh=False)
        if self.scheduler:
            self.scheduler.step()
        return {"train_loss": total / max(n, 1)}

    @torch.no_grad()
    def validate(self) -> dict:
        model = self.eval_model
        model.eval()
        seg = SegmentationMeter()
        probs, labels, losses = [], [], []
        for batch in self.val_loader:
            with self._autocast():
                out = model(self._inputs(batch))
            batch_losses = self._losses(out, batch)
            losses.append(sum(float(v) for v in batch_losses.values() if v is not None))
            if self.cfg.task == "lung":
                seg.update((torch.sigmoid(out.float()) >= 0.5).cpu().numpy()[:, 0],
                           batch["lung_mask"].numpy()[:, 0] > 0.5)
                continue
            seg_logits, cls_logits = out
            p_cls = torch.sigmoid(cls_logits.float()).squeeze(1).cpu()
            refined = torch.sigmoid(seg_logits.float()).cpu() * (p_cls >= self.cfg.cls_threshold).float()[:, None, None, None]
            keep = batch["opacity_annotated"].numpy()
            seg.update((refined.numpy()[:, 0] >= 0.5)[keep], (batch["opacity_mask"].numpy()[:, 0] > 0.5)[keep])
            probs.append(p_cls.numpy())
            labels.append(batch["label"].numpy())
        metrics = {"val_loss": float(np.mean(losses))}
        metrics.update({f"val_{k}": v for k, v in seg.result().items()})
        if self.cfg.task == "disease":
            cls = classification_metrics(np.concatenate(probs), np.concatenate(labels), self.cfg.cls_threshold)
            metrics.update({f"val_{k}": v for k, v in cls.items()})
            dice = metrics["val_dice"] if not np.isnan(metrics["val_dice"]) else 0.0
            metrics["val_dice_f1"] = (dice + metrics["val_f1"]) / 2
        return metrics

    # ------------------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "dlw": self.dlw.state_dict(), "epoch": self.epoch, "history": self.history,
                "best": self.best, "stale": self.stale,
                "progress_value": self.progress_value, "torch_rng": torch.get_rng_state(),
                "numpy_rng": numpy_rng_state()}

    def meta(self, metrics: dict) -> CheckpointMeta:
        return CheckpointMeta(config=self.cfg.to_dict(), preprocessing=self.pre.to_dict(), epoch=self.epoch,
                              metrics=metrics, monitor=self.cfg.monitor, roi=self.cfg.task == "disease",
                              versions=versions(), data=self.data)

    def write_checkpoint(self, directory: str | Path, metrics: dict) -> Path:
        """Weights (``model.pt``), resumable state (``state.pt``) and ``meta.json`` in a folder."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        torch.save(self.eval_model.state_dict(), d / "model.pt")
        torch.save(plain_values(self.state()), d / "state.pt")
        write_checkpoint_meta(str(d), self.meta(metrics))
        return d

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if (self.ema is None) != (state.get("ema") is None):  # best/ would mix averaged and raw epochs
            raise CxrtuneError("this checkpoint has no weight average: resume it without ema_decay"
                               if self.ema is not None else
                               "this checkpoint carries a weight average: resume it with its ema_decay")
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        self.dlw.load_state_dict(state["dlw"])
        self.epoch, self.history = state["epoch"], state["history"]
        self.best, self.stale = state["best"], state["stale"]
        self.progress_value = state.get("progress_value", (state["best"] or {}).get("value"))
        torch.set_rng_state(state["torch_rng"])
        set_numpy_rng_state(state["numpy_rng"])

    # ------------------------------------------------------------------------------------- fit
    def fit(self, on_epoch: Callable[[dict, Path], bool | None] | None = None,
            checkpoint_root: str | Path | None = None, progress: bool = False) -> dict:
        """Run epochs until ``cfg.epochs`` or early stopping. ``on_epoch(metrics, ckpt_dir)`` is
        called after each epoch with a local checkpoint folder; returning True stops training.
        ``progress`` shows a bar per epoch and prints one line of metrics after each."""
        started = time.perf_counter()
        with staging_dir() as staging:
            while self.epoch < self.cfg.epochs:
                t0 = time.perf_counter()
                metrics = self.train_epoch(progress)
                metrics.update(self.validate())
                self.epoch += 1
                metrics.update(epoch=self.epoch, epoch_seconds=time.perf_counter() - t0,
                               lr=self.optimizer.param_groups[0]["lr"])
                if self.cfg.monitor not in metrics:
                    raise CxrtuneError(f"monitor {self.cfg.monitor!r} is not a validation metric of a "
                                       f"{self.cfg.task} run; choose one of "
                                       f"{', '.join(sorted(k for k in metrics if k.startswith('val_')))}")
                value = metrics[self.cfg.monitor]
                sign = 1.0 if self.cfg.monitor_mode == "max" else -1.0
                signed = _signed(value, sign)
                # best/ is the best epoch, full stop; min_delta only decides what counts as
                # progress for patience (one rule, shared with the Tune stopper)
                if self.best is None or signed > _signed(self.best["value"], sign):
                    self.best = {"value": value, "epoch": self.epoch}
                self.stale, self.progress_value = patience_step(self.progress_value, signed, self.stale,
                                                                self.cfg.min_delta)
                metrics["best_" + self.cfg.monitor] = self.best["value"]
                self.history.append(metrics)
                line = epoch_line(metrics, self.cfg.monitor)
                log.info("%s", line)
                if progress:
                    print(line, flush=True)
                ckpt = self.write_checkpoint(staging / f"epoch_{self.epoch:04d}", metrics)
                if checkpoint_root is not None:
                    upload_checkpoint(ckpt, str(checkpoint_root), self.epoch)
                stop = on_epoch(metrics, ckpt) if on_epoch else False  # Tune persists it in report()
                shutil.rmtree(ckpt, ignore_errors=True)
                if stop or (self.cfg.patience and self.stale >= self.cfg.patience):
                    break
                elapsed = time.perf_counter() - started
                if self.cfg.max_minutes and elapsed + metrics["epoch_seconds"] > 60 * self.cfg.max_minutes:
                    log.info("time budget of %.1f min: no room for epoch %d", self.cfg.max_minutes, self.epoch + 1)
                    break
        return {"epochs": self.epoch, "best": self.best, "history": self.history}


STAGING_PREFIX = "cxrtune-ckpt-"
STAGING_LOCK = ".owner.lock"


@contextmanager
def staging_dir() -> Iterator[Path]:
    """A private folder for a fit's epoch checkpoints, locked (flock) while the fit runs. A process
    killed hard (a trial Ray kills after its grace period, an out-of-memory kill, a timed-out job)
    never runs the clean-up, and its last epoch (up to a few hundred MB) would stay in /tmp for
    good: the kernel drops a dead process's lock, so unlocked folders are removed first."""
    remove_orphaned_staging()
    # made and locked under a name the reaper does not look at, then renamed: no one can find
    # the folder between its lock file's creation and the lock
    unlocked = Path(tempfile.mkdtemp(prefix="." + STAGING_PREFIX))
    path, lock, made = unlocked.with_name(unlocked.name[1:]), None, unlocked
    try:
        lock = os.open(unlocked / STAGING_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.rename(unlocked, path)
        made = path
        yield path
    finally:
        shutil.rmtree(made, ignore_errors=True)  # only the folder this fit made
        if lock is not None:
            os.close(lock)


def remove_orphaned_staging() -> int:
    """Remove the staging folders no live process holds; returns how many (written by hand:
    nothing in Ray or the standard library does this). A sweep's driver also calls it at the end."""
    removed = 0
    for lock_path in Path(tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*/{STAGING_LOCK}"):
        try:
            fd = os.open(lock_path, os.O_RDWR)
        except OSError:
            continue  # removed meanwhile, or not ours
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a live fit holds it
        try:
            shutil.rmtree(lock_path.parent, ignore_errors=True)  # still holding the lock
            removed += 1
        finally:
            os.close(fd)
    return removed


def _signed(value: float | None, sign: float) -> float:
    """A monitored value turned "higher is better"; a missing or NaN value is the worst."""
    return -np.inf if value is None or np.isnan(value) else sign * float(value)


def patience_step(reference: float | None, value: float, stale: int, min_delta: float) -> tuple[int, float]:
    """The patience rule: an epoch is progress when it beats the last progress value by more than
    ``min_delta`` (mode max). Returns ``(stale epochs, new reference value)``."""
    if reference is None or value > reference + min_delta:
        return 0, value
    return stale + 1, reference


def epoch_line(metrics: dict, monitor: str) -> str:
    """One line per epoch for people: the monitored value first, then losses and the rest."""
    keys = [monitor, "train_loss", "val_loss", "val_dice", "val_f1", "val_fp_rate_empty"]
    parts = [f"{k}={metrics[k]:.4f}" for k in dict.fromkeys(keys) if isinstance(metrics.get(k), float)
             and not np.isnan(metrics[k])]
    return f"epoch {metrics['epoch']}: " + " ".join(parts) + f" ({metrics['epoch_seconds']:.0f} s)"


def upload_checkpoint(local: Path, run_uri: str, epoch: int) -> None:
    """Copy one epoch's checkpoint into ``run_uri/checkpoints/epoch_NNNN``, ``meta.json`` last: it
    is the completion marker (:func:`latest_checkpoint`), so an upload cut off half-way is never
    resumed from. Every epoch keeps its weights and meta; only the newest keeps ``state.pt``
    (optimizer and RNG state, ~3x the weights), deleted from the previous epoch only once this
    one is complete."""
    target = storage.join(run_uri, "checkpoints", f"epoch_{epoch:04d}")
    files = sorted((f for f in Path(local).iterdir() if f.is_file()), key=lambda f: (f.name == COMPLETION_MARKER, f.name))
    for f in files:
        storage.write_bytes(storage.join(target, f.name), f.read_bytes())
    if epoch > 1:
        storage.delete(storage.join(run_uri, "checkpoints", f"epoch_{epoch - 1:04d}", "state.pt"))


COMPLETION_MARKER = "meta.json"  # written last by upload_checkpoint


def refuse_an_existing_run(run_uri: str) -> None:
    """A new run never writes into another's folder: its epochs would mix with the other's, and a
    later ``--resume`` would pick up the other's newest checkpoint.

    Raises:
        CxrtuneError: ``run_uri`` holds a run (``run.json``, ``best/`` or ``checkpoints/``)."""
    for name in ("run.json", "best", "checkpoints"):
        uri = storage.join(run_uri, name)
        if storage.exists(uri) or next(iter(storage.list_keys(uri + "/")), None) is not None:
            raise CxrtuneError(f"{run_uri} holds a run already: choose another folder (a `cxrtune train` run "
                               "there continues with --resume)")


def latest_checkpoint(run_uri: str) -> str | None:
    """The newest complete ``checkpoints/epoch_NNNN`` folder under a run (its completion marker
    and ``state.pt`` both there), or None."""
    root = storage.join(run_uri, "checkpoints")
    files: dict[str, set[str]] = {}
    for key in storage.list_keys(root):
        folder, name = key.rstrip("/").split("/")[-2:]
        files.setdefault(folder, set()).add(name)
    complete = sorted(f for f, names in files.items() if {COMPLETION_MARKER, "state.pt"} <= names)
    return storage.join(root, complete[-1]) if complete else None


def plain_values(value):
    """``value`` with numpy scalars and arrays turned into Python numbers and lists, so that the
    training state holds only what ``torch.load(weights_only=True)`` accepts (tensors and plain
    containers); NaN stays NaN."""
    if isinstance(value, dict):
        return {k: plain_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain_values(v) for v in value)
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return value


def numpy_rng_state() -> dict:
    """numpy's global generator state as a tensor and plain numbers (it is a tuple holding an array)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {"kind": kind, "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def set_numpy_rng_state(state) -> None:
    if not isinstance(state, dict):  # a state.pt written before it was made plain: numpy's own tuple
        np.random.set_state(state)
        return
    np.random.set_state((state["kind"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                         state["cached_gaussian"]))


def load_training_state(uri: str) -> dict:
    """``state.pt`` (resumable training state) from local disk or S3, loaded with
    ``weights_only=True``: tensors and plain values only, so a file planted in the bucket cannot
    run code on resume.

    Raises:
        CxrtuneError: the file holds anything else (a pickled object), or is not a torch file."""
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise CxrtuneError(f"{uri}: refused: not a training state of tensors and plain values, as cxrtune "
                           f"writes ({type(exc).__name__}); resume from another run or start afresh") from None
    if not isinstance(state, dict):
        raise CxrtuneError(f"{uri}: refused: not a training state (a {type(state).__name__})")
    return state


def train(cfg: TrainConfig, df: pd.DataFrame, out_uri: str, resume: bool = False,
          on_epoch: Callable[[dict, Path], bool | None] | None = None, progress: bool = False) -> dict:
    """Train and write a run folder: ``checkpoints/epoch_NNNN/`` per epoch, ``best/`` (the best
    epoch's weights + meta, what ``cxrtune bundle make`` takes) and ``run.json`` (:class:`RunSummary`).

    Args:
        df: the manifest; its ``split`` column says what trains and what validates.
        out_uri: the run folder (local or s3://).
        resume: continue from the run's latest epoch checkpoint, if any.
        on_epoch: called after every epoch with its metrics and checkpoint folder; True stops.
        progress: tqdm bars.

    Returns:
        ``run.json``'s content: ``config``, ``best`` (``epoch``, ``value``), ``epochs``, ``history``."""
    if not resume:
        refuse_an_existing_run(out_uri)
    trainer = Trainer(cfg, df)
    if resume:
        last = latest_checkpoint(out_uri)
        if last:
            trainer.load_state(load_training_state(storage.join(last, "state.pt")))
            log.info("resumed from %s at epoch %d", last, trainer.epoch)
    result = trainer.fit(on_epoch=on_epoch, checkpoint_root=out_uri, progress=progress)
    best_epoch = result["best"]["epoch"] if result["best"] else trainer.epoch
    best_dir = storage.join(out_uri, "checkpoints", f"epoch_{best_epoch:04d}")
    for name in ("model.pt", "meta.json"):
        storage.write_bytes(storage.join(out_uri, "best", name), storage.read_bytes(storage.join(best_dir, name)))
    summary = RunSummary(config=cfg.to_dict(), best=result["best"], epochs=result["epochs"],
                         history=result["history"], versions=versions())
    write_run_summary(out_uri, summary)
    return summary.to_dict()
