"""The CPU fast path: a bundle's two networks run with ONNX Runtime (:mod:`.onnx_export` makes them).

``cxrtune bundle export onnx BUNDLE --out NEW`` writes a new bundle with ``lung.onnx`` and
``disease.onnx`` beside the PyTorch weights (dynamic batch, the model's own input size) and records
in its ``bundle.json`` the SHA-256 of each and of the weights they came from, so a stale export is
never used. The scorer
takes them with ``runtime="onnx"`` (or ``"auto"``: ONNX on machines without a GPU when the
bundle has an export). Everything before and after the networks is the same code as with torch.

``cxrtune bundle export onnx-int8 BUNDLE --out NEW --calibration IMAGES`` writes a new bundle with int8 copies
(``lung.int8.onnx``, ``disease.int8.onnx``: ONNX Runtime's static QDQ quantization, weights int8 per
channel with 7-bit range, which ORT advises for CPUs without VNNI, activations uint8), calibrated
on real radiographs passed through the bundle's own
Stage I, so Stage II is calibrated on the lung crops it will see. About 1.7x faster on a CPU
without VNNI; the numbers move slightly, so int8 runs only when asked for (``runtime:
onnx-int8``), never by ``auto``. docs/BENCHMARKS.md reports its parity on real data.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Literal, get_args

import numpy as np
import torch

from .. import storage
from ..errors import CxrtuneError

log = logging.getLogger(__name__)
Runtime = Literal["auto", "torch", "onnx", "onnx-int8"]  # auto: ONNX Runtime on CPU when the bundle has an export
RUNTIMES: tuple[str, ...] = get_args(Runtime)
ONNX_RUNTIMES = ("onnx", "onnx-int8")  # the runtimes that need a bundle's ONNX export (`cxrtune bundle export`)


def sha256_hex(data: bytes) -> str:
    """The SHA-256 that bundle.json records for a weights or ONNX file."""
    return hashlib.sha256(data).hexdigest()


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


def load_onnx_stage(uri: str, stage: str, export: dict, int8: bool = False) -> OnnxStage:
    """The bundle's ONNX export of ``stage`` (its int8 copy with ``int8``), refused when it no
    longer matches the weights."""
    info = (export or {}).get(stage) or {}
    if sha256_hex(storage.read_bytes(storage.join(uri, f"{stage}.pt"))) != info.get("weights_sha256"):
        raise CxrtuneError(f"{uri}: {stage}.onnx was exported from other weights; run "
                           f"`cxrtune bundle export onnx {uri} --out NEW` again")
    if int8:
        q = ((export or {}).get("int8") or {}).get(stage) or {}
        data = storage.read_bytes(storage.join(uri, q.get("file", f"{stage}.int8.onnx")))
        if sha256_hex(data) != q.get("sha256") or q.get("onnx_sha256") != info.get("sha256"):
            raise CxrtuneError(f"{uri}: {stage}.int8.onnx is not the int8 copy of this bundle's export; "
                               f"run `cxrtune bundle export onnx-int8 {uri} --out NEW --calibration IMAGES` again")
        return OnnxStage(data)
    data = storage.read_bytes(storage.join(uri, info.get("file", f"{stage}.onnx")))
    if sha256_hex(data) != info.get("sha256"):
        raise CxrtuneError(f"{uri}: {stage}.onnx is not the file bundle.json records; export again")
    return OnnxStage(data)
