"""The ingress deployment: the scoring policy split at the stage boundaries, over HTTP.

It decodes uploads and resizes them in worker threads (never on the event loop), calls the stages
through DeploymentHandles, computes zones and the record, renders the overlay, and turns every
kind of bad input into a clear 4xx: 413 (bytes, pixels), 415 (not PNG, JPEG or DICOM), 422
(undecodable, truncated, blank, tiny, non-frontal or non-image DICOM); a readable image with no
lungs found is a 200 with ``status: unscored``, like the CLI; 503 with Retry-After when the queue
is full. DICOM tags are never logged or echoed. An optional API key (``X-API-Key``) comes from an
environment variable.

Two budgets (:mod:`.budgets`): an upload is read as it arrives, in memory only, within caps on the
body, each part, the field count, the bytes all uploads hold, and a minimum rate (408 when it falls
behind); then at most ``max_in_flight`` images are scored at once per replica, and beyond that the
client gets cxrtune's JSON 503 with ``Retry-After`` at once (Serve's own ``max_queued_requests``
stays as the outer guard). An audit trail without patient data: one JSON
log line per request (logger ``ray.serve.cxrtune.audit``): request id, bundle hash, the SHA-256 of
the input bytes, HTTP code, record status, score, timings. No name, path or DICOM tag.
"""


# No `from __future__ import annotations` here: Serve pickles the ingress class by value, and FastAPI
# must find the routes' annotations (Request) as objects, not as names (tests/test_serve_api.py).
import asyncio
import base64
import hashlib
import json
import logging
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve import metrics
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle
from starlette.requests import ClientDisconnect

from .. import __version__
from ..dicom import Limits, drop_warnings
from ..errors import (
    DECODE_FAILURE,
    REPLICA_FAILED,
    CxrtuneError,
    ImageDecodeError,
    ImageTooLargeError,
    InputRefused,
    UnsupportedFormatError,
)
from ..images import sniff_format
from ..model.artifacts import Thresholds, bundle_hash, read_bundle_meta
from ..pacs.results import DICOM_RESULTS, dicom_results, multipart_related, to_bytes
from ..preprocessing import Preprocessing, load_scan
from ..scoring.overlay import encode_overlay
from ..scoring.scorer import (
    build_record,
    bundle_models,
    disease_input,
    load_plausibility,
    lung_output,
    opacity_output,
    record_models,
    stage_input,
    unscored_reason,
)
from .api import (
    BATCH_BODY,
    ERROR_RESPONSES,
    OVERLAY,
    REFUSALS,
    UPLOAD_BODY,
    BatchResult,
    RequestError,
    ScoreRecord,
    install_error_handlers,
    request_id_of,
    wants_dicom,
)
from .auth import FailedAttempts, key_text, require_keys, security_headers, without_locations
from .budgets import ReturnFreedHeap, ScoringBudget, Ticket, UploadBudget, UploadLimits, paced, read_upload
from .settings import ServeSettings, check_pinned
from .stages import DiseaseStage, LungStage, Stage

log = logging.getLogger("ray.serve.cxrtune")  # under ray.serve: lands in the replica's Serve log
audit = logging.getLogger("ray.serve.cxrtune.audit")  # Serve's replica log handlers carry it to the logs
audit.setLevel(logging.INFO)
API_VERSION = "v1"
STAGE_RETRIES = 8  # a dead replica's requests are retried with backoff (0.25 s doubling, 5 s at most: ~25 s in all)
MS_BUCKETS = [5.0, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]


def _ask(stage: "DeploymentHandle | Stage", method: str, *args):
    """A stage's method: through its deployment's handle, or called directly when the stage runs
    in this replica (``stages_in_ingress``). Returns an awaitable either way."""
    fn = getattr(stage, method)
    return fn(*args) if isinstance(stage, Stage) else fn.remote(*args)


