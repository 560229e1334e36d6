"""The Ray Serve application: a FastAPI ingress composing a Stage I and a Stage II deployment.

* ``Stage1`` and ``Stage2`` load their model from the bundle once per replica and answer through
  ``@serve.batch`` (batch size and wait configurable), channels_last on every device, bf16 autocast
  and fractional GPUs per replica on a GPU.
* ``Ingress`` (FastAPI) decodes uploads and resizes them in worker threads (never on the event
  loop), calls the stages through DeploymentHandles, computes zones and the record, renders the
  overlay, and turns every kind of bad input into a clear 4xx: 413 (bytes, pixels), 415 (not PNG,
  JPEG or DICOM), 422 (undecodable, truncated, blank, tiny, non-frontal or non-image DICOM);
  a readable image with no lungs found is a 200 with `status: unscored`, like the CLI;
  503 with Retry-After when the queue is full. DICOM tags are never logged or echoed. An optional
  API key (``X-API-Key``) comes from an environment variable.
* Admission control: the ingress answers at most ``max_in_flight`` scoring requests at once per
  replica; beyond that the client gets cxrtune's JSON 503 with ``Retry-After`` at once (Serve's own
  ``max_queued_requests`` stays as the outer guard). Every error body has one shape:
  ``{"error": ..., "request_id": ...}``, 400/401/404/405 and validation errors included.
* An audit trail without patient data: one JSON log line per request (logger
  ``ray.serve.cxrtune.audit``, in the Ingress replica's log): request id, bundle hash, the
  SHA-256 of the input bytes, HTTP code, record status, score, timings. No name, path or DICOM tag.

``build_app(args)`` is the application builder that ``serve run`` / ``serve deploy`` import
(``serve/config.yaml``); ``cxrtune serve --bundle URI`` runs it locally.
"""


import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__, storage
from ..cluster import check_fits, init_ray
from ..dicom import Limits
from ..errors import (
    CxrtuneError,
    ImageDecodeError,
    ImageTooLargeError,
    UnsupportedFormatError,
)
from ..model.artifacts import bundle_hash, read_bundle_meta
from ..preprocessing import WORK_SIZE, InputRefused, Preprocessing, load_scan
from ..resources import shipped
from ..scoring.overlay import encode_overlay
from ..scoring.scorer import (
    build_record,
    bundle_models,
    disease_input,
    has_lungs,
    load_bundle,
    lung_output,
    opacity_output,
    stage_input,
)

log = logging.getLogger("ray.serve.cxrtune")  # under ray.serve: lands in the replica's Serve log
audit = logging.getLogger("ray.serve.cxrtune.audit")  # Serve's replica log handlers carry it to the logs
audit.setLevel(logging.INFO)
API_VERSION = "v1"
STAGE_RETRIES = 8  # a dead replica's requests are retried with backoff (0.25 s doubling, 5 s at most: ~25 s in all)


class ServeSettings(BaseModel):
    """What the application builder takes (``args`` in serve/config.yaml); Serve validates the
    config's ``args`` against it, so a misspelt key fails at deploy time, naming the key."""
    model_config = ConfigDict(extra="forbid")

    bundle: str
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    max_upload_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 64 * 1024 * 1024
    work_size: int = WORK_SIZE  # long side of the working copy (the CLI's too): zones are scale-invariant
    api_key_env: str = "CXRTUNE_API_KEY"
    device: str | None = None
    runtime: Literal["auto", "torch", "onnx", "onnx-int8"] = "auto"  # auto: ONNX Runtime on CPU when the bundle has an export
    threads: int | None = None  # network threads per stage replica (default: Ray's, from the replica's num_cpus)
    max_files_per_batch: int = 16
    max_in_flight: int = 256  # images one ingress replica scores at once (a batch counts each file); more: 503
    retry_after_s: int = 1


# ------------------------------------------------------------------------------------ the stages

BATCH_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
MS_BUCKETS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]


