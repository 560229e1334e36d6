"""The CPU fast path: a bundle's two networks exported to ONNX and run with ONNX Runtime.

``cxrtune bundle --export onnx BUNDLE`` writes ``lung.onnx`` and ``disease.onnx`` beside the
PyTorch weights (dynamic batch, the model's own input size) and records in ``bundle.json`` the
SHA-256 of each and of the weights they came from, so a stale export is never used. The scorer
takes them with ``runtime="onnx"`` (or ``"auto"``: ONNX on machines without a GPU when the
bundle has an export). Everything before and after the networks is the same code as with torch.
"""

from __future__ import annotations

import hashlib
import logging
import os

import numpy as np
import torch

from . import storage
from .errors import CxrtuneError

log = logging.getLogger(__name__)
OPSET = 18
RUNTIMES = ("auto", "torch", "onnx")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def export_stage(model: torch.nn.Module, size: int, in_channels: int, classification: bool) -> bytes:
    """One stage's network as ONNX bytes (float32, NCHW, batch dimension dynamic)."""
    model = model.float().eval().cpu()
    x = torch.zeros(2, in_channels, size, size)
    outputs = ["opacity_logits", "cls_logits"] if classification else ["lung_logits"]
    import tempfile

    axes = {"image": {0: "batch"}, **{o: {0: "batch"} for o in outputs}}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        path = f"{tmp}/model.onnx"
        try:  # the TorchScript exporter: one self-contained file, dynamic batch
            torch.onnx.export(model, (x,), path, input_names=["image"], output_names=outputs,
                              opset_version=OPSET, dynamic_axes=axes, dynamo=False)
        except (TypeError, RuntimeError, NotImplementedError) as exc:  # a torch without it: the dynamo exporter
            log.info("TorchScript ONNX export unavailable (%s); using torch.export", exc)
            batch = torch.export.Dim("batch", min=1, max=1024)
            program = torch.onnx.export(model, (x,), input_names=["image"], output_names=outputs,
                                        opset_version=OPSET, dynamic_shapes=({0: batch},), dynamo=True)
            program.save(path, external_data=False)
        return open(path, "rb").read()


def export_bundle(uri: str) -> dict:
    """Export both stages of the bundle at ``uri`` and record the export in ``bundle.json``."""
    from .artifacts import update_bundle
    from .scorer import load_bundle

    scorer = load_bundle(uri, device="cpu", runtime="torch")
    record = {"opset": OPSET, "torch": torch.__version__}
    for stage in ("lung", "disease"):
        model = scorer.lung if stage == "lung" else scorer.disease
        data = export_stage(model.model, model.pre.size, model.pre.in_channels, stage == "disease")
        storage.write_bytes(storage.join(uri, f"{stage}.onnx"), data)
        record[stage] = {"file": f"{stage}.onnx", "sha256": _sha(data),
                         "weights_sha256": _sha(storage.read_bytes(storage.join(uri, f"{stage}.pt")))}
    update_bundle(uri, onnx=record)
    return record


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class OnnxStage:
    """An ONNX Runtime session standing in for a stage's torch module: called on a normalised
    float32 NCHW tensor, it returns what the torch module returns (tensors)."""

    def __init__(self, data: bytes, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or int(os.environ.get("CXRTUNE_ORT_THREADS", 0)) or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # idle threads sleep instead of spinning: two stage replicas share a CPU's cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, x: torch.Tensor):
        out = self.session.run(self.outputs, {"image": x.detach().cpu().numpy().astype(np.float32, copy=False)})
        tensors = [torch.from_numpy(o) for o in out]
        return tensors[0] if len(tensors) == 1 else tuple(tensors)


def load_onnx_stage(uri: str, stage: str, export: dict) -> OnnxStage:
    """The bundle's ONNX export of ``stage``, refused when it no longer matches the weights."""
    info = (export or {}).get(stage) or {}
    data = storage.read_bytes(storage.join(uri, info.get("file", f"{stage}.onnx")))
    if _sha(data) != info.get("sha256"):
        raise CxrtuneError(f"{uri}: {stage}.onnx is not the file bundle.json records; export again")
    if _sha(storage.read_bytes(storage.join(uri, f"{stage}.pt"))) != info.get("weights_sha256"):
        raise CxrtuneError(f"{uri}: {stage}.onnx was exported from other weights; run "
                           f"`cxrtune bundle --export onnx {uri}` again")
    return OnnxStage(data)