def _decode(data: bytes, s: ServeSettings):
    """Bytes -> a checked Scan at the working size (the scoring policy's first step), with the
    errors mapped to HTTP codes. Runs in a thread."""
    try:
        return load_scan(data, Limits(max_bytes=s.max_upload_bytes, max_pixels=s.max_pixels,
                                      max_decoded_bytes=s.max_decoded_bytes), s.work_size)
    except UnsupportedFormatError as exc:
        raise _unsupported(exc) from None
    except ImageTooLargeError as exc:
        raise RequestError(413, str(exc)) from None
    except InputRefused as exc:
        raise RequestError(422, str(exc)) from None
    except ImageDecodeError as exc:
        raise RequestError(422, f"{DECODE_FAILURE}: {exc}") from None


def _unsupported(exc: UnsupportedFormatError) -> RequestError:
    return RequestError(415, f"{exc}; send PNG (8/16-bit), JPEG or DICOM")


def _format_of(data: bytes) -> str:
    """:func:`sniff_format`, bytes of no format it knows being the client's 415 (as in :func:`_decode`)."""
    try:
        return sniff_format(data)
    except UnsupportedFormatError as exc:
        raise _unsupported(exc) from None


class SecureHeaders:
    """ASGI middleware: the security headers on every response, and ``Cache-Control: no-store`` on
    ``/v1`` (results and model details stay out of caches). Plain ASGI rather than Starlette's
    ``BaseHTTPMiddleware``, which runs each request in a task group with its own streams."""

    def __init__(self, app, headers: dict[str, str]):
        self.app = app
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        extra = self.headers + ([(b"cache-control", b"no-store")] if scope["path"].startswith(f"/{API_VERSION}/") else [])
        names = {name for name, _ in extra}

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [h for h in message.get("headers", []) if h[0].lower() not in names] + extra}
            await send(message)

        await self.app(scope, receive, send_with_headers)


