"""Training image classifiers for the classification and audit track (seeds 000 and 001).

:func:`fit_classifier` trains a :class:`~cxrtune.model.classifiers.Classifier` on images held in memory
(the track's datasets are small at its sizes: 1,000 images at 128 px are 16 MB as uint8), with
seed 000's recipe: class balancing (random under-sampling, augmented over-sampling, or
double-stage: balanced training, then full-data fine-tuning) and two-phase transfer (the head
alone at ``head_lr``, then everything at ``lr``) when the encoder starts from weights.
Augmentation is seed 004's (albumentations). The loop is short and written here: the
segmentation Trainer's datasets, losses and metrics do not fit whole-image classes.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Callable, Self

import numpy as np
import torch

from ..config_files import known_settings, load_yaml
from ..data.dataset import seed_augmentation
from ..errors import CxrtuneError
from ..preprocessing import Preprocessing
from .classifiers import Classifier, ClassifierConfig, build_classifier

log = logging.getLogger(__name__)
BALANCING = ("none", "undersample", "oversample", "double")


@dataclass
class ClassifyConfig:
    """A classification recipe: what hide-and-seek audits and what the grading track tunes."""
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    size: int = 128
    batch_size: int = 16
    epochs: int = 4  # all layers (phase 2)
    lr: float = 1e-4
    head_epochs: int = 2  # phase 1, the head alone; only when the encoder starts from weights
    head_lr: float = 1e-3
    balancing: str = "undersample"
    augment: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.classifier, dict):
            self.classifier = ClassifierConfig(**self.classifier)
        if self.balancing not in BALANCING:
            raise CxrtuneError(f"balancing must be one of {', '.join(BALANCING)}, got {self.balancing!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def total_epochs(self) -> int:
        """Epochs over both transfer phases: what a per-epoch report counts up to."""
        return self.epochs + (self.head_epochs if self.classifier.weights else 0)

    @classmethod
    def from_dict(cls, d: dict) -> Self:
        """From a mapping (a YAML file); unknown keys are refused by name."""
        d = known_settings(cls, d, "classification")
        d["classifier"] = ClassifierConfig(**known_settings(ClassifierConfig, d.get("classifier"), "classifier"))
        return cls(**d)

    @classmethod
    def from_yaml(cls, uri: str) -> Self:
        return cls.from_dict(load_yaml(uri))


def balanced_indices(y: np.ndarray, how: str, rng: np.random.Generator) -> np.ndarray:
    """Row indices after balancing: ``undersample`` cuts every class to the rarest one's count,
    ``oversample`` repeats rows of the rarer classes up to the commonest one's count (augmentation
    makes the repeats differ), ``none`` keeps all."""
    classes, counts = np.unique(y, return_counts=True)
    if how == "none" or len(classes) < 2:
        return rng.permutation(len(y))
    target = counts.min() if how == "undersample" else counts.max()
    out = [rng.choice(np.flatnonzero(y == c), target, replace=how != "undersample" and n < target)
           for c, n in zip(classes, counts)]
    return rng.permutation(np.concatenate(out))


def _batches(x_u8: np.ndarray, y: np.ndarray, idx: np.ndarray, cfg: ClassifyConfig,
             pre: Preprocessing, augment):
    for i in range(0, len(idx), cfg.batch_size):
        rows = idx[i:i + cfg.batch_size]
        if len(rows) == 1 and len(idx) > 1:  # batch norm cannot train on one image: drop that remainder
            break
        imgs = [augment(image=x_u8[r])["image"] if augment else x_u8[r] for r in rows]
        yield torch.stack([pre.to_tensor(im) for im in imgs]), torch.as_tensor(y[rows], dtype=torch.long)


def _train(model: Classifier, x_u8, y, idx_fn, epochs: int, lr: float, cfg: ClassifyConfig, pre, augment,
           after_epoch: Callable[[], None]) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        for xb, yb in _batches(x_u8, y, idx_fn(), cfg, pre, augment):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).backward()
            opt.step()
        after_epoch()


def fit_classifier(cfg: ClassifyConfig, images: np.ndarray, labels: np.ndarray,
                   on_epoch: Callable[[int, Classifier], None] | None = None) -> Classifier:
    """Train on ``images`` (N x size x size, uint8) with integer ``labels`` (0..num_classes-1).
    ``on_epoch(epoch, model)`` runs after every epoch of either phase (1..``cfg.total_epochs``):
    a Tune trial reports there, and Tune's schedulers stop it there."""
    if images.dtype != np.uint8 or images.ndim != 3:
        raise CxrtuneError("fit_classifier takes N x H x W uint8 images")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = build_classifier(cfg.classifier)
    pre = Preprocessing(size=cfg.size, in_channels=cfg.classifier.in_channels)
    augment = seed_augmentation(cfg.size, cfg.seed) if cfg.augment else None
    balanced = "undersample" if cfg.balancing == "double" else cfg.balancing
    first = lambda: balanced_indices(labels, balanced, rng)  # noqa: E731
    done = 0

    def after_epoch() -> None:
        nonlocal done
        done += 1
        if on_epoch is not None:
            on_epoch(done, model)
            model.train()

    if cfg.classifier.weights and cfg.head_epochs:  # two-phase transfer: the head first
        model.freeze_encoder(True)
        _train(model, images, labels, first, cfg.head_epochs, cfg.head_lr, cfg, pre, augment, after_epoch)
        model.freeze_encoder(False)
    if cfg.balancing == "double":  # balanced, then all the data
        # with transfer the balanced stage is the head phase above; from scratch, the first half
        half = 0 if cfg.classifier.weights and cfg.head_epochs else cfg.epochs // 2
        _train(model, images, labels, first, half, cfg.lr, cfg, pre, augment, after_epoch)
        _train(model, images, labels, lambda: rng.permutation(len(labels)), cfg.epochs - half, cfg.lr, cfg, pre,
               augment, after_epoch)
    else:
        _train(model, images, labels, first, cfg.epochs, cfg.lr, cfg, pre, augment, after_epoch)
    return model.eval()


@torch.no_grad()
def predict(model: Classifier, images: np.ndarray, pre: Preprocessing, batch_size: int = 32) -> np.ndarray:
    """N x C class probabilities for uint8 images at the model's size."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.stack([pre.to_tensor(im) for im in images[i:i + batch_size]])
        out.append(torch.softmax(model(x), 1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
