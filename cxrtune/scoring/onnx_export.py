"""ONNX export of a bundle's two networks (FP32) and their int8 copies (ONNX Runtime's static QDQ
quantization calibrated on real radiographs through the bundle's own Stage I); :mod:`.onnx_runtime`
runs them. See that module for the format and when each runtime is used."""

from __future__ import annotations

import logging
import tempfile

import numpy as np
import torch

from .. import storage
from ..errors import CxrtuneError
from ..model.artifacts import bundle_files, derive_bundle, read_bundle_file, read_bundle_meta, require_new_bundle
from ..preprocessing import load_scan
from .batch_scoring import expand_inputs
from .onnx_runtime import sha256_hex
from .scorer import disease_input, has_lungs, load_bundle, stage_input

log = logging.getLogger(__name__)
OPSET = 18
INT8_MIN_CALIBRATION = 4


def export_stage(model: torch.nn.Module, size: int, in_channels: int, classification: bool) -> bytes:
    """One stage's network as ONNX bytes (float32, NCHW, batch dimension dynamic)."""
    model = model.float().eval().cpu().to(memory_format=torch.contiguous_format)  # the scorer runs channels_last
    x = torch.zeros(2, in_channels, size, size)
    outputs = ["opacity_logits", "cls_logits"] if classification else ["lung_logits"]

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
            if program is None:
                raise CxrtuneError("torch.onnx.export returned no program")
            program.save(path, external_data=False)
        return open(path, "rb").read()


def onnx_files(uri: str) -> tuple[dict, dict[str, bytes]]:
    """FP32 ONNX exports of both stages of the bundle at ``uri``: what ``bundle.json`` records of
    them (``onnx``), and the files by name."""
    meta = read_bundle_meta(uri)
    scorer = load_bundle(uri, device="cpu", runtime="torch")
    record: dict = {"opset": OPSET, "torch": torch.__version__}
    files: dict[str, bytes] = {}
    for stage in ("lung", "disease"):
        model = scorer.stage(stage)
        data = export_stage(model.model, model.pre.size, model.pre.in_channels, stage == "disease")
        files[f"{stage}.onnx"] = data
        record[stage] = {"file": f"{stage}.onnx", "sha256": sha256_hex(data),
                         "weights_sha256": sha256_hex(read_bundle_file(uri, f"{stage}.pt", meta))}
    return record, files


def export_bundle(uri: str, out_uri: str) -> dict:
    """A new bundle at ``out_uri``: the one at ``uri`` plus the ONNX export of both stages,
    recorded in its ``bundle.json``."""
    require_new_bundle(out_uri)  # before the work, not after it
    record, files = onnx_files(uri)
    stale = tuple(f for f in bundle_files(read_bundle_meta(uri)) if f.endswith(".int8.onnx"))  # of the old export
    derive_bundle(uri, out_uri, extra=files, drop=stale, onnx=record)
    return record


class _Calibration:
    """ONNX Runtime's CalibrationDataReader over prepared network inputs (one image per batch)."""
    def __init__(self, batches: list[np.ndarray]):
        self.items = iter([{"image": b} for b in batches])

    def get_next(self):
        return next(self.items, None)


def quantize_stage(fp32: bytes, batches: list[np.ndarray]) -> bytes:
    """An FP32 ONNX network's int8 copy: ONNX Runtime's static QDQ quantization (per-channel
    int8 weights, uint8 activations) calibrated on ``batches`` of prepared network inputs."""
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

    with tempfile.TemporaryDirectory() as tmp:
        with open(f"{tmp}/fp32.onnx", "wb") as f:
            f.write(fp32)
        quant_pre_process(f"{tmp}/fp32.onnx", f"{tmp}/pre.onnx", skip_symbolic_shape=True)
        quantize_static(f"{tmp}/pre.onnx", f"{tmp}/int8.onnx", _Calibration(batches),
                        quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return open(f"{tmp}/int8.onnx", "rb").read()


def quantize_bundle(uri: str, out_uri: str, calibration: list[bytes], limit: int = 32) -> dict:
    """A new bundle at ``out_uri``: the one at ``uri`` with int8 copies of its ONNX export (made
    first if missing), calibrated on up to ``limit`` radiographs (PNG/JPEG/DICOM bytes) and
    recorded in ``bundle.json`` under ``onnx.int8`` with the SHA-256 of each file and of the FP32
    export it came from."""
    require_new_bundle(out_uri)  # before the work, not after it
    meta = read_bundle_meta(uri)
    if meta.onnx:
        record = dict(meta.onnx)
        files = {record[s]["file"]: read_bundle_file(uri, record[s]["file"], meta) for s in ("lung", "disease")}
    else:
        record, files = onnx_files(uri)
    scorer = load_bundle(uri, device="cpu", runtime="torch", batch_size=1)
    images: list[np.ndarray] = []
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
    inputs = {"lung": [stage_input(im, scorer.stage("lung").pre) for im in images],
              "disease": [disease_input(im, lung, scorer.stage("disease").pre)[0]
                          for im, lung in zip(images, lungs) if has_lungs(lung)]}
    if not inputs["disease"]:
        raise CxrtuneError("int8 calibration: the bundle's Stage I found no lungs on any calibration image")
    int8: dict = {"calibration_images": len(images), "stage2_calibration_images": len(inputs["disease"])}
    for stage in ("lung", "disease"):
        batches = [scorer.model_input(stage, [u8]).numpy() for u8 in inputs[stage]]
        data = quantize_stage(files[record[stage]["file"]], batches)
        files[f"{stage}.int8.onnx"] = data
        int8[stage] = {"file": f"{stage}.int8.onnx", "sha256": sha256_hex(data), "onnx_sha256": record[stage]["sha256"]}
    record["int8"] = int8
    derive_bundle(uri, out_uri, extra=files, onnx=record)
    return int8


def calibration_sample(inputs: list[str], limit: int) -> list[bytes]:
    """Up to ``limit`` radiographs from files, folders or S3 prefixes, spread over all of them
    (every n-th, not the first few files of one folder); an unreadable one is skipped and logged
    without its name."""
    if limit < INT8_MIN_CALIBRATION:
        raise CxrtuneError(f"--calibration-limit must be at least {INT8_MIN_CALIBRATION}")
    uris = expand_inputs(inputs)
    step = max(1, len(uris) // limit)
    data = []
    for uri in uris[::step][:limit]:
        try:
            data.append(storage.read_bytes(uri))
        except (CxrtuneError, OSError) as exc:
            log.warning("int8 calibration: an input not read (%s)", type(exc).__name__)
    return data


def export(uri: str, out_uri: str, fmt: str, calibration: list[str] | None = None,
           calibration_limit: int = 32) -> dict:
    """``cxrtune bundle export``: a new bundle at ``out_uri`` with an ``onnx`` (FP32) or
    ``onnx-int8`` (calibrated on ``calibration``: radiographs like the ones it will score) export.
    Returns what its bundle.json records of the export."""
    if fmt == "onnx":
        return export_bundle(uri, out_uri)
    if fmt != "onnx-int8":
        raise CxrtuneError(f"export format {fmt!r}: the export formats are onnx and onnx-int8")
    if not calibration:
        raise CxrtuneError("an onnx-int8 export needs --calibration: radiographs like the ones it will score")
    return quantize_bundle(uri, out_uri, calibration_sample(calibration, calibration_limit), limit=calibration_limit)
