"""Image classifiers for the classification and audit track (seeds 000, 001, 003): an SMP encoder
(ResNet-50, VGG-16, DenseNet-121 as in seed 000, or any SMP encoder) under SMP's classification
head (average pool, dropout, linear).

SMP's encoders are the ones the segmentation models use, so a classifier can start from an
encoder the project trained itself (``weights``: a cxrtune run, e.g. the Stage II encoder), from
"imagenet" where the machine can download, or from a local/S3 state dict. Two-phase transfer
(seed 000): :meth:`Classifier.freeze_encoder` trains the head alone, then everything at a lower LR.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from ..errors import CxrtuneError
from .models import HUB_WEIGHTS, load_encoder_weights

BACKBONES = ("resnet50", "vgg16", "densenet121")  # seed 000's three; any SMP encoder name also works


@dataclass
class ClassifierConfig:
    backbone: str = "resnet50"
    num_classes: int = 4  # grades 0-3; 3 for normal / COVID-19 / other pneumonia
    in_channels: int = 1
    weights: str | None = None  # None, "imagenet", or a local/S3 path (a state dict or a cxrtune run)
    dropout: float = 0.2

    def to_dict(self) -> dict:
        return asdict(self)


class Classifier(nn.Module):
    """Encoder -> its deepest feature map (``features``, Grad-CAM's target layer) -> head."""
    def __init__(self, cfg: ClassifierConfig):
        import segmentation_models_pytorch as smp
        from segmentation_models_pytorch.base import ClassificationHead

        super().__init__()
        hub = cfg.weights if cfg.weights in HUB_WEIGHTS else None
        try:
            self.encoder = smp.encoders.get_encoder(cfg.backbone, in_channels=cfg.in_channels, depth=5, weights=hub)
        except (KeyError, ValueError, TypeError) as exc:
            raise CxrtuneError(f"cannot build a classifier on {cfg.backbone!r}: {exc}") from None
        self.features = nn.Identity()
        self.head = ClassificationHead(self.encoder.out_channels[-1], cfg.num_classes, dropout=cfg.dropout)

    def forward(self, x):
        return self.head(self.features(self.encoder(x)[-1]))

    def freeze_encoder(self, frozen: bool = True) -> None:
        """Phase 1 of two-phase transfer: only the head learns while the encoder is frozen, its
        batch-norm statistics included (they stay in eval mode, as Keras freezes them)."""
        self.encoder_frozen = frozen
        for p in self.encoder.parameters():
            p.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and getattr(self, "encoder_frozen", False):
            self.encoder.eval()
        return self


def build_classifier(cfg: ClassifierConfig) -> Classifier:
    """A :class:`Classifier`; ``cfg.weights`` as a path loads an encoder (or a cxrtune run's)."""
    if cfg.in_channels not in (1, 3):
        raise CxrtuneError(f"in_channels must be 1 or 3, got {cfg.in_channels}")
    if cfg.num_classes < 2:
        raise CxrtuneError(f"a classifier needs at least 2 classes, got {cfg.num_classes}")
    model = Classifier(cfg)
    if cfg.weights not in HUB_WEIGHTS:

        load_encoder_weights(model, cfg.weights)
    return model
