"""The Ray Serve application: a FastAPI ingress composing a Stage I and a Stage II deployment.

* ``Stage1`` and ``Stage2`` load their model from the bundle once per replica and answer through
  ``@serve.batch`` (batch size and wait configurable), with bf16 autocast and channels_last on GPU
  and fractional GPUs per replica.
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
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from . import __version__
from .cluster import check_fits, init_ray
from .errors import CxrtuneError, ImageDecodeError, ImageTooLargeError, UnsupportedFormatError
from .preprocessing import WORK_SIZE

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
    max_files_per_batch: int = 16
    max_in_flight: int = 256  # images one ingress replica scores at once (a batch counts each file); more: 503
    retry_after_s: int = 1


# ------------------------------------------------------------------------------------ the stages

BATCH_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
MS_BUCKETS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]


class _Stage:
    """Shared by both stages: the bundle's model for one stage, loaded once per replica."""

    stage = ""

    def __init__(self, settings: dict):
        from ray.serve import metrics

        from .scorer import load_bundle

        self.batch_sizes = metrics.Histogram("cxrtune_batch_size", description="images per batch a stage ran",
                                             boundaries=BATCH_BUCKETS, tag_keys=("stage",))
        self.batch_sizes.set_default_tags({"stage": self.stage})
        s = ServeSettings(**settings)
        self.scorer = load_bundle(s.bundle, device=s.device, batch_size=s.max_batch_size, stages=(self.stage,))
        if hasattr(self.run, "set_max_batch_size"):  # the config's batching, not the decorator's
            self.run.set_max_batch_size(s.max_batch_size)
        if hasattr(self.run, "set_batch_wait_timeout_s"):
            self.run.set_batch_wait_timeout_s(s.batch_wait_timeout_s)

    def info(self) -> dict:
        return self.scorer.models_info()


@serve.deployment(name="Stage1", max_ongoing_requests=64)
class Stage1(_Stage):
    """Lung segmentation: working image -> bool lung mask of the same size."""

    stage = "lung"

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def run(self, images: list[np.ndarray]) -> list[np.ndarray]:
        self.batch_sizes.observe(len(images))
        return await asyncio.to_thread(self.scorer.lung_masks, [im.astype(np.float32) for im in images])


@serve.deployment(name="Stage2", max_ongoing_requests=64)
class Stage2(_Stage):
    """Opacity segmentation + classification on the lung ROI: (image, lung) -> (mask, p)."""

    stage = "disease"

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def run(self, items: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, float]]:
        self.batch_sizes.observe(len(items))
        imgs = [im.astype(np.float32) for im, _ in items]
        lungs = [lung for _, lung in items]
        return await asyncio.to_thread(self.scorer.opacity_masks, imgs, lungs)


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
    models: dict
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


_ERRORS = {401: "missing or wrong X-API-Key", 413: "upload or image over the limits",
           415: "not PNG, JPEG or DICOM", 422: "unreadable, blank, tiny or refused by the DICOM rules",
           503: "at capacity: retry after Retry-After seconds"}
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


@fastapi_app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), request_id_of(request), getattr(exc, "headers", None))


