"""The HTTP API's schemas and errors: the record as the API answers it, batch results, the one
error shape ``{"error", "request_id"}`` for every refusal, request ids, and the exception handlers
that give 400/404/405/422/500 that shape too. The OpenAPI document is built from these."""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any, Callable

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..scoring import record

log = logging.getLogger("ray.serve.cxrtune")  # under ray.serve: lands in the replica's Serve log


class ScoreRecord(record.ScoreRecord):
    """The record of one image as the API answers it (its OpenAPI name): the scoring policy's
    record (:class:`cxrtune.scoring.record.ScoreRecord`, what `cxrtune score` writes) with the
    request's id and step timings, and the overlay when asked for. An HTTP record always names its
    models and its input."""
    models: dict = Field(description=record.ScoreRecord.model_fields["models"].description)
    input: record.InputInfo
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
           406: "DICOM results asked for (Accept: multipart/related; type=\"application/dicom\") of an input that "
                "is not DICOM",
           413: "upload or image over the limits", 415: "not PNG, JPEG or DICOM",
           429: "too many failed key checks from this client: retry after Retry-After seconds",
           422: "unreadable, blank, tiny, a colour photograph or refused by the DICOM rules; or invalid query parameters",
           500: "internal error (the request id is in the server's log)",
           503: "at capacity (admission control or a full queue) or a replica failed: retry after Retry-After seconds"}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody, "description": text}
                                                    for code, text in _ERRORS.items()}
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
OVERLAY = Query(False, description="add the overlay PNG (base64 in the record, or the PNG itself with Accept: image/png); "
                                   "with the DICOM results, the overlay as a Secondary Capture")
REFUSALS = {500: "internal", 400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method",
            406: "not_acceptable", 413: "too_large", 415: "unsupported_format", 422: "unreadable_or_refused", 503: "capacity"}
def wants_dicom(accept: str) -> bool:
    """Whether an Accept header asks for the DICOM results (as a DICOMweb client asks for instances);
    a media range with ``q=0`` refuses them."""
    for part in accept.lower().split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if media != "multipart/related" or not any(p.replace(" ", "") in ('type="application/dicom"',
                                                                            "type=application/dicom") for p in params):
            continue
        q = next((p.split("=", 1)[1] for p in params if p.replace(" ", "").startswith("q=")), "1")
        try:
            return float(q) > 0
        except ValueError:
            return False
    return False


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
                              {"Retry-After": str(self.retry_after)} if self.status in (429, 503) else None)


def error_response(status: int, detail: str, request_id: str, headers: dict | None = None) -> JSONResponse:
    """Every error has one shape: ``{"error", "request_id"}``."""
    return JSONResponse({"error": detail, "request_id": request_id}, status_code=status,
                        headers={**(headers or {}), "X-Request-Id": request_id})


def install_error_handlers(app: FastAPI, refused: Callable[[int, str], None]) -> None:
    """Errors raised outside the routes (400, 404, 405, validation, bugs) in the one error shape,
    each reported to ``refused(code, request_id)`` (the ingress counts and audits it)."""

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        request_id = request_id_of(request)
        refused(exc.status_code, request_id)
        return error_response(exc.status_code, str(exc.detail), request_id, getattr(exc, "headers", None))

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        """A bug, not bad input: still the one error shape, and logged (without the request's data)."""
        request_id = request_id_of(request)
        log.error("request %s failed: %s", request_id, type(exc).__name__)
        refused(500, request_id)
        return error_response(500, "internal error", request_id)

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = ["{}: {}".format(".".join(str(x) for x in e.get("loc", ())), e.get("msg", "")) for e in exc.errors()]
        request_id = request_id_of(request)
        refused(422, request_id)
        return error_response(422, "invalid request: " + "; ".join(parts), request_id)

    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]  # Starlette's stub wants Exception
    app.add_exception_handler(Exception, internal_error)
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]  # as above