class _Stage:
    """Shared by both stages: one stage's network, run on the lean inputs the ingress prepared.

    Every item names the bundle it is for (URI and content hash): the ingress that made it
    decides, so one request never mixes the stages of two bundles, even while ``serve deploy``
    replaces one bundle with another (old and new ingress replicas then both have live stage
    replicas that answer them). A replica keeps its own bundle loaded and loads another on first
    use (the two newest stay loaded)."""
    stage = ""
    KEEP = 2

    def __init__(self, settings: dict):
        from ray.serve import metrics

        self.batch_sizes = metrics.Histogram("cxrtune_batch_size", description="images per batch a stage ran",
                                             boundaries=BATCH_BUCKETS, tag_keys=("stage",))
        self.batch_sizes.set_default_tags({"stage": self.stage})
        self.s = ServeSettings(**settings)
        if self.s.threads:
            torch.set_num_threads(self.s.threads)  # ONNX Runtime sessions take the same count
        self.scorers: dict = {}  # bundle hash -> Scorer (insertion order: oldest first)
        self.loading = asyncio.Lock()
        self.own_hash = self._load(self.s.bundle)
        if hasattr(self.run, "set_max_batch_size"):  # the config's batching, not the decorator's
            self.run.set_max_batch_size(self.s.max_batch_size)
        if hasattr(self.run, "set_batch_wait_timeout_s"):
            self.run.set_batch_wait_timeout_s(self.s.batch_wait_timeout_s)

    def _load(self, uri: str, expected: str | None = None) -> str:
        digest = bundle_hash(uri)
        if expected and digest != expected:
            raise CxrtuneError(f"the bundle at {uri} changed after it was deployed (hash {digest[:12]}, "
                               f"expected {expected[:12]}); deploy it again")
        # another bundle (a rolling update's) may lack this replica's pinned export: auto for it
        runtime = self.s.runtime if expected is None else "auto"
        self.scorers[digest] = load_bundle(uri, device=self.s.device, batch_size=self.s.max_batch_size,
                                           stages=(self.stage,), runtime=runtime)
        keep = {digest, getattr(self, "own_hash", digest)}  # never drop this replica's own bundle
        while len(self.scorers) > max(self.KEEP, len(keep)):
            del self.scorers[next(k for k in self.scorers if k not in keep)]
        return digest

    async def _scorer(self, uri: str, digest: str):
        if digest not in self.scorers:
            async with self.loading:
                if digest not in self.scorers:
                    log.info("%s: loading bundle %s for a request", self.stage, digest[:12])
                    await asyncio.to_thread(self._load, uri, digest)
        return self.scorers[digest]

    async def _forward(self, items: list[tuple[str, str, np.ndarray]]) -> list[tuple[str, str, object]]:
        """``(bundle URI, bundle hash, lean uint8 input)`` -> ``(bundle hash, runtime, output)``."""
        self.batch_sizes.observe(len(items))
        out: list = [None] * len(items)
        for digest in dict.fromkeys(d for _, d, _ in items):  # one forward per bundle in the batch
            idx = [i for i, (_, d, _) in enumerate(items) if d == digest]
            scorer = await self._scorer(items[idx[0]][0], digest)
            results = await asyncio.to_thread(scorer.forward, self.stage, [items[i][2] for i in idx])
            loaded = scorer.models.get("bundle_hash")  # hashed from the files when they were loaded
            for i, r in zip(idx, results):
                out[i] = (loaded, scorer.runtime, r)
        return out

    def info(self) -> dict:
        own = self.scorers.get(self.own_hash)
        return {"bundle_hash": self.own_hash, "loaded": list(self.scorers), "runtime": own.runtime if own else None}


@serve.deployment(name="Stage1", max_ongoing_requests=64)
class Stage1(_Stage):
    """Lung segmentation: the lean uint8 image -> uint8 lung probabilities at its shape."""
    stage = "lung"

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def run(self, items: list[tuple[str, str, np.ndarray]]) -> list[tuple[str, np.ndarray]]:
        return await self._forward(items)


@serve.deployment(name="Stage2", max_ongoing_requests=64)
class Stage2(_Stage):
    """Opacity segmentation + classification: the lung ROI, uint8 -> (uint8 opacity probabilities
    at its shape, p(disease))."""
    stage = "disease"

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def run(self, items: list[tuple[str, str, np.ndarray]]) -> list[tuple[str, tuple[np.ndarray, float]]]:
        return await self._forward(items)


# ----------------------------------------------------------------------------------- the ingress

fastapi_app = FastAPI(
    title="cxrtune scorer", version=__version__,
    description="Two-stage chest X-ray severity scoring: lung zones A-F, a 0-6 score, opacity percent.",
)


