"""The record of one scored image: one schema for every caller.

:func:`~cxrtune.scoring.scorer.build_record` returns it; ``cxrtune score`` writes it with the
image's URI (``image``) and its per-image timings, ``cxrtune score-masks`` prints it, and the HTTP
API answers it with ``request_id`` and ``timings_ms`` (:class:`cxrtune.serving.api.ScoreRecord`,
which keeps the API's schema name and is what the OpenAPI document describes; docs/scoring.md).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

STATUSES = ("scored", "partial", "unscored")


class ZoneResult(BaseModel):
    affected: bool | None = Field(description="opacity_fraction >= T; null for a lung not found")
    opacity_fraction: float | None = Field(description="share of the zone's pixels the refined opacity mask covers")


class LungResult(BaseModel):
    opacity_percent: float
    grade: int = Field(description="seed 000's per-lung grade: 0 clear, 1 for 1-33 %, 2 for 34-66 %, 3 for 67-100 %")


class InputInfo(BaseModel):
    format: str = Field(description="png, jpeg or dicom (from the file's bytes, not its name)")
    width: int
    height: int


class ScoreRecord(BaseModel):
    """The record of one image (docs/scoring.md). ``score`` is null unless ``status`` is scored:
    a failure never reads as a healthy 0."""
    status: Literal["scored", "partial", "unscored"]
    reason: str | None = Field(description="why the record is partial or unscored")
    score: int | None = Field(description="affected zones, 0-6; null unless status is scored")
    zones: dict[str, ZoneResult] | None = Field(description="A/B/C: patient's right lung upper/middle/lower; D/E/F: left")
    lungs: dict[str, LungResult | None] | None
    opacity_percent: float | None
    threshold: float = Field(description="the zone threshold T")
    lungs_found: int
    disease_probability: float | None
    models: dict | None = Field(None, description="the models, T_cls, the opacity cut, the lung threshold and the "
                                                  "bundle (name, content "
                                                  "hash); `stage_bundles` gives the content hash of the bundle behind "
                                                  "each stage's answer and `stage_runtimes` what ran it (torch, onnx, "
                                                  "onnx-int8); null for a stage that did not run. Absent from a "
                                                  "record made from masks")
    input: InputInfo | None = Field(None, description="the decoded input; absent from a record made from masks")

    def to_dict(self) -> dict:
        """The JSON object users read: every field, ``models`` and ``input`` only when known."""
        absent = {name for name in ("models", "input") if getattr(self, name) is None}
        return self.model_dump(exclude=absent)


class ErrorRecord(BaseModel):
    """The line of an image that could not be read or decoded (``cxrtune score``; the API answers
    the same as an error body): no score at all, never a 0."""
    status: Literal["error"] = "error"
    error: str = Field(description="why the image could not be scored; names no patient data")
    score: None = None
    retriable: bool = Field(default=False, description="a read or scoring failure that another try may not meet (`--resume` "
                                               "tries it again); false: the file itself was refused, and stays so")

    def to_dict(self) -> dict:
        return self.model_dump()