@fastapi_app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug, not bad input: still the one error shape, and logged (without the request's data)."""
    request_id = request_id_of(request)
    log.error("request %s failed: %s", request_id, type(exc).__name__)
    audit.info("%s", json.dumps({"event": "score", "request_id": request_id, "http_status": 500, "status": "error"}))
    return error_response(500, "internal error", request_id)


@fastapi_app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = ["{}: {}".format(".".join(str(x) for x in e.get("loc", ())), e.get("msg", "")) for e in exc.errors()]
    return error_response(422, "invalid request: " + "; ".join(parts), request_id_of(request))


def _decode(data: bytes, s: ServeSettings):
    """Bytes -> a checked Scan at the working size (the scoring policy's first step), with the
    errors mapped to HTTP codes. Runs in a thread."""
    from .images import Limits
    from .preprocessing import InputRefused, load_scan

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


@serve.deployment(name="Ingress", max_ongoing_requests=128)
@serve.ingress(fastapi_app)
class Ingress:
    def __init__(self, stage1: DeploymentHandle, stage2: DeploymentHandle, settings: dict):
        from dataclasses import asdict

        from .artifacts import bundle_hash, read_bundle_meta
        from .scorer import bundle_models

        self.s = ServeSettings(**settings)
        self.stage1, self.stage2 = stage1, stage2
        meta = read_bundle_meta(self.s.bundle)
        self.zone_threshold = float(meta.zone_threshold)
        self.record_models = bundle_models(meta, bundle_hash(self.s.bundle))  # what each record names
        self.models = {  # GET /v1/models: that, plus how the bundle was calibrated
            **self.record_models, "zone_threshold": self.zone_threshold,
            "zone_calibration": asdict(meta.zone_calibration) if meta.zone_calibration else None,
            "cls_calibration": asdict(meta.cls_calibration) if meta.cls_calibration else None,
            "model_card": meta.model_card, "audits": meta.audits, "versions": meta.versions,
        }
        self.api_key = os.environ.get(self.s.api_key_env, "")
        self.viewer = (Path(__file__).parent / "viewer.html").read_text()
        self.in_flight = 0  # one event loop per replica: a plain counter is exact
        from ray.serve import metrics

        self.m_requests = metrics.Counter("cxrtune_requests", description="scoring requests by HTTP code and "
                                          "outcome (record status, or the refusal reason)", tag_keys=("code", "outcome"))
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
                await asyncio.sleep(min(5.0, 0.25 * 2 ** attempt))

    async def _score(self, data: bytes, overlay: bool, request_id: str) -> tuple[dict, bytes | None]:
        from .scorer import has_lungs

        t0 = time.perf_counter()
        scan = await asyncio.to_thread(_decode, data, self.s)
        image = scan.image
        t1 = time.perf_counter()
        opacity = p = None
        try:
            lung = await self._call(self.stage1, image)
            t_mid = time.perf_counter()
            if has_lungs(lung):  # no lungs: an unscored record (HTTP 200), Stage II is not asked
                opacity, p = await self._call(self.stage2, (image, lung))
        except (BackPressureError, DeploymentUnavailableError):
            raise RequestError(503, "the scorer is at capacity; retry shortly", self.s.retry_after_s) from None
        t2 = time.perf_counter()

        def finish():
            from .scorer import build_record

            record, detail = build_record(lung, opacity, p, self.zone_threshold, self.record_models, scan)
            png = None
            if overlay:
                from .overlay import encode_overlay

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

    @fastapi_app.get(f"/{API_VERSION}/models", summary="The bundle being served")
    async def models_route(self, request: Request):
        try:
            self._check_key(request)
        except RequestError as exc:
            return exc.response(request_id_of(request))
        return self.models

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
    cxrtune.serving:build_app``): one typed argument, the config's ``args``."""
    return application(args)


def application(settings: ServeSettings | dict, deployments: dict[str, dict] | None = None):
    """The scorer app. ``deployments`` (name -> options) applies a config's per-deployment
    settings when the app is run in-process (``cxrtune serve``, tests); ``serve run CONFIG``
    applies them itself."""
    from pydantic import ValidationError

    try:
        settings = settings if isinstance(settings, ServeSettings) else ServeSettings(**(settings or {}))
    except ValidationError as exc:
        raise CxrtuneError(f"bad Serve args: {exc}") from None
    from .artifacts import read_bundle_meta

    read_bundle_meta(settings.bundle)  # fail here, plainly, rather than in three replicas
    plain = settings.model_dump()
    opts = {k: {o: v for o, v in d.items() if o != "name"} for k, d in (deployments or {}).items()}
    stage1 = Stage1.options(**opts.get("Stage1", {})).bind(plain)
    stage2 = Stage2.options(**opts.get("Stage2", {})).bind(plain)
    return Ingress.options(**opts.get("Ingress", {})).bind(stage1, stage2, plain)


def load_config(path: str, bundle: str | None = None) -> tuple[dict, dict, dict]:
    """(http_options, args, deployment options) of the first application in a Serve config."""
    import yaml

    from . import storage

    try:
        cfg = yaml.safe_load(storage.read_text(path)) or {}
        app = cfg["applications"][0]
    except (yaml.YAMLError, KeyError, IndexError, TypeError):
        raise CxrtuneError(f"{path}: not a Serve config with an applications list") from None
    args = dict(app.get("args") or {})
    if bundle:
        args["bundle"] = bundle
    deployments = {d["name"]: d for d in app.get("deployments") or []}
    return dict(cfg.get("http_options") or {}), args, deployments


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