class ZoneResult(BaseModel):
    affected: bool | None = Field(description="opacity_fraction >= T; null for a lung not found")
    opacity_fraction: float | None = Field(description="share of the zone's pixels the refined opacity mask covers")


class LungResult(BaseModel):
    opacity_percent: float
    grade: int = Field(description="seed 000's per-lung grade: 0 clear, 1 for 1-33 %, 2 for 34-66 %, 3 for 67-100 %")


class ScoreRecord(BaseModel):
    """The record of one image (docs/scoring.md): the same as `cxrtune score` writes."""
    status: Literal["scored", "partial", "unscored"]
    reason: str | None = Field(description="why the record is partial or unscored")
    score: int | None = Field(description="affected zones, 0-6; null unless status is scored")
    zones: dict[str, ZoneResult] | None = Field(description="A/B/C: patient's right lung upper/middle/lower; D/E/F: left")
    lungs: dict[str, LungResult | None] | None
    opacity_percent: float | None
    threshold: float = Field(description="the zone threshold T")
    lungs_found: int
    disease_probability: float | None
    models: dict = Field(description="the models, T_cls, the opacity cut and the bundle (name, content hash); `stage_bundles` "
                                     "gives the content hash of the bundle behind each stage's answer "
                                     "and `stage_runtimes` what ran it (torch, onnx, onnx-int8); null for a "
                                     "stage that did not run")
    input: dict
    request_id: str
    timings_ms: dict[str, float]
    overlay_png_base64: str | None = None


class BatchItem(BaseModel):
    model_config = ConfigDict(extra="allow")

    file: str
    http_status: int
    status: str = Field(description="the record's status, or 'error' with `error` for a refused file")


class BatchResult(BaseModel):
    request_id: str
    results: list[BatchItem]


class ErrorBody(BaseModel):
    error: str
    request_id: str


_ERRORS = {400: "malformed request (e.g. a broken multipart body)", 401: "missing or wrong X-API-Key",
           413: "upload or image over the limits", 415: "not PNG, JPEG or DICOM",
           422: "unreadable, blank, tiny or refused by the DICOM rules; or invalid query parameters",
           500: "internal error (the request id is in the server's log)",
           503: "at capacity (admission control or a full queue) or a replica failed: retry after Retry-After seconds"}
ERROR_RESPONSES = {code: {"model": ErrorBody, "description": text} for code, text in _ERRORS.items()}
UPLOAD_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    "application/dicom": {"schema": {"type": "string", "format": "binary"}}}}}
BATCH_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["files"],
    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}}
OVERLAY = Query(False, description="add the overlay PNG (base64 in the record, or the PNG itself with Accept: image/png)")
REFUSALS = {500: "internal", 400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method", 413: "too_large",
            415: "unsupported_format", 422: "unreadable_or_refused", 503: "capacity"}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def request_id_of(request: Request) -> str:
    """The caller's X-Request-Id when it is a plain token, else a new one (never echo junk)."""
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


class RequestError(Exception):
    def __init__(self, status: int, detail: str, retry_after: int = 1):
        self.status, self.detail, self.retry_after = status, detail, retry_after

    def response(self, request_id: str) -> JSONResponse:
        return error_response(self.status, self.detail, request_id,
                              {"Retry-After": str(self.retry_after)} if self.status == 503 else None)


def error_response(status: int, detail: str, request_id: str, headers: dict | None = None) -> JSONResponse:
    """Every error has one shape: ``{"error", "request_id"}``."""
    return JSONResponse({"error": detail, "request_id": request_id}, status_code=status,
                        headers={**(headers or {}), "X-Request-Id": request_id})


_ingress: "Ingress | None" = None  # this process's ingress replica, for the handlers below


def _refused(code: int, request_id: str) -> None:
    """Errors raised outside the routes (404, 405, validation, bugs): counted and audited like
    the rest, through the replica's ingress."""
    if _ingress is not None:
        _ingress._audit(request_id, code, None, None)


@fastapi_app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    request_id = request_id_of(request)
    _refused(exc.status_code, request_id)
    return error_response(exc.status_code, str(exc.detail), request_id, getattr(exc, "headers", None))


