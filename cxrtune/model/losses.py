"""Losses from ``smp.losses`` and torch, and seed 004's Dynamic Loss Weighting (Eq. 3).

Segmentation: dice, jaccard, bce, lovasz, focal, dice_focal (all on logits, binary mode).
Classification: bce (on the logit), l1 and smooth_l1 (on the sigmoid probability).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CxrtuneError


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
    """The segmentation loss ``name`` (a key of :data:`SEG_LOSSES`, SMP's losses), on logits."""
    if name not in SEG_LOSSES:
        raise CxrtuneError(f"unknown segmentation loss {name!r}; choose one of {', '.join(SEG_LOSSES)}")
    return SEG_LOSSES[name]()


def classification_loss(name: str) -> nn.Module:
    """The classification loss ``name`` (a key of :data:`CLS_LOSSES`), on logits."""
    if name not in CLS_LOSSES:
        raise CxrtuneError(f"unknown classification loss {name!r}; choose one of {', '.join(CLS_LOSSES)}")
    return CLS_LOSSES[name]()


class DynamicLossWeighting:
    """Seed 004 Eq. 3: ``loss = sum_t w_t * L_t`` with ``w_t = (L_t / L_t0) ** alpha``.

    * The ratios are weights only: detached, so no gradient flows through them. ``alpha = 0`` is
      the plain sum.
    * ``L_t0`` is the task's loss on the first batch in which it has a *non-empty* target (for the
      opacity task: an annotated mask with opacity in it). A loss on an all-empty target is tiny
      and would make every later ratio enormous; until ``L_t0`` exists the task's weight is 1.
    * Weights are clipped to ``[min_weight, max_weight]`` (default [0.1, 10]), so one odd batch can
      neither silence a task nor blow the loss up.
    * A task absent from a batch (``None``: no annotated mask) is skipped.

    Written by hand: no library has it.
    """

    MIN_WEIGHT, MAX_WEIGHT = 0.1, 10.0

    def __init__(self, alpha: float = 0.5, min_weight: float = MIN_WEIGHT, max_weight: float = MAX_WEIGHT):
        self.alpha = float(alpha)
        self.min_weight, self.max_weight = float(min_weight), float(max_weight)
        self.initial: dict[str, float] = {}
        self.last_weights: dict[str, float] = {}

    def state_dict(self) -> dict:
        return {"alpha": self.alpha, "initial": dict(self.initial)}

    def load_state_dict(self, state: dict) -> None:
        self.alpha = float(state["alpha"])
        self.initial = dict(state["initial"])

    def weight(self, name: str, value: float) -> float:
        l0 = self.initial.get(name)
        if not self.alpha or l0 is None or l0 <= 0:
            return 1.0
        return float(min(self.max_weight, max(self.min_weight, (value / l0) ** self.alpha)))

    def __call__(self, losses: dict[str, torch.Tensor | None],
                 nonempty: dict[str, bool] | None = None) -> torch.Tensor:
        """``nonempty[task]`` says whether the batch's target for that task has any positive
        (default True): only such a batch may set the task's ``L_t0``."""
        total = None
        for name, loss in losses.items():
            if loss is None:
                continue
            value = float(loss.detach())
            if name not in self.initial and (nonempty or {}).get(name, True) and value > 0:
                self.initial[name] = value
            weight = self.weight(name, value)
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
