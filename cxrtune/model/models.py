"""One model factory over segmentation-models-pytorch's architectures (a registry, as in SMP).

Stage I is a binary segmenter; Stage II adds SMP's ``aux_params`` classification head (adaptive avg
pool, flatten, dropout 0.2, one unit; it outputs a logit, the sigmoid is applied at inference).
Encoders are any SMP name, ``tu-`` timm encoders included. ``encoder_weights`` is None, "imagenet"
(downloads, for machines that can) or a local/S3 path to weights: an encoder state dict, or a
cxrtune run, checkpoint or ``model.pt`` (its encoder is used: transfer from a model the project
trained itself, e.g. Stage II starting from the Stage I encoder where nothing can be downloaded).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .. import storage
from ..errors import CxrtuneError

ARCHITECTURES = {
    "Unet": "unet", "UnetPlusPlus": "unetplusplus", "DeepLabV3": "deeplabv3",
    "DeepLabV3Plus": "deeplabv3plus", "FPN": "fpn", "Linknet": "linknet", "PSPNet": "pspnet",
    "PAN": "pan", "MAnet": "manet",
}


# Named decoder widths (a search space's ``decoder: {type: choice, values: [slim, narrow, standard]}``):
# ``standard`` is SMP's default decoder, ``narrow`` halves its channel widths, ``slim`` quarters
# them; a U-Net-style decoder's last stages keep at least 16 channels (``narrow`` U-Net is the CPU
# accuracy bench's hand-picked decoder, 128-64-32-16-16). Linknet's decoder follows its encoder's
# widths, so it has ``standard`` only.
def _unet_widths(k: int) -> tuple[int, ...]:
    return tuple(max(c // k, 16) for c in (256, 128, 64, 32, 16))


DECODER_PRESETS: dict[str, dict[str, dict]] = {
    "standard": {arch: {} for arch in ARCHITECTURES},
    **{name: {
        "Unet": {"decoder_channels": _unet_widths(k)},
        "UnetPlusPlus": {"decoder_channels": _unet_widths(k)},
        "MAnet": {"decoder_channels": _unet_widths(k), "decoder_pab_channels": 64 // k},
        "DeepLabV3": {"decoder_channels": 256 // k},
        "DeepLabV3Plus": {"decoder_channels": 256 // k},
        "FPN": {"decoder_pyramid_channels": 256 // k, "decoder_segmentation_channels": 128 // k},
        "PSPNet": {"psp_out_channels": 512 // k},
        "PAN": {"decoder_channels": 32 // k},
    } for name, k in (("narrow", 2), ("slim", 4))},
}


def decoder_options(arch: str, decoder: dict | str) -> dict:
    """SMP's decoder keyword arguments for ``decoder``: the options themselves, or a preset's name
    (:data:`DECODER_PRESETS`) resolved for ``arch``."""
    if isinstance(decoder, dict):
        return decoder
    if decoder not in DECODER_PRESETS:
        raise CxrtuneError(f"unknown decoder preset {decoder!r}; choose one of {', '.join(DECODER_PRESETS)}")
    if arch not in DECODER_PRESETS[decoder]:
        raise CxrtuneError(f"{arch} has no {decoder!r} decoder preset (its decoder has no width of its own): "
                           "use standard")
    return DECODER_PRESETS[decoder][arch]


# encoder weights a model builder takes from the hub (or none); any other value is a run or state dict to load
HUB_WEIGHTS = (None, "imagenet")


@dataclass
class ModelConfig:
    arch: str = "Unet"
    encoder: str = "resnet18"
    in_channels: int = 1
    encoder_weights: str | None = None
    classification: bool = False  # Stage II: add the normal/disease head
    dropout: float = 0.2
    decoder: dict | str = field(default_factory=dict)  # the architecture's decoder options, or a preset's name

    def to_dict(self) -> dict:
        return asdict(self)


def _weights_file(uri: str) -> str:
    """A weights file itself, or the best (else own) ``model.pt`` of a cxrtune run or checkpoint."""
    if uri.endswith((".pt", ".pth", ".bin", ".ckpt")):
        return uri
    for candidate in (storage.join(uri, "best", "model.pt"), storage.join(uri, "model.pt")):
        if storage.exists(candidate):
            return candidate
    return uri


def load_encoder_weights(model: nn.Module, uri: str) -> None:
    """Weights at ``uri`` (an encoder state dict, or a whole model's: its ``encoder.`` tensors)
    into ``model.encoder``, for segmenters and classifiers alike; shapes must match."""
    path = _weights_file(uri)
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    except CxrtuneError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CxrtuneError(f"{uri}: not a torch state dict ({type(exc).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CxrtuneError(f"{uri}: not a torch state dict")
    if any(k.startswith("encoder.") for k in state):  # a whole model: keep its encoder
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    encoder: nn.Module = model.encoder  # type: ignore[assignment]  # nn.Module.__getattr__ is typed Tensor | Module
    own = encoder.state_dict()
    clash = sorted(k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape))
    if clash:
        raise CxrtuneError(f"{uri}: {len(clash)} tensor(s) have other shapes than this encoder's "
                           f"(e.g. {clash[0]}): another encoder or in_channels")
    if not set(state) & set(own):
        raise CxrtuneError(f"{uri}: no tensor matches the encoder's parameter names")
    missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
    if missing:  # e.g. a ResNet-18's tensors in a ResNet-34: the rest would stay random, unsaid
        raise CxrtuneError(f"{uri}: {len(missing)} of this encoder's {len(own)} tensors are not in it "
                           f"(e.g. {missing[0]}): another encoder")
    encoder.load_state_dict(state, strict=False)  # SMP encoders drop their unused head keys


def build_model(cfg: ModelConfig) -> nn.Module:
    """An SMP model for ``cfg``; raises a plain error naming a bad architecture or encoder."""
    import segmentation_models_pytorch as smp

    if cfg.arch not in ARCHITECTURES:
        raise CxrtuneError(f"unknown architecture {cfg.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if cfg.in_channels not in (1, 3):
        raise CxrtuneError(f"in_channels must be 1 or 3, got {cfg.in_channels}")
    weights = cfg.encoder_weights
    hub_weights = weights if weights in HUB_WEIGHTS else None
    aux = {"classes": 1, "dropout": cfg.dropout} if cfg.classification else None
    decoder = decoder_options(cfg.arch, cfg.decoder)
    try:
        model = smp.create_model(ARCHITECTURES[cfg.arch], encoder_name=cfg.encoder,
                                 encoder_weights=hub_weights, in_channels=cfg.in_channels, classes=1,
                                 aux_params=aux, **decoder)
    except (KeyError, ValueError, TypeError) as exc:
        raise CxrtuneError(f"cannot build {cfg.arch} with encoder {cfg.encoder!r}: {exc}") from None
    if weights not in HUB_WEIGHTS:
        load_encoder_weights(model, weights)
    return model


def model_gmacs(model: nn.Module, size: int, in_channels: int) -> float:
    """Multiply-accumulates (x 1e9) of one forward pass on one ``size`` x ``size`` image, counted
    by torch's FlopCounterMode (2 FLOPs per MAC): the cost axis of multi-objective sweeps, a proxy
    for served latency whose rank correlation with int8 ONNX latency ``bench/latency_proxy.py``
    measures (docs/BENCHMARKS.md)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, in_channels, size, size, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2e9


def choose_device(name: str | None = None) -> torch.device:
    """``name`` (``cpu``, ``cuda:1``...), or the GPU when there is one, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