@fastapi_app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug, not bad input: still the one error shape, and logged (without the request's data)."""
    request_id = request_id_of(request)
    log.error("request %s failed: %s", request_id, type(exc).__name__)
    _refused(500, request_id)
    return error_response(500, "internal error", request_id)


@fastapi_app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = ["{}: {}".format(".".join(str(x) for x in e.get("loc", ())), e.get("msg", "")) for e in exc.errors()]
    request_id = request_id_of(request)
    _refused(422, request_id)
    return error_response(422, "invalid request: " + "; ".join(parts), request_id)


def _decode(data: bytes, s: ServeSettings):
    """Bytes -> a checked Scan at the working size (the scoring policy's first step), with the
    errors mapped to HTTP codes. Runs in a thread."""
    try:
        return load_scan(data, Limits(max_bytes=s.max_upload_bytes, max_pixels=s.max_pixels), s.work_size)
    except UnsupportedFormatError as exc:
        raise RequestError(415, f"{exc}; send PNG (8/16-bit), JPEG or DICOM") from None
    except ImageTooLargeError as exc:
        raise RequestError(413, str(exc)) from None
    except InputRefused as exc:
        raise RequestError(422, str(exc)) from None
    except ImageDecodeError as exc:
        raise RequestError(422, f"cannot decode the image: {exc}") from None


@serve.deployment(name="Ingress", max_ongoing_requests=1024)  # > max_in_flight: cxrtune answers overload itself
@serve.ingress(fastapi_app)
class Ingress:
    def __init__(self, stage1: DeploymentHandle, stage2: DeploymentHandle, settings: dict):
        self.s = ServeSettings(**settings)
        self.stage1, self.stage2 = stage1, stage2
        meta = read_bundle_meta(self.s.bundle)
        self.zone_threshold, self.cls_threshold = float(meta.zone_threshold), float(meta.cls_threshold)
        self.lung_threshold, self.opacity_threshold = float(meta.lung_threshold), float(meta.opacity_threshold)
        self.pre = {stage: Preprocessing.from_dict(meta.stage(stage).preprocessing) for stage in ("lung", "disease")}
        self.bundle_hash = bundle_hash(self.s.bundle)  # every stage call names it
        self.record_models = bundle_models(meta, self.bundle_hash)  # what each record names
        self.models = {  # GET /v1/models: that, plus how the bundle was calibrated
            **self.record_models, "zone_threshold": self.zone_threshold,
            "zone_calibration": asdict(meta.zone_calibration) if meta.zone_calibration else None,
            "cls_calibration": asdict(meta.cls_calibration) if meta.cls_calibration else None,
            "opacity_threshold": self.opacity_threshold,
            "opacity_calibration": asdict(meta.opacity_calibration) if meta.opacity_calibration else None,
            "model_card": meta.model_card, "audits": meta.audits, "versions": meta.versions,
            "stage_audits": {stage: meta.stage(stage).audits for stage in ("lung", "disease")},  # the runs' own
        }
        self.api_key = os.environ.get(self.s.api_key_env, "")
        self.viewer = (Path(__file__).parent / "viewer.html").read_text()
        self.in_flight = 0  # one event loop per replica: a plain counter is exact
        from ray.serve import metrics

        self.m_requests = metrics.Counter("cxrtune_requests", description="scoring requests by HTTP code and "
                                          "outcome (record status, or the refusal reason)", tag_keys=("code", "outcome"))
        self.m_retries = metrics.Counter("cxrtune_stage_retries", description="stage calls retried after the "
                                         "replica that had them failed", tag_keys=("stage",))
        global _ingress
        _ingress = self
        self.m_ms = metrics.Histogram("cxrtune_step_ms", description="milliseconds per request in each step",
                                      boundaries=MS_BUCKETS, tag_keys=("step",))

    @contextlib.contextmanager
    def _admitted(self, images: int = 1):
        """Admission control: at most ``max_in_flight`` images being scored at once, else a 503."""
        if self.in_flight + images > self.s.max_in_flight:
            raise RequestError(503, f"the scorer is at capacity ({self.in_flight} images in flight, at most "
                                    f"{self.s.max_in_flight}); retry shortly", self.s.retry_after_s)
        self.in_flight += images
        try:
            yield
        finally:
            self.in_flight -= images

    def _audit(self, request_id: str, code: int, data: bytes | None, record: dict | None) -> None:
        """One JSON line per request, without patient data (no name, path or DICOM tag), and the
        request and step-time metrics."""
        self.m_requests.inc(tags={"code": str(code), "outcome": (record or {}).get("status") or REFUSALS.get(code, "error")})
        for step, ms in ((record or {}).get("timings_ms") or {}).items():
            if step not in ("total", "models"):  # decode, stage1, stage2, post
                self.m_ms.observe(ms, tags={"step": step})
        audit.info("%s", json.dumps({
            "event": "score", "request_id": request_id, "bundle_hash": self.record_models.get("bundle_hash"),
            "input_sha256": hashlib.sha256(data).hexdigest() if data else None, "http_status": code,
            "status": (record or {}).get("status", "error"), "score": (record or {}).get("score"),
            "timings_ms": (record or {}).get("timings_ms")}))

    # ----------------------------------------------------------------------------- plumbing
    def _check_key(self, request: Request) -> None:
        if self.api_key and not hmac.compare_digest(request.headers.get("x-api-key", ""), self.api_key):
            raise RequestError(401, "missing or wrong X-API-Key")

    async def _body(self, request: Request) -> list[tuple[str, bytes]]:
        """(name, bytes) of each uploaded file: multipart ``file``/``files`` fields or a raw body.
        Bodies over the byte limit are refused from Content-Length before they are read."""
        limit = self.s.max_upload_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit * self.s.max_files_per_batch:
            raise RequestError(413, f"request is {int(length) / 1e6:.1f} MB, over the limit")
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=self.s.max_files_per_batch, max_part_size=limit)
            files = [(getattr(v, "filename", "") or k, await v.read(limit + 1))
                     for k, v in form.multi_items() if hasattr(v, "read")]
            if not files:
                raise RequestError(422, "multipart request has no file field")
        else:
            data = bytearray()
            async for chunk in request.stream():
                data += chunk
                if len(data) > limit:
                    raise RequestError(413, f"upload over the limit of {limit / 1e6:.0f} MB")
            files = [("body", bytes(data))]
        for name, data in files:
            if len(data) > limit:
                raise RequestError(413, f"{name}: over the limit of {limit / 1e6:.0f} MB")
            if not data:
                raise RequestError(422, f"{name}: empty upload")
        return files

    async def _call(self, stage: DeploymentHandle, item):
        """One stage call, retried when the replica that had it dies (a node lost, a replica
        killed): Serve sends the retry to a live or restarted replica, so no request is lost."""
        died = 0
        for attempt in range(STAGE_RETRIES + 1):
            try:
                return await stage.run.remote(item)
            except (RayActorError, ActorUnavailableError, ReplicaUnavailableError) as exc:
                # a replica that died under this request is retried once only: an input that kills
                # replicas (out of memory, a crash) must not take down one after another
                died += isinstance(exc, RayActorError) and not isinstance(exc, ActorUnavailableError)
                if attempt == STAGE_RETRIES or died > 1:
                    raise RequestError(503, "a scoring replica failed; retry shortly", self.s.retry_after_s) from None
                log.warning("a %s replica failed; retrying (attempt %d)", stage.deployment_name, attempt + 2)
                self.m_retries.inc(tags={"stage": stage.deployment_name})
                await asyncio.sleep(min(5.0, 0.25 * 2 ** attempt))

    async def _stage(self, stage: DeploymentHandle, x: np.ndarray):
        """One stage call for this ingress's bundle: ``(bundle hash that answered, runtime, output)``."""
        digest, runtime, out = await self._call(stage, (self.s.bundle, self.bundle_hash, x))
        if digest != self.bundle_hash:  # cannot happen: the stage serves the bundle it is asked for
            raise RequestError(500, "a stage answered for another bundle")
        return digest, runtime, out

    async def _score(self, data: bytes, overlay: bool, request_id: str) -> tuple[dict, bytes | None]:
        """The scoring policy split at the stage boundaries: the ingress prepares each stage's lean
        input and turns its output into masks with the library's own functions."""

        t0 = time.perf_counter()
        scan = await asyncio.to_thread(_decode, data, self.s)
        image = scan.image
        t1 = time.perf_counter()
        opacity = p = None
        stages = {"lung": None, "disease": None}
        runtimes = {"lung": None, "disease": None}
        try:
            x1 = await asyncio.to_thread(stage_input, image, self.pre["lung"])
            stages["lung"], runtimes["lung"], prob = await self._stage(self.stage1, x1)
            lung = await asyncio.to_thread(lung_output, prob, image.shape, self.lung_threshold)
            t_mid = time.perf_counter()
            if has_lungs(lung):  # no lungs: an unscored record (HTTP 200), Stage II is not asked
                x2, box = await asyncio.to_thread(disease_input, image, lung, self.pre["disease"])
                stages["disease"], runtimes["disease"], (prob2, p) = await self._stage(self.stage2, x2)
                opacity, p = await asyncio.to_thread(opacity_output, prob2, p, box, image.shape, self.cls_threshold,
                                                     self.opacity_threshold)
        except (BackPressureError, DeploymentUnavailableError):
            raise RequestError(503, "the scorer is at capacity; retry shortly", self.s.retry_after_s) from None
        t2 = time.perf_counter()

        def finish():
            # the bundle behind each stage's answer, and what ran it (int8 answers differ slightly)
            models = {**self.record_models, "stage_bundles": stages, "stage_runtimes": runtimes}
            record, detail = build_record(lung, opacity, p, self.zone_threshold, models, scan)
            png = None
            if overlay:

                png = encode_overlay(image, detail.lungs, detail.opacity, record)
            return record, png

        record, png = await asyncio.to_thread(finish)
        t3 = time.perf_counter()
        record["request_id"] = request_id
        record["timings_ms"] = {"decode": round(1000 * (t1 - t0), 1), "stage1": round(1000 * (t_mid - t1), 1),
                                "stage2": round(1000 * (t2 - t_mid), 1), "models": round(1000 * (t2 - t1), 1),
                                "post": round(1000 * (t3 - t2), 1), "total": round(1000 * (t3 - t0), 1)}
        return record, png

    # ----------------------------------------------------------------------------- routes
    @fastapi_app.post(f"/{API_VERSION}/score", summary="Score one radiograph (multipart `file` or raw body)",
                      response_model=ScoreRecord, openapi_extra=UPLOAD_BODY,
                      responses={**ERROR_RESPONSES, 200: {"content": {"image/png": {}},
                                                          "description": "the record, or the overlay PNG"}})
    async def score(self, request: Request, overlay: bool = OVERLAY):
        request_id = request_id_of(request)
        data = None
        try:
            self._check_key(request)
            with self._admitted():
                name, data = (await self._body(request))[0]
                record, png = await self._score(data, overlay, request_id)
        except RequestError as exc:
            self._audit(request_id, exc.status, data, None)
            return exc.response(request_id)
        self._audit(request_id, 200, data, record)
        if png is not None and "image/png" in request.headers.get("accept", ""):
            headers = {"X-Request-Id": request_id, "X-Status": record["status"]}
            if record["score"] is not None:
                headers["X-Score"] = str(record["score"])
            return Response(png, media_type="image/png", headers=headers)
        if png is not None:
            record["overlay_png_base64"] = base64.b64encode(png).decode("ascii")
        return JSONResponse(record, headers={"X-Request-Id": request_id})

    @fastapi_app.post(f"/{API_VERSION}/score/batch", summary="Score several files (multipart `files`)",
                      response_model=BatchResult, openapi_extra=BATCH_BODY, responses=ERROR_RESPONSES)
    async def score_batch(self, request: Request, overlay: bool = OVERLAY):
        request_id = request_id_of(request)
        try:
            self._check_key(request)
            files = await self._body(request)
            with self._admitted(len(files)):

                async def one(i: int, name: str, data: bytes) -> dict:
                    rid = f"{request_id}-{i}"
                    try:
                        record, png = await self._score(data, overlay, rid)
                    except Exception as exc:  # noqa: BLE001 - one bad file never fails the others
                        err = exc if isinstance(exc, RequestError) else RequestError(500, "internal error")
                        if not isinstance(exc, RequestError):
                            log.exception("request %s failed", rid)
                        self._audit(rid, err.status, data, None)
                        return {"file": name, "http_status": err.status, "status": "error", "error": err.detail,
                                "request_id": rid}
                    self._audit(rid, 200, data, record)
                    if png is not None:
                        record["overlay_png_base64"] = base64.b64encode(png).decode("ascii")
                    return {"file": name, "http_status": 200, **record}

                results = await asyncio.gather(*(one(i, n, d) for i, (n, d) in enumerate(files)))
        except RequestError as exc:
            self._audit(request_id, exc.status, None, None)
            return exc.response(request_id)
        return JSONResponse({"request_id": request_id, "results": results}, headers={"X-Request-Id": request_id})

    @fastapi_app.get(f"/{API_VERSION}/models", summary="The bundle being served, and what each stage runs",
                     responses={401: ERROR_RESPONSES[401], 500: ERROR_RESPONSES[500]})
    async def models_route(self, request: Request):
        try:
            self._check_key(request)
        except RequestError as exc:
            return exc.response(request_id_of(request))
        stages = {}
        for name, handle in (("lung", self.stage1), ("disease", self.stage2)):
            try:  # what one replica of each stage runs (bundles loaded, torch or ONNX Runtime)
                stages[name] = await asyncio.wait_for(handle.info.remote(), timeout=5)
            except Exception:  # noqa: BLE001
                stages[name] = None
        return {**self.models, "stages": stages}

    @fastapi_app.get("/healthz", include_in_schema=False)
    async def healthz(self):
        return {"status": "ok"}

    @fastapi_app.get("/readyz", include_in_schema=False)
    async def readyz(self):
        try:
            await asyncio.wait_for(asyncio.gather(self.stage1.info.remote(), self.stage2.info.remote()), timeout=5)
        except Exception:  # noqa: BLE001
            return JSONResponse({"status": "not ready"}, status_code=503)
        return {"status": "ready"}

    @fastapi_app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def viewer_page(self):
        return self.viewer


