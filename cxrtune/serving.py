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

``build_app(args)`` is the application builder that ``serve run`` / ``serve deploy`` import
(``serve/config.yaml``); ``cxrtune serve --bundle URI`` runs it locally.
"""


import asyncio
import base64
import hmac
import logging
import os
import time
import uuid
from pathlib import Path

import cv2
import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve.handle import DeploymentHandle

from . import __version__
from .cluster import check_fits, init_ray
from .errors import CxrtuneError, ImageDecodeError, ImageTooLargeError, UnsupportedFormatError
from .preprocessing import WORK_SIZE

log = logging.getLogger("cxrtune.serve")
API_VERSION = "v1"


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


# ------------------------------------------------------------------------------------ the stages

class _Stage:
    """Shared by both stages: the bundle's model for one stage, loaded once per replica."""

    stage = ""

    def __init__(self, settings: dict):
        from .scorer import load_bundle

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
        return await asyncio.to_thread(self.scorer.lung_masks, [im.astype(np.float32) for im in images])


@serve.deployment(name="Stage2", max_ongoing_requests=64)
class Stage2(_Stage):
    """Opacity segmentation + classification on the lung ROI: (image, lung) -> (mask, p)."""

    stage = "disease"

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def run(self, items: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, float]]:
        imgs = [im.astype(np.float32) for im, _ in items]
        lungs = [lung for _, lung in items]
        return await asyncio.to_thread(self.scorer.opacity_masks, imgs, lungs)


# ----------------------------------------------------------------------------------- the ingress

fastapi_app = FastAPI(
    title="cxrtune scorer", version=__version__,
    description="Two-stage chest X-ray severity scoring: lung zones A-F, a 0-6 score, opacity percent.",
)


class RequestError(Exception):
    def __init__(self, status: int, detail: str):
        self.status, self.detail = status, detail

    def response(self, request_id: str) -> JSONResponse:
        return JSONResponse({"error": self.detail, "request_id": request_id}, status_code=self.status,
                            headers={"Retry-After": "1"} if self.status == 503 else None)


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

    # ----------------------------------------------------------------------------- plumbing
    def _check_key(self, request: Request) -> None:
        if self.api_key and not hmac.compare_digest(request.headers.get("x-api-key", ""), self.api_key):
            raise HTTPException(status_code=401, detail="missing or wrong X-API-Key")

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

    async def _score(self, data: bytes, overlay: bool, request_id: str) -> tuple[dict, bytes | None]:
        from .scorer import has_lungs

        t0 = time.perf_counter()
        scan = await asyncio.to_thread(_decode, data, self.s)
        image = scan.image
        t1 = time.perf_counter()
        opacity = p = None
        try:
            lung = await self.stage1.run.remote(image)
            if has_lungs(lung):  # no lungs: an unscored record (HTTP 200), Stage II is not asked
                opacity, p = await self.stage2.run.remote((image, lung))
        except Exception as exc:  # noqa: BLE001 - Serve's queue-full and unavailable errors
            name = type(exc).__name__
            if "BackPressure" in name or "Unavailable" in name:
                raise RequestError(503, "the scorer is at capacity; retry shortly") from None
            raise
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
        record["timings_ms"] = {"decode": round(1000 * (t1 - t0), 1), "models": round(1000 * (t2 - t1), 1),
                                "post": round(1000 * (t3 - t2), 1), "total": round(1000 * (t3 - t0), 1)}
        return record, png

    # ----------------------------------------------------------------------------- routes
    @fastapi_app.post(f"/{API_VERSION}/score", summary="Score one radiograph (multipart `file` or raw body)")
    async def score(self, request: Request, overlay: bool = False):
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        try:
            self._check_key(request)
            name, data = (await self._body(request))[0]
            record, png = await self._score(data, overlay, request_id)
        except RequestError as exc:
            log.info("request %s -> %d", request_id, exc.status)
            return exc.response(request_id)
        log.info("request %s scored in %.0f ms", request_id, record["timings_ms"]["total"])
        if png is not None and "image/png" in request.headers.get("accept", ""):
            headers = {"X-Request-Id": request_id, "X-Status": record["status"]}
            if record["score"] is not None:
                headers["X-Score"] = str(record["score"])
            return Response(png, media_type="image/png", headers=headers)
        if png is not None:
            record["overlay_png_base64"] = base64.b64encode(png).decode("ascii")
        return JSONResponse(record, headers={"X-Request-Id": request_id})

    @fastapi_app.post(f"/{API_VERSION}/score/batch", summary="Score several files (multipart `files`)")
    async def score_batch(self, request: Request, overlay: bool = False):
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        try:
            self._check_key(request)
            files = await self._body(request)
        except RequestError as exc:
            return exc.response(request_id)

        async def one(i: int, name: str, data: bytes) -> dict:
            try:
                record, png = await self._score(data, overlay, f"{request_id}-{i}")
                if png is not None:
                    record["overlay_png_base64"] = base64.b64encode(png).decode("ascii")
                return {"file": name, "http_status": 200, **record}
            except RequestError as exc:
                return {"file": name, "http_status": exc.status, "status": "error", "error": exc.detail,
                        "request_id": f"{request_id}-{i}"}

        results = await asyncio.gather(*(one(i, n, d) for i, (n, d) in enumerate(files)))
        return JSONResponse({"request_id": request_id, "results": results})

    @fastapi_app.get(f"/{API_VERSION}/models", summary="The bundle being served")
    async def models_route(self, request: Request):
        self._check_key(request)
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
    init_ray()
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
