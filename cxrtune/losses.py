"""Losses from ``smp.losses`` and torch, and seed 004's Dynamic Loss Weighting (Eq. 3).

Segmentation: dice, jaccard, bce, lovasz, focal, dice_focal (all on logits, binary mode).
Classification: bce (on the logit), l1 and smooth_l1 (on the sigmoid probability).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import CxrtuneError


class _Sum(nn.Module):
    def __init__(self, *losses: nn.Module):
        super().__init__()
        self.losses = nn.ModuleList(losses)

    def forward(self, logits, target):
        return sum(loss(logits, target) for loss in self.losses)


class _OnProbability(nn.Module):
    """Regression-style classification losses compare sigmoid(logit) with the 0/1 label."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, logits, target):
        return self.loss(torch.sigmoid(logits), target)


def _smp_losses():
    import segmentation_models_pytorch as smp

    return smp.losses


# name -> factory: the names a config or a search space may use (search_space.py checks against these)
SEG_LOSSES = {
    "dice": lambda: _smp_losses().DiceLoss("binary"),
    "jaccard": lambda: _smp_losses().JaccardLoss("binary"),
    "bce": lambda: _smp_losses().SoftBCEWithLogitsLoss(),
    "lovasz": lambda: _smp_losses().LovaszLoss("binary"),
    "focal": lambda: _smp_losses().FocalLoss("binary"),
    "dice_focal": lambda: _Sum(_smp_losses().DiceLoss("binary"), _smp_losses().FocalLoss("binary")),
}
CLS_LOSSES = {
    "bce": lambda: nn.BCEWithLogitsLoss(),
    "l1": lambda: _OnProbability(nn.L1Loss()),
    "smooth_l1": lambda: _OnProbability(nn.SmoothL1Loss()),
}


def segmentation_loss(name: str) -> nn.Module:
    if name not in SEG_LOSSES:
        raise CxrtuneError(f"unknown segmentation loss {name!r}; choose one of {', '.join(SEG_LOSSES)}")
    return SEG_LOSSES[name]()


def classification_loss(name: str) -> nn.Module:
    if name not in CLS_LOSSES:
        raise CxrtuneError(f"unknown classification loss {name!r}; choose one of {', '.join(CLS_LOSSES)}")
    return CLS_LOSSES[name]()


class DynamicLossWeighting:
    """Seed 004 Eq. 3: ``loss = sum_t (L_t / L_t0) ** alpha * L_t``, with ``L_t0`` the task's
    first loss. The ratios are weights only: they are detached, so no gradient flows through
    them. ``alpha = 0`` is the plain sum. A task absent from a batch (no annotated mask) is
    skipped; its ``L_t0`` is taken the first time it appears. Written by hand: no library has it.
    """

    def __init__(self, alpha: float = 0.5):
        self.alpha = float(alpha)
        self.initial: dict[str, float] = {}
        self.last_weights: dict[str, float] = {}

    def state_dict(self) -> dict:
        return {"alpha": self.alpha, "initial": dict(self.initial)}

    def load_state_dict(self, state: dict) -> None:
        self.alpha = float(state["alpha"])
        self.initial = dict(state["initial"])

    def __call__(self, losses: dict[str, torch.Tensor | None]) -> torch.Tensor:
        total = None
        for name, loss in losses.items():
            if loss is None:
                continue
            value = float(loss.detach())
            l0 = self.initial.setdefault(name, max(value, 1e-8))
            weight = (value / l0) ** self.alpha if self.alpha else 1.0
            self.last_weights[name] = weight
            term = loss * weight  # weight is a Python float: constant for autograd
            total = term if total is None else total + term
        if total is None:
            raise ValueError("no task produced a loss in this batch")
        return total


OPTIMIZERS = ("sgd", "rmsprop", "adam", "adamw", "adam_amsgrad", "adamw_amsgrad")


def build_optimizer(name: str, params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Seed 004's optimizers: SGD, RMSprop, Adam, AdamW, Adam(amsgrad), AdamW(amsgrad)."""
    table = {
        "sgd": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay),
        "rmsprop": lambda: torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay),
        "adam": lambda: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay),
        "adamw": lambda: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay),
        "adam_amsgrad": lambda: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, amsgrad=True),
        "adamw_amsgrad": lambda: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, amsgrad=True),
    }
    if name not in table:
        raise CxrtuneError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return table[name]()