def build_app(args: ServeSettings):
    """The application builder that ``serve run`` / ``serve deploy`` import (``import_path:
    cxrtune.serving.app:build_app``): one typed argument, the config's ``args``."""
    return application(args)


def application(settings: ServeSettings | dict, deployments: dict[str, dict] | None = None):
    """The scorer app. ``deployments`` (name -> options) applies a config's per-deployment
    settings when the app is run in-process (``cxrtune serve``, tests); ``serve run CONFIG``
    applies them itself."""
    try:
        settings = settings if isinstance(settings, ServeSettings) else ServeSettings(**(settings or {}))
    except ValidationError as exc:
        raise CxrtuneError(f"bad Serve args: {exc}") from None

    meta = read_bundle_meta(settings.bundle)  # fail here, plainly, rather than in three replicas
    if settings.runtime in ("onnx", "onnx-int8"):
        if settings.device and settings.device != "cpu":
            raise CxrtuneError(f"runtime {settings.runtime} runs on the CPU; use torch or auto with device {settings.device}")
        if not meta.onnx or (settings.runtime == "onnx-int8" and not meta.onnx.get("int8")):
            what = "an int8 export (`cxrtune bundle export onnx-int8`)" if meta.onnx else "an ONNX export"
            raise CxrtuneError(f"runtime {settings.runtime}: the bundle {settings.bundle} has no {what}")
    plain = settings.model_dump()
    opts = {k: {o: v for o, v in d.items() if o != "name"} for k, d in (deployments or {}).items()}
    stage1 = Stage1.options(**opts.get("Stage1", {})).bind(plain)
    stage2 = Stage2.options(**opts.get("Stage2", {})).bind(plain)
    return Ingress.options(**opts.get("Ingress", {})).bind(stage1, stage2, plain)