@serve.deployment(name="Ingress", max_ongoing_requests=1024)  # > max_in_flight: cxrtune answers overload itself
@serve.ingress()  # the app is built per replica: __serve_build_asgi_app__
class Ingress:
    def __init__(self, stage1: DeploymentHandle | None, stage2: DeploymentHandle | None, settings: dict):
        self.s = ServeSettings(**settings)
        self.keys = require_keys(self.s, key_text(self.s))  # before anything else
        drop_warnings()  # this replica parses uploads: library warnings would quote their values
        self.stage1: DeploymentHandle | Stage
        self.stage2: DeploymentHandle | Stage
        if self.s.stages_in_ingress:  # both networks in this process: no Serve call between the stages
            self.stage1, self.stage2 = LungStage(settings), DiseaseStage(settings)
        elif stage1 is None or stage2 is None:
            raise CxrtuneError("the ingress needs both stage deployments, or stages_in_ingress")
        else:
            self.stage1, self.stage2 = stage1, stage2
        meta = read_bundle_meta(self.s.bundle)
        self.thresholds = Thresholds.of(meta)
        self.pre = {stage: Preprocessing.from_dict(meta.stage(stage).preprocessing) for stage in ("lung", "disease")}
        self.bundle_hash = bundle_hash(self.s.bundle)  # every stage call names it
        check_pinned(self.s, self.bundle_hash)
        self.record_models = bundle_models(meta, self.bundle_hash)  # what each record names
        self.plausibility = load_plausibility(self.s.bundle, meta)  # before Stage II: is it a frontal CXR?
        self.models = {  # GET /v1/models: that, plus how the bundle was calibrated
            **self.record_models, "zone_threshold": self.thresholds.zone,
            "zone_calibration": asdict(self.thresholds.zone_calibration) if self.thresholds.zone_calibration else None,
            "cls_calibration": asdict(self.thresholds.cls_calibration) if self.thresholds.cls_calibration else None,
            "opacity_threshold": self.thresholds.opacity,
            "opacity_calibration": asdict(self.thresholds.opacity_calibration) if self.thresholds.opacity_calibration else None,
            "plausibility": self.plausibility.summary(),
            "model_card": meta.model_card, "audits": meta.audits, "versions": meta.versions,
            "stage_audits": {stage: meta.stage(stage).audits for stage in ("lung", "disease")},  # the runs' own
        }
        self.models = without_locations(self.models)  # a client sees no training-run URI or data path
        self.failed_attempts = FailedAttempts()
        self.viewer = (Path(__file__).parent / "viewer.html").read_text()
        # one event loop per replica: the budgets' plain counters are exact
        self.upload_limits = UploadLimits.of(self.s)
        self.single_upload = replace(self.upload_limits, max_files=1)  # /v1/score scores one file: takes one
        self.uploads = UploadBudget(self.s.upload_budget_bytes)
        self.scoring = ScoringBudget(self.s.max_in_flight, self.s.retry_after_s)
        self.m_requests = metrics.Counter("cxrtune_requests", description="scoring requests by HTTP code and "
                                          "outcome (record status, or the refusal reason)",
                                          tag_keys=("code", "outcome"))  # type: ignore[arg-type]  # Ray's stub says one key
        self.m_retries = metrics.Counter("cxrtune_stage_retries", description="stage calls retried after the "
                                         "replica that had them failed", tag_keys=("stage",))
        self.m_ms = metrics.Histogram("cxrtune_step_ms", description="milliseconds per request in each step",
                                      boundaries=MS_BUCKETS, tag_keys=("step",))

    def _audit(self, request_id: str, code: int, data: bytes | None, record: dict | None,
               key_id: str | None = None) -> None:
        """One JSON line per request, without patient data (no name, path or DICOM tag), and the
        request and step-time metrics."""
        self.m_requests.inc(tags={"code": str(code), "outcome": (record or {}).get("status") or REFUSALS.get(code, "error")})
        for step, ms in ((record or {}).get("timings_ms") or {}).items():
            if step not in ("total", "models"):  # decode, stage1, stage2, post
                self.m_ms.observe(ms, tags={"step": step})
        audit.info("%s", json.dumps({
            "event": "score", "request_id": request_id, "key_id": key_id,
            "bundle_hash": self.record_models.get("bundle_hash"),
            "input_sha256": hashlib.sha256(data).hexdigest() if data else None, "http_status": code,
            "status": (record or {}).get("status", "error"), "score": (record or {}).get("score"),
            "timings_ms": (record or {}).get("timings_ms")}))

    # ----------------------------------------------------------------------------- plumbing
    def _check_key(self, request: Request) -> str | None:
        """The id of the key the request presents (None when the API runs without keys); a
        missing or wrong key is a 401, logged without key material; a client past the failed-attempt
        limit gets 429 until its failures age out."""
        if not self.keys:
            return None
        client = request.client.host if request.client else "unknown"
        wait = self.failed_attempts.blocked_for(client)
        if wait:
            raise RequestError(429, "too many failed key checks; retry later", retry_after=int(wait) + 1)
        key_id = self.keys.match(request.headers.get("x-api-key"))
        if key_id is None:
            failures = self.failed_attempts.failed(client)
            log.warning("refused a request without a valid X-API-Key from %s (%d in the last %.0f s)",
                        client, failures, self.failed_attempts.window_s)
            raise RequestError(401, "missing or wrong X-API-Key")
        return key_id

    async def _body(self, request: Request, add, limits: UploadLimits) -> list[tuple[str, bytes]]:
        """(name, bytes) of each uploaded file (multipart parts with a filename, or a raw body),
        read as it arrives within the upload budget (:mod:`.budgets`)."""
        try:
            return await read_upload(request.headers.get("content-type", ""), request.headers.get("content-length"),
                                     paced(request.stream(), limits), limits, add)
        except ClientDisconnect:
            raise RequestError(400, "the client disconnected during the upload") from None

    async def _call(self, stage: DeploymentHandle | Stage, item):
        """One stage call, retried when the replica that had it dies (a node lost, a replica
        killed): Serve sends the retry to a live or restarted replica, so no request is lost. A
        stage in this replica is called once: if it fails, so does the request."""
        if isinstance(stage, Stage):
            return await stage.run(item)
        died = 0
        for attempt in range(STAGE_RETRIES + 1):
            try:
                return await stage.run.remote(item)
            except (RayActorError, ActorUnavailableError, ReplicaUnavailableError) as exc:
                # a replica that died under this request is retried once only: an input that kills
                # replicas (out of memory, a crash) must not take down one after another
                died += isinstance(exc, RayActorError) and not isinstance(exc, ActorUnavailableError)
                if attempt == STAGE_RETRIES or died > 1:
                    raise RequestError(503, f"{REPLICA_FAILED}; retry shortly", self.s.retry_after_s) from None
                log.warning("a %s replica failed; retrying (attempt %d)", stage.deployment_name, attempt + 2)
                self.m_retries.inc(tags={"stage": stage.deployment_name})
                await asyncio.sleep(min(5.0, 0.25 * 2 ** attempt))

    async def _stage(self, stage: DeploymentHandle | Stage, x: np.ndarray):
        """One stage call for this ingress's bundle: ``(bundle hash that answered, runtime, output)``."""
        digest, runtime, out = await self._call(stage, (self.s.bundle, self.bundle_hash, x))
        if not digest:  # the replica could not load this bundle (its log says why): another may
            raise RequestError(503, "a scoring replica cannot load the deployed bundle; retry shortly",
                               self.s.retry_after_s)
        if digest != self.bundle_hash:  # cannot happen: the stage serves the bundle it is asked for
            raise RequestError(500, "a stage answered for another bundle")
        return digest, runtime, out

    async def _score(self, data: bytes, overlay: bool, request_id: str, ticket: Ticket,
                     dicom: bool = False) -> tuple[dict, bytes | None, list[bytes]]:
        """The scoring policy split at the stage boundaries: the ingress prepares each stage's lean
        input and turns its output into masks with the library's own functions.

        Returns:
            The record, the overlay PNG (when ``overlay``) and the DICOM results, SR then SEG
            (when ``dicom``: the input is DICOM, checked by the caller), then the overlay as a
            Secondary Capture (when ``overlay`` too) instead of the PNG."""

        # three thread hand-offs per image, around the two stage calls (each hand-off costs the
        # event loop a wake-up); the threads stamp their own step boundaries, so a thread's wait
        # for the pool counts toward the step before it
        def prepare():  # decode, then Stage I's lean input
            scan = _decode(data, self.s)
            return scan, time.perf_counter(), stage_input(scan.image, self.pre["lung"])

        def after_lungs(image, prob):  # the lung mask, the plausibility check, then Stage II's lean input
            lung = lung_output(prob, image.shape, self.thresholds.lung)
            t_mid = time.perf_counter()
            reason = unscored_reason(image, lung, self.plausibility)
            x2, box = disease_input(image, lung, self.pre["disease"]) if reason is None else (None, None)
            return lung, t_mid, reason, x2, box

        def finish(scan, lung, reason, stages, runtimes, disease_out, box):
            # Stage II's masks, then the record, overlay and DICOM results
            image, opacity, p = scan.image, None, None
            if disease_out is not None:
                prob2, p = disease_out
                opacity, p = opacity_output(prob2, p, box, image.shape, self.thresholds.cls, self.thresholds.opacity)
            t2 = time.perf_counter()
            # the bundle behind each stage's answer, and what ran it (int8 answers differ slightly)
            models = record_models(self.record_models, stages, runtimes)
            typed, detail = build_record(lung, opacity, p, self.thresholds.zone, models, scan, reason)
            record = typed.to_dict()
            png = encode_overlay(image, detail.lungs, detail.opacity, record) if overlay and not dicom else None
            try:
                parts = [to_bytes(o) for o in dicom_results(data, record, detail, image if overlay else None).objects()] \
                    if dicom else []
            except CxrtuneError as exc:  # a header the results cannot reference (says which attribute, no value)
                raise RequestError(422, str(exc)) from None
            return t2, record, png, parts

        t0 = time.perf_counter()
        scan, t1, x1 = await ticket.run(prepare)
        stages: dict[str, str | None] = {"lung": None, "disease": None}
        runtimes: dict[str, str | None] = {"lung": None, "disease": None}
        disease_out = None
        try:
            stages["lung"], runtimes["lung"], prob = await self._stage(self.stage1, x1)
            lung, t_mid, reason, x2, box = await ticket.run(after_lungs, scan.image, prob)
            if reason is None:  # scorable: ask Stage II (otherwise an unscored record, HTTP 200: no lungs, or not a frontal CXR)
                stages["disease"], runtimes["disease"], disease_out = await self._stage(self.stage2, x2)
        except (BackPressureError, DeploymentUnavailableError):
            raise RequestError(503, "the scorer is at capacity; retry shortly", self.s.retry_after_s) from None
        t2, record, png, parts = await ticket.run(finish, scan, lung, reason, stages, runtimes, disease_out, box)
        t3 = time.perf_counter()
        record["request_id"] = request_id
        record["timings_ms"] = {"decode": round(1000 * (t1 - t0), 1), "stage1": round(1000 * (t_mid - t1), 1),
                                "stage2": round(1000 * (t2 - t_mid), 1), "models": round(1000 * (t2 - t1), 1),
                                "post": round(1000 * (t3 - t2), 1), "total": round(1000 * (t3 - t0), 1)}
        return record, png, parts

    # ----------------------------------------------------------------------------- routes
    async def score(self, request: Request, overlay: bool = OVERLAY):
        request_id = request_id_of(request)
        data, key_id = None, None
        try:
            key_id = self._check_key(request)
            dicom = wants_dicom(request.headers.get("accept", ""))
            with self.uploads.hold() as add:  # the upload budget, then the scoring budget
                name, data = (await self._body(request, add, self.single_upload))[0]
                if dicom and _format_of(data) != "dicom":
                    raise RequestError(406, "DICOM results (Accept: multipart/related; type=\"application/dicom\") "
                                            "need a DICOM input: they are written into the source's study")
                with self.scoring.admitted() as ticket:
                    record, png, parts = await self._score(data, overlay, request_id, ticket, dicom)
        except RequestError as exc:
            self._audit(request_id, exc.status, data, None, key_id)
            return exc.response(request_id)
        self._audit(request_id, 200, data, record, key_id)
        headers = {"X-Request-Id": request_id, "X-Status": record["status"]}
        if record["score"] is not None:
            headers["X-Score"] = str(record["score"])
        if dicom:  # the SR, then the SEG of a scored or partial record: to this caller only, never stored
            boundary = uuid.uuid4().hex
            return Response(multipart_related(parts, boundary), headers=headers,
                            media_type=f'{DICOM_RESULTS}; boundary="{boundary}"')
        if png is not None and "image/png" in request.headers.get("accept", ""):
            return Response(png, media_type="image/png", headers=headers)
        if png is not None:
            record["overlay_png_base64"] = base64.b64encode(png).decode("ascii")
        return JSONResponse(record, headers={"X-Request-Id": request_id})

    async def _score_file(self, rid: str, name: str, data: bytes, overlay: bool, ticket: Ticket,
                          key_id: str | None) -> dict:
        """One file of a batch: its record, or its own error (one bad file never fails the others)."""
        try:
            record, png, _ = await self._score(data, overlay, rid, ticket)
        except Exception as exc:
            err = exc if isinstance(exc, RequestError) else RequestError(500, "internal error")
            if not isinstance(exc, RequestError):
                log.exception("request %s failed", rid)
            self._audit(rid, err.status, data, None, key_id)
            return {"file": name, "http_status": err.status, "status": "error", "error": err.detail, "request_id": rid}
        self._audit(rid, 200, data, record, key_id)
        if png is not None:
            record["overlay_png_base64"] = base64.b64encode(png).decode("ascii")
        return {"file": name, "http_status": 200, **record}

    async def score_batch(self, request: Request, overlay: bool = OVERLAY):
        request_id = request_id_of(request)
        key_id = None
        try:
            key_id = self._check_key(request)
            with self.uploads.hold() as add:  # the upload budget, then the scoring budget
                files = await self._body(request, add, self.upload_limits)
                if len(files) > self.s.max_in_flight:  # could never be admitted: not a retry
                    raise RequestError(413, f"{len(files)} files; this scorer takes at most {self.s.max_in_flight} at once")
                with self.scoring.admitted(len(files)) as ticket:
                    results = await asyncio.gather(*(self._score_file(f"{request_id}-{i}", name, data, overlay,
                                                                      ticket, key_id)
                                                     for i, (name, data) in enumerate(files)))
        except RequestError as exc:
            self._audit(request_id, exc.status, None, None, key_id)
            return exc.response(request_id)
        return JSONResponse({"request_id": request_id, "results": results}, headers={"X-Request-Id": request_id})

    async def models_route(self, request: Request):
        try:
            self._check_key(request)
        except RequestError as exc:
            return exc.response(request_id_of(request))
        stages = {}
        for name, stage in (("lung", self.stage1), ("disease", self.stage2)):
            try:  # what one replica of each stage runs (bundles loaded, torch or ONNX Runtime)
                stages[name] = await asyncio.wait_for(_ask(stage, "info"), timeout=5)
            except Exception:  # noqa: BLE001
                stages[name] = None
        return {**self.models, "stages": stages}

    async def healthz(self):
        if self.s.auth == "none":
            return {"status": "ok", "warning": "authentication is off (auth: none): every /v1 route is open"}
        return {"status": "ok"}

    async def readyz(self):
        try:
            item = (self.s.bundle, self.bundle_hash)
            serving = await asyncio.wait_for(asyncio.gather(_ask(self.stage1, "ready", *item),
                                                            _ask(self.stage2, "ready", *item)), timeout=5)
        except Exception:  # noqa: BLE001
            return JSONResponse({"status": "not ready"}, status_code=503)
        if not all(serving):  # a stage cannot load the bundle this ingress names
            return JSONResponse({"status": "not ready", "reason": "a stage cannot load the deployed bundle"},
                                status_code=503)
        return {"status": "ready"}

    async def viewer_page(self):
        return self.viewer

    def __serve_build_asgi_app__(self) -> FastAPI:
        """This replica's FastAPI app: the routes are this ingress's methods, and the errors raised
        outside them are counted and audited by it (no module global)."""
        # no /docs or /redoc: FastAPI's pages load their scripts from a CDN (openapi.json stays)
        app = FastAPI(title="cxrtune scorer", version=__version__, docs_url=None, redoc_url=None,
                      description="Two-stage chest X-ray severity scoring: lung zones A-F, a 0-6 score, opacity percent.")
        app.add_middleware(SecureHeaders, headers=security_headers(self.viewer))
        app.add_middleware(ReturnFreedHeap)  # after an oversized body: glibc's freed heap back to the system

        png_or_record: dict[int | str, dict[str, Any]] = {
            200: {"content": {"image/png": {}, DICOM_RESULTS: {}},
                  "description": "the record; the overlay PNG with Accept: image/png and ?overlay=true; or, for a "
                                 f"DICOM input with Accept: {DICOM_RESULTS}, the DICOM results: a Comprehensive 3D SR "
                                 "(TID 1500) and, for a scored or partial record, a SEG of the lungs and the opacity "
                                 "(and with ?overlay=true the overlay as a Secondary Capture marked not for diagnostic "
                                 "use), in new series of the source's study (docs/pacs.md)"}}
        app.post(f"/{API_VERSION}/score", summary="Score one radiograph (multipart `file` or raw body)",
                 response_model=ScoreRecord, openapi_extra=UPLOAD_BODY,
                 responses={**ERROR_RESPONSES, **png_or_record})(self.score)
        app.post(f"/{API_VERSION}/score/batch", summary="Score several files (multipart `files`)",
                 response_model=BatchResult, openapi_extra=BATCH_BODY,
                 responses={k: v for k, v in ERROR_RESPONSES.items() if k != 406})(self.score_batch)
        app.get(f"/{API_VERSION}/models", summary="The bundle being served, and what each stage runs",
                responses={401: ERROR_RESPONSES[401], 500: ERROR_RESPONSES[500]})(self.models_route)
        app.get("/healthz", include_in_schema=False)(self.healthz)
        app.get("/readyz", include_in_schema=False)(self.readyz)
        app.get("/", response_class=HTMLResponse, include_in_schema=False)(self.viewer_page)
        install_error_handlers(app, self._refused)
        return app

    def _refused(self, code: int, request_id: str) -> None:
        self._audit(request_id, code, None, None)
