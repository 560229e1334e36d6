"""The CPU fast path: a bundle's two networks exported to ONNX and run with ONNX Runtime.

``cxrtune bundle --export onnx BUNDLE`` writes ``lung.onnx`` and ``disease.onnx`` beside the
PyTorch weights (dynamic batch, the model's own input size) and records in ``bundle.json`` the
SHA-256 of each and of the weights they came from, so a stale export is never used. The scorer
takes them with ``runtime="onnx"`` (or ``"auto"``: ONNX on machines without a GPU when the
bundle has an export). Everything before and after the networks is the same code as with torch.

``cxrtune bundle --export onnx-int8 BUNDLE --calibration IMAGES`` adds int8 copies
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

import numpy as np
import torch

from ..data import storage
from ..errors import CxrtuneError

log = logging.getLogger(__name__)
OPSET = 18
RUNTIMES = ("auto", "torch", "onnx", "onnx-int8")
INT8_MIN_CALIBRATION = 4


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def export_stage(model: torch.nn.Module, size: int, in_channels: int, classification: bool) -> bytes:
    """One stage's network as ONNX bytes (float32, NCHW, batch dimension dynamic)."""
    model = model.float().eval().cpu().to(memory_format=torch.contiguous_format)  # the scorer runs channels_last
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


class _Calibration:
    """ONNX Runtime's CalibrationDataReader over prepared network inputs (one image per batch)."""

    def __init__(self, batches: list[np.ndarray]):
        self.items = iter([{"image": b} for b in batches])

    def get_next(self):
        return next(self.items, None)


def quantize_bundle(uri: str, calibration: list[bytes], limit: int = 32) -> dict:
    """int8 copies of the bundle's ONNX export (made first if missing), calibrated on up to
    ``limit`` radiographs (PNG/JPEG/DICOM bytes) and recorded in ``bundle.json`` under
    ``onnx.int8`` with the SHA-256 of each file and of the FP32 export it came from."""
    import tempfile

    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

    from .artifacts import read_bundle_meta, update_bundle
    from .preprocessing import load_scan
    from .scorer import disease_input, has_lungs, load_bundle, stage_input

    if not read_bundle_meta(uri).onnx:
        export_bundle(uri)
    record = dict(read_bundle_meta(uri).onnx)
    scorer = load_bundle(uri, device="cpu", runtime="onnx", batch_size=1)
    images = []
    for data in calibration:
        if len(images) == limit:
            break
        try:
            images.append(load_scan(data).image)
        except CxrtuneError as exc:  # unreadable or refused: skipped (logged without a path)
            log.warning("int8 calibration: an input skipped (%s)", exc)
    if len(images) < INT8_MIN_CALIBRATION:
        raise CxrtuneError(f"int8 calibration needs at least {INT8_MIN_CALIBRATION} readable radiographs, "
                           f"got {len(images)}")
    lungs = scorer.lung_masks(images)
    inputs = {"lung": [stage_input(im, scorer.lung.pre) for im in images],
              "disease": [disease_input(im, lung, scorer.disease.pre)[0]
                          for im, lung in zip(images, lungs) if has_lungs(lung)]}
    if not inputs["disease"]:
        raise CxrtuneError("int8 calibration: the bundle's Stage I found no lungs on any calibration image")
    int8: dict = {"calibration_images": len(images), "stage2_calibration_images": len(inputs["disease"])}
    for stage in ("lung", "disease"):
        batches = [scorer.model_input(stage, [u8]).numpy() for u8 in inputs[stage]]
        with tempfile.TemporaryDirectory() as tmp:
            with open(f"{tmp}/fp32.onnx", "wb") as f:
                f.write(storage.read_bytes(storage.join(uri, record[stage]["file"])))
            quant_pre_process(f"{tmp}/fp32.onnx", f"{tmp}/pre.onnx", skip_symbolic_shape=True)
            quantize_static(f"{tmp}/pre.onnx", f"{tmp}/int8.onnx", _Calibration(batches),
                            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            data = open(f"{tmp}/int8.onnx", "rb").read()
        storage.write_bytes(storage.join(uri, f"{stage}.int8.onnx"), data)
        int8[stage] = {"file": f"{stage}.int8.onnx", "sha256": _sha(data), "onnx_sha256": record[stage]["sha256"]}
    record["int8"] = int8
    update_bundle(uri, onnx=record)
    return int8


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
    if _sha(storage.read_bytes(storage.join(uri, f"{stage}.pt"))) != info.get("weights_sha256"):
        raise CxrtuneError(f"{uri}: {stage}.onnx was exported from other weights; run "
                           f"`cxrtune bundle --export onnx {uri}` again")
    if int8:
        q = ((export or {}).get("int8") or {}).get(stage) or {}
        data = storage.read_bytes(storage.join(uri, q.get("file", f"{stage}.int8.onnx")))
        if _sha(data) != q.get("sha256") or q.get("onnx_sha256") != info.get("sha256"):
            raise CxrtuneError(f"{uri}: {stage}.int8.onnx is not the int8 copy of this bundle's export; "
                               f"run `cxrtune bundle --export onnx-int8 {uri} --calibration IMAGES` again")
        return OnnxStage(data)
    data = storage.read_bytes(storage.join(uri, info.get("file", f"{stage}.onnx")))
    if _sha(data) != info.get("sha256"):
        raise CxrtuneError(f"{uri}: {stage}.onnx is not the file bundle.json records; export again")
    return OnnxStage(data)