def default_config() -> str:
    """The shipped Serve config for this machine: serve/config.yaml with a GPU, else serve/config.cpu.yaml."""
    return str(shipped("serve", "config.yaml" if torch.cuda.is_available() else "config.cpu.yaml"))


def read_serve_config(path: str) -> tuple[dict, dict]:
    """A Serve config (YAML, local or S3) and its first application, or a plain error."""

    try:
        cfg = yaml.safe_load(storage.read_text(path)) or {}
        return cfg, cfg["applications"][0]
    except (yaml.YAMLError, KeyError, IndexError, TypeError):
        raise CxrtuneError(f"{path}: not a Serve config with an applications list") from None


def load_config(path: str, bundle: str | None = None) -> tuple[dict, dict, dict]:
    """(http_options, args, deployment options) of the first application in a Serve config."""
    cfg, app = read_serve_config(path)
    args = dict(app.get("args") or {})
    if bundle:
        args["bundle"] = bundle
    deployments = {d["name"]: d for d in app.get("deployments") or []}
    return dict(cfg.get("http_options") or {}), args, deployments


def ray_auth_headers() -> dict:
    """The ``Authorization`` header for a Ray cluster with token authentication (the default for
    local clusters in Ray 2.60): from ``RAY_AUTH_TOKEN``, else ``RAY_AUTH_TOKEN_PATH``, else
    ``~/.ray/auth_token``. Ray's own clients send it only when ``RAY_AUTH_MODE=token`` is set in
    their environment (so ``serve status`` needs that exported); cxrtune sends it whenever a token
    exists."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        with contextlib.suppress(OSError):
            token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def deploy_config(config: str, bundle: str | None = None, address: str | None = None,
                  wait_s: float = 300.0) -> dict:
    """Deploy (or update) the scorer on a running Ray cluster from a Serve config, as ``serve
    deploy CONFIG`` does (the dashboard's REST API), with ``bundle`` replacing the config's.

    A changed bundle is a rolling update with no downtime: Serve starts replicas with the new
    bundle and retires the old ones once the new are healthy; each old ingress replica finishes
    its requests on its own bundle (see :class:`_Stage`). Waits until the application is
    RUNNING and returns Serve's status of it."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
    from ray.serve.schema import ServeDeploySchema


    cfg, app = read_serve_config(config)
    args = app.setdefault("args", {})
    if bundle:
        args["bundle"] = bundle
    if args.get("bundle") and not storage.is_s3(args["bundle"]):
        args["bundle"] = str(Path(args["bundle"]).expanduser().resolve())  # replicas run elsewhere
    try:
        ServeSettings(**args)
        ServeDeploySchema.model_validate(cfg)
    except ValidationError as exc:
        raise CxrtuneError(f"{config}: {exc}") from None
    read_bundle_meta(args["bundle"])  # a bad bundle fails here, not in the replicas
    digest = bundle_hash(args["bundle"])
    address = address or os.environ.get("RAY_DASHBOARD_ADDRESS", "http://127.0.0.1:8265")
    try:
        client = ServeSubmissionClient(address, headers=ray_auth_headers())
        client.deploy_applications(cfg)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise CxrtuneError(f"cannot deploy through the Ray dashboard at {address}: {exc}") from None
    name = app.get("name", "default")
    deadline = time.monotonic() + wait_s
    time.sleep(2.0)  # the controller applies a config on its next loop
    while True:
        status = (client.get_serve_details().get("applications") or {}).get(name) or {}
        state = status.get("status")
        deployed = ((status.get("deployed_app_config") or {}).get("args") or {}).get("bundle")
        healthy = all(d.get("status") == "HEALTHY" for d in (status.get("deployments") or {}).values())
        if state == "RUNNING" and healthy and deployed == args["bundle"]:
            return {"application": name, "status": state, "bundle": deployed, "bundle_hash": digest}
        if state == "DEPLOY_FAILED":
            raise CxrtuneError(f"Serve could not deploy {name!r}: {status.get('message', '')[-2000:]}")
        if time.monotonic() > deadline:
            raise CxrtuneError(f"{name!r} is {state} after {wait_s:.0f} s; see `serve status`")
        time.sleep(1.0)


def run_local(bundle: str, config: str, host: str | None = None, port: int | None = None,
              blocking: bool = True):
    """Start Ray (if needed) and Serve, and deploy the scorer (``cxrtune serve``)."""
    http, args, deployments = load_config(config, bundle)
    if host:
        http["host"] = host
    if port:
        http["port"] = port
    app = application(args, deployments)
    init_ray(dashboard=True)  # so that `serve status` (and `serve deploy` of an update) answer
    for name, d in deployments.items():
        need = d.get("ray_actor_options") or {}
        check_fits(f"a {name} replica", need.get("num_cpus", 0), need.get("num_gpus", 0),
                   "Use a config that fits this machine (serve/config.cpu.yaml without a GPU), "
                   f"or deploy on a cluster; {config} sets it.")
    serve.start(http_options={k: v for k, v in http.items() if k in ("host", "port", "request_timeout_s")})
    handle = serve.run(app, name="cxrtune", route_prefix="/", blocking=False)
    if blocking:
        print(f"cxrtune scorer at http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}/ "
              "(viewer), /docs (API); Ctrl-C stops", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return handle
