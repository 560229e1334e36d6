"""Grad-CAM heatmaps and seed 000's Heatmap Concordance Score (HCS).

The heatmap of an image is Grad-CAM (the ``grad-cam`` package) on the encoder's stage at stride 16
(:func:`target_layer`; the deepest map is too coarse at CPU sizes), computed for every class and
averaged with the predicted probabilities as weights; the
heatmaps of a left-lung and a right-lung model are averaged (:func:`average_heatmaps`).

HCS is the share of the heatmap inside the lung mask: ``hcs`` weighs each pixel by its heat;
``hcs_pixels`` is the paper's definition, the share of the non-zero heatmap pixels that lie in the
lungs. A model that looks at the lungs scores near 1; one that reads a marker outside them, low.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import nn

NONZERO = 1e-3  # Grad-CAM maps are scaled to [0, 1]; below this a pixel counts as zero heat


class CamModel(nn.Module):
    """A classifier seen by Grad-CAM: encoder -> deepest feature map (``features``, the target
    layer) -> classification head -> logits. Wraps a :class:`~cxrtune.model.classifiers.Classifier` or
    an SMP multi-task model (Stage II: its ``classification_head``, one logit)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.encoder = model.encoder
        self.head = model.head if hasattr(model, "head") else model.classification_head
        self.features = nn.Identity()

    def forward(self, x):
        return self.head(self.features(self.encoder(x)[-1]))


class _Logit:
    """Grad-CAM target: class ``index``'s logit, or minus the logit of a one-unit head (its
    'normal' class)."""

    def __init__(self, index: int, negate: bool = False):
        self.index, self.negate = index, negate

    def __call__(self, output):
        value = output[..., self.index]
        return -value if self.negate else value


def class_probabilities(logits: torch.Tensor) -> np.ndarray:
    """N x C probabilities; a one-unit head is a binary classifier (normal, disease)."""
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits[:, 0])
        return torch.stack([1 - p, p], 1).detach().cpu().numpy()
    return torch.softmax(logits, 1).detach().cpu().numpy()


def target_layer(cam_model: CamModel, stride: int, probe: torch.Tensor | None = None) -> nn.Module:
    """Grad-CAM's layer: the encoder's stage at ``stride``. SMP names it for some encoders
    (``get_stages``: ResNet's layer3 at 16); for the others (VGG, DenseNet) a probe forward pass
    finds the last block whose output is at that stride (DenseNet's denseblock3), else the last
    convolution there (VGG's last conv before its final pooling). Without either, the deepest
    feature map. At stride 32 a 128-px input gives a 4 x 4 map, too coarse to tell the lungs from
    what lies beside them; 16 gives 8 x 8."""
    encoder: nn.Module = cam_model.encoder  # type: ignore[assignment]  # nn.Module.__getattr__ is typed Tensor | Module
    try:
        stages = encoder.get_stages()  # type: ignore[operator]  # SMP encoders have it, timm ones do not
    except (AttributeError, NotImplementedError):
        stages = None
    modules = stages.get(stride) if isinstance(stages, dict) else None
    if modules:
        return modules[-1]
    if probe is None:
        return cam_model.features
    seen: list[tuple[nn.Module, int]] = []
    hooks = [m.register_forward_hook(lambda mod, _i, out: seen.append((mod, out.shape[-1]))
                                     if torch.is_tensor(out) and out.dim() == 4 else None)
             for _, m in encoder.named_modules() if m is not encoder]
    try:
        with torch.no_grad():
            encoder(probe[:1])
    finally:
        for h in hooks:
            h.remove()
    width = probe.shape[-1] // stride
    at_stride = [m for m, w in seen if w == width]
    blocks = [m for m in at_stride if len(list(m.children()))]
    convs = [m for m in at_stride if isinstance(m, nn.Conv2d)]
    return (blocks or convs or [cam_model.features])[-1]


def heatmaps(model: nn.Module, x: torch.Tensor, stride: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Probability-weighted Grad-CAM heatmaps (N x H x W, in [0, 1]) and the N x C probabilities
    of a classifier on the normalised batch ``x``, on the encoder's stage at ``stride``."""
    from pytorch_grad_cam import GradCAM

    cam_model = CamModel(model).eval()
    with torch.no_grad():
        logits = cam_model(x)
    probs = class_probabilities(logits)
    binary = logits.shape[1] == 1
    heat = np.zeros((x.shape[0], x.shape[2], x.shape[3]), np.float32)
    with GradCAM(model=cam_model, target_layers=[target_layer(cam_model, stride, x)]) as cam:
        for c in range(probs.shape[1]):
            target = _Logit(0, negate=c == 0) if binary else _Logit(c)
            maps = cam(input_tensor=x, targets=[target] * x.shape[0])
            heat += probs[:, c, None, None] * maps
    peak = heat.reshape(len(heat), -1).max(1)
    heat /= np.maximum(peak, 1e-7)[:, None, None]
    return heat, probs


def average_heatmaps(*maps: np.ndarray) -> np.ndarray:
    """Seed 000: the left-lung and right-lung models' heatmaps of an image, averaged."""
    return np.mean(np.stack(maps), 0)


def concordance(heat: np.ndarray, lung: np.ndarray) -> dict:
    """HCS of one heatmap against a lung mask of the same shape (see the module's docstring), and
    ``hcs_chance``: the lungs' share of the frame, the HCS of a heatmap that looks everywhere alike
    (a rule ``hcs>=X`` says something only for X above it)."""
    lung = lung.astype(bool)
    total = float(heat.sum())
    nonzero = heat > NONZERO
    return {"hcs": float((heat * lung).sum() / total) if total > 0 else 0.0,
            "hcs_pixels": float((nonzero & lung).sum() / nonzero.sum()) if nonzero.any() else 0.0,
            "hcs_chance": float(lung.mean()) if lung.size else 0.0}


def heatmap_png(image: np.ndarray, heat: np.ndarray, lung: np.ndarray | None = None, hcs: float | None = None) -> bytes:
    """The heatmap over the (uint8) image as a PNG, the lung outline in white, HCS written on it."""
    grey = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    color = cv2.applyColorMap(np.clip(heat * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    out = cv2.addWeighted(grey, 0.6, color, 0.4, 0)
    if lung is not None:
        contours, _ = cv2.findContours(lung.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (255, 255, 255), 1)
    if hcs is not None:
        cv2.putText(out, f"HCS {hcs:.2f}", (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1, cv2.LINE_AA)
    ok, png = cv2.imencode(".png", out)
    return png.tobytes()
