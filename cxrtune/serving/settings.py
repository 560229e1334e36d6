"""What the Serve application builder takes: ``args`` in serve/config.yaml."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from ..dicom import MAX_DECODED_BYTES, MAX_PIXELS
from ..errors import CxrtuneError
from ..preprocessing import WORK_SIZE
from ..scoring.onnx_runtime import Runtime


class ServeSettings(BaseModel):
    """What the application builder takes (``args`` in serve/config.yaml); Serve validates the
    config's ``args`` against it, so a misspelt key fails at deploy time, naming the key."""
    model_config = ConfigDict(extra="forbid")

    bundle: str
    # the bundle's content hash (`cxrtune deploy` prints it; records name it): when set, a replica
    # refuses to start on any other content, so a bundle changed in storage is never served
    bundle_hash: str | None = None
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    max_upload_bytes: int = 64 * 1024 * 1024
    max_pixels: int = MAX_PIXELS  # 32 MP: the largest CXR detectors give 18.5
    max_decoded_bytes: int = MAX_DECODED_BYTES  # what a Deflated DICOM may inflate to
    work_size: int = WORK_SIZE  # long side of the working copy (the CLI's too): zones are scale-invariant
    api_key_env: str = "CXRTUNE_API_KEY"
    # a file on every ingress node holding the key(s) as the variable would (mode 0600 or 0400):
    # the way to give replicas a key without putting it in the Serve config the dashboard shows
    api_key_file: str | None = None
    # "key": every /v1 call needs X-API-Key, and an ingress without a key refuses to start;
    # "none": open, on purpose (a warning in the log and on /healthz)
    auth: Literal["key", "none"] = "key"
    device: str | None = None
    runtime: Runtime = "auto"
    threads: int | None = None  # network threads per stage (its replica, or the ingress): default Ray's, from num_cpus
    # both networks in the ingress replica, no Stage deployments: one Serve call per image instead
    # of three, for a small CPU node (docs/serving.md); the stages then scale with the ingress only
    stages_in_ingress: bool = False
    max_files_per_batch: int = 16
    # the upload budget (cxrtune.serving.budgets): caps checked as the body arrives, kept in memory only
    max_field_bytes: int = 64 * 1024  # a non-file multipart field
    max_parts: int = 32  # multipart parts of one request, files and fields
    upload_budget_bytes: int = 1024 * 1024 * 1024  # request bytes one ingress replica holds at once; more: 503
    upload_timeout_s: float = 60.0  # a body must arrive within this
    min_upload_bytes_per_s: float = 64 * 1024  # ...and at this rate on average once the grace period is over
    upload_grace_s: float = 5.0
    # the scoring budget
    max_in_flight: int = 256  # images one ingress replica scores at once (a batch counts each file); more: 503
    retry_after_s: int = 1


def check_pinned(settings: ServeSettings, digest: str) -> None:
    """Refuse a bundle whose content hash is not the one the config pins (``bundle_hash``).

    Raises:
        CxrtuneError: the hashes differ (both named: they are content hashes, not secrets)."""
    if settings.bundle_hash and digest != settings.bundle_hash:
        raise CxrtuneError(f"the bundle at {settings.bundle} has content hash {digest}, but the Serve config pins "
                           f"bundle_hash {settings.bundle_hash}: it is not the bundle that was released")
