"""``cxrtune pacs poll``: find new CR/DX instances on a DICOMweb server (QIDO-RS), retrieve them
(WADO-RS, as stored: cxrtune decodes the usual syntaxes, and a server without a codec for one,
such as Orthanc without its GDCM plugin for JPEG 2000, cannot transcode it anyway; again in
Explicit VR Little Endian when cxrtune cannot decode what is stored), score them in this process
and store the SR and SEG back (STOW-RS), with dicomweb-client.

Which instances are new: each poll searches the instances of CR and DX studies dated from the
cursor on (paged by ``page_size`` until a page comes back empty) and skips those in the persisted
set of handled instances (``poll_state.json`` in the spool: hashes of SOP Instance UIDs). The
cursor is the date the last complete poll started, less ``window_days`` (late-arriving studies):
a poller that was down for a week searches the week when it comes back. A failing or parked
instance keeps its study, series and instance UIDs, so it is tried again by them whatever the
dates. A connection error, a 5xx or a 429 (which dicomweb-client does not retry) is retried with
backoff within the poll; an instance that still fails is tried again at the next poll, and after
``max_attempts`` polls it is parked with its reason (``pacs status`` shows it, ``pacs retry``
lets it be tried again). What the DICOM rules refuse is handled: skipped, logged by pseudonym.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field

import requests
from dicomweb_client.api import DICOMwebClient
from prometheus_client import CollectorRegistry, Gauge, start_http_server
from pydicom import Dataset

from ..config_files import read_private_file
from ..dicom import read_header
from ..errors import CxrtuneError, InputRefused
from ..preprocessing import Scan, load_scan
from ..scoring.scorer import Scorer
from .results import dicom_results, to_bytes
from .spool import Spool

log = logging.getLogger("cxrtune.pacs")
TOKEN_ENV, TOKEN_FILE_ENV = "CXRTUNE_DICOMWEB_TOKEN", "CXRTUNE_DICOMWEB_TOKEN_FILE"
BASIC_FILE_ENV = "CXRTUNE_DICOMWEB_BASIC_AUTH_FILE"  # an owner-only file holding USER:PASSWORD
CA_BUNDLE_ENV = "CXRTUNE_DICOMWEB_CA_BUNDLE"  # the CA bundle of an https:// server with a private CA
STATE_FILE, STATE_LOCK = "poll_state.json", "poll_state.lock"
RETRIED_STATUSES = {408, 429}  # and every 5xx
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
AS_STORED, TRANSCODED = (("application/dicom", "*"),), (("application/dicom", EXPLICIT_VR_LITTLE_ENDIAN),)
SOP_INSTANCE_UID, SERIES_INSTANCE_UID, STUDY_INSTANCE_UID = "00080018", "0020000E", "0020000D"


class RetriableError(CxrtuneError):
    """A DICOMweb call that failed after its retries (connection, 5xx, 429) or with another HTTP
    error (``status``: its HTTP status, 0 without one), or an instance that could not be decoded."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


def _decoded(data: bytes) -> tuple[Scan | None, CxrtuneError | None]:
    """(the scan, None), or (None, why it could not be decoded); a refusal by the rules propagates."""
    try:
        return load_scan(data), None
    except InputRefused:
        raise
    except CxrtuneError as exc:
        return None, exc


@dataclass(frozen=True)
class PollSettings:
    """What ``cxrtune pacs poll`` runs with (docs/pacs.md)."""
    url: str
    window_days: int = 1
    page_size: int = 100
    max_attempts: int = 3  # polls an instance may fail before it is parked
    retries: int = 3  # tries of one call within a poll
    backoff_s: float = 1.0
    modalities: tuple[str, ...] = ("CR", "DX")
    overlay: bool = False  # also store the overlay, a Secondary Capture "not for diagnostic use"


@dataclass
class PollState:
    """``poll_state.json``: what every poll has handled, what is failing, what is parked, what
    ``pacs retry`` released (failing and released instances are polled by their UIDs whatever the
    dates), and the cursor: the date (YYYYMMDD) the last complete poll started."""
    handled: set[str] = field(default_factory=set)
    failures: dict[str, dict] = field(default_factory=dict)  # hash -> {attempts, last_error, uids}
    parked: dict[str, dict] = field(default_factory=dict)  # hash -> {attempts, last_error, uids}
    retry: dict[str, list[str]] = field(default_factory=dict)  # hash -> [study, series, instance UID]
    cursor: str = ""

    def to_json(self) -> bytes:
        return json.dumps({"handled": sorted(self.handled), "failures": self.failures, "parked": self.parked,
                           "retry": self.retry, "cursor": self.cursor}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "PollState":
        d = json.loads(data)
        return cls(set(d.get("handled", [])), dict(d.get("failures", {})), dict(d.get("parked", {})),
                   dict(d.get("retry", {})), str(d.get("cursor", "")))

    def since(self, today: dt.date, window_days: int) -> str:
        """The first study date to search: ``window_days`` before today, or before the cursor
        when the last complete poll is older than today (the poller was down)."""
        start = today
        if self.cursor:
            start = min(start, dt.datetime.strptime(self.cursor, "%Y%m%d").date())
        return (start - dt.timedelta(days=window_days)).strftime("%Y%m%d")


@contextlib.contextmanager
def _locked_state(spool: Spool):
    """The poll state, read and (on leaving) written under an exclusive lock: the poller and
    ``pacs retry`` may change it at the same time."""
    with open(spool.root / STATE_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            state = _read_state(spool)
            yield state
            spool.write_state(STATE_FILE, state.to_json())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def instance_key(sop_instance_uid: str) -> str:
    return hashlib.sha256(sop_instance_uid.encode("ascii", "replace")).hexdigest()[:32]


def dicomweb_session() -> requests.Session:
    """A session with the server's credentials, never from a flag (which ``ps`` would show): a
    bearer token from ``$CXRTUNE_DICOMWEB_TOKEN`` or the owner-only file
    ``$CXRTUNE_DICOMWEB_TOKEN_FILE`` names, or HTTP Basic (Orthanc's own users) from the owner-only
    ``USER:PASSWORD`` file ``$CXRTUNE_DICOMWEB_BASIC_AUTH_FILE`` names; and the CA bundle
    ``$CXRTUNE_DICOMWEB_CA_BUNDLE`` names, for a server whose certificate a private CA signed.

    Raises:
        CxrtuneError: a credentials file others can read, a Basic file without ``:``, or both
            kinds of credentials."""
    session = requests.Session()
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token and os.environ.get(TOKEN_FILE_ENV):
        token = read_private_file(os.environ[TOKEN_FILE_ENV], TOKEN_FILE_ENV).strip()
    basic = read_private_file(os.environ[BASIC_FILE_ENV], BASIC_FILE_ENV).strip() if os.environ.get(BASIC_FILE_ENV) \
        else ""
    if token and basic:
        raise CxrtuneError(f"give the DICOMweb server a token or Basic credentials ({BASIC_FILE_ENV}), not both")
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    if basic:
        user, colon, password = basic.partition(":")
        if not colon or not user:
            raise CxrtuneError(f"{BASIC_FILE_ENV}: the file must hold USER:PASSWORD on one line")
        session.auth = (user, password)
    if os.environ.get(CA_BUNDLE_ENV):
        session.verify = os.environ[CA_BUNDLE_ENV]
    return session


def _value(item: dict, tag: str) -> str:
    return str((item.get(tag) or {}).get("Value", [""])[0])


class PollGauges:
    """The poller's state as Prometheus gauges: instances handled, failing (tried again next poll),
    parked, and when the last poll ended (a poller that stalls stops moving it)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.handled = Gauge("cxrtune_pacs_poll_handled", "instances handled", registry=self.registry)
        self.failing = Gauge("cxrtune_pacs_poll_failing", "instances failing, tried again next poll",
                             registry=self.registry)
        self.parked = Gauge("cxrtune_pacs_poll_parked", "instances parked", registry=self.registry)
        self.last_poll = Gauge("cxrtune_pacs_poll_last_end_seconds", "when the last poll ended (Unix time)",
                               registry=self.registry)

    def update(self, state: PollState) -> None:
        self.handled.set(len(state.handled))
        self.failing.set(len(state.failures))
        self.parked.set(len(state.parked))
        self.last_poll.set(time.time())


@dataclass
class DicomwebPoller:
    """One DICOMweb server, polled into one spool folder's state."""
    settings: PollSettings
    spool: Spool
    scorer: Scorer
    study_key: bytes
    client: DICOMwebClient | None = None
    gauges: PollGauges = field(default_factory=PollGauges)

    def __post_init__(self) -> None:
        for noisy in ("dicomweb_client", "urllib3.connectionpool"):  # at DEBUG they log URLs with UIDs
            logging.getLogger(noisy).setLevel(logging.WARNING)
        self.spool.discard_partial_writes()
        if self.client is None:
            self.client = DICOMwebClient(self.settings.url, session=dicomweb_session())
        # one retry policy, this one (``_call``): dicomweb-client's own retries 408, 429, 503 and 504
        # only, with its own waits, and would hide the others
        self.client.set_http_retry_params(retry=False)

    # ------------------------------------------------------------------ state
    def state(self) -> PollState:
        return _read_state(self.spool)

    # ------------------------------------------------------------------ calls
    def _call(self, what: str, fn, *args, **kwargs):
        """``fn`` with retries and backoff on connection errors, bodies cut off, 5xx and 429."""
        for attempt in range(self.settings.retries):
            try:
                return fn(*args, **kwargs)
            except requests.HTTPError as exc:
                code = exc.response.status_code if exc.response is not None else 0
                if code not in RETRIED_STATUSES and code < 500:
                    raise RetriableError(f"{what}: HTTP {code}", code) from None
                reason, status = f"{what}: HTTP {code}", code
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError) as exc:  # the last two: a body cut off mid-way
                reason, status = f"{what}: {type(exc).__name__}", 0
            if attempt + 1 < self.settings.retries:
                time.sleep(self.settings.backoff_s * 2 ** attempt)
        raise RetriableError(reason, status)

    def new_instances(self, state: PollState, today: dt.date) -> list[tuple[str, str, str]]:
        """(study, series, SOP instance UID) of the CR/DX instances dated from the cursor on
        (:meth:`PollState.since`) not yet handled or parked. Pages until one comes back empty: a
        server may cap a page below ``page_size``."""
        since = state.since(today, self.settings.window_days)
        found: dict[str, tuple[str, str, str]] = {}
        assert self.client is not None
        for modality in self.settings.modalities:
            offset, seen = 0, set[str]()
            while True:
                page = self._call("QIDO-RS", self.client.search_for_instances, offset=offset,
                                  limit=self.settings.page_size,
                                  search_filters={"Modality": modality, "StudyDate": f"{since}-"})
                keys = set()
                for item in page:
                    uids = (_value(item, STUDY_INSTANCE_UID), _value(item, SERIES_INSTANCE_UID),
                            _value(item, SOP_INSTANCE_UID))
                    key = instance_key(uids[2])
                    keys.add(key)
                    if all(uids) and key not in state.handled and key not in state.parked:
                        found[key] = uids
                if not keys - seen:  # empty, or a server that ignores the offset: the last page
                    if page:
                        log.warning("the DICOMweb server sent the same %s instances again for offset %d: it seems "
                                    "to ignore QIDO-RS offsets, and instances past its first page are not found",
                                    modality, offset)
                    break
                seen |= keys
                offset += len(page)
        return list(found.values())

    # ------------------------------------------------------------------ one instance
    def _retrieve(self, uids: tuple[str, str, str], media_types) -> Dataset:
        """One instance by WADO-RS, in ``media_types`` (``AS_STORED`` or ``TRANSCODED``)."""
        assert self.client is not None
        return self._call("WADO-RS", self.client.retrieve_instance, *uids, media_types=media_types)

    def handle(self, uids: tuple[str, str, str]) -> str:
        """Retrieve, score and store one instance: ``scored`` or ``skipped``.

        Raises:
            RetriableError: a DICOMweb call failed after its retries."""
        try:
            ds = self._retrieve(uids, AS_STORED)
        except RetriableError as exc:
            if exc.status != 406:  # a server that will not send as stored: in Explicit VR LE, then
                raise
            ds = self._retrieve(uids, TRANSCODED)
        data = to_bytes(ds)
        who = read_header(data, self.study_key).instance or "an instance"
        try:
            scan, failure = _decoded(data)
            if failure is not None and ds.file_meta.get("TransferSyntaxUID") != EXPLICIT_VR_LITTLE_ENDIAN:
                # a syntax without a decoder here: the server transcodes it, if it can
                ds = self._retrieve(uids, TRANSCODED)
                data = to_bytes(ds)
                scan, failure = _decoded(data)
        except InputRefused as exc:  # the DICOM rules, the image rules: handled
            log.info("skipped %s: %s", who, exc)
            return "skipped"
        if scan is None:  # failed: tried again next poll, then parked with this reason
            raise RetriableError(f"cannot decode: {failure}")
        (record, detail), = self.scorer.score_scans([scan])
        try:
            results = dicom_results(data, record, detail, overlay_of=scan.image if self.settings.overlay else None)
        except CxrtuneError as exc:
            log.warning("no results for %s: %s", who, exc)
            return "skipped"
        assert self.client is not None
        answer = self._call("STOW-RS", self.client.store_instances, results.objects())
        failed = len(answer.get("FailedSOPSequence") or []) if answer is not None else 0
        if failed:  # a 202: some objects stored, some refused; a retry stores the same objects again
            raise RetriableError(f"STOW-RS: the server refused {failed} of {len(results.objects())} object(s)")
        log.info("scored %s: %s, score %s; %d result object(s) stored", who, record["status"], record["score"],
                 len(results.objects()))
        return "scored"

    def poll_once(self) -> dict[str, int]:
        """One poll: every new instance, and every one ``pacs retry`` released, handled, failed
        (retried next poll) or parked. Counts by outcome. The state is updated after each instance
        (a crash repeats at most the one in hand), under the lock ``pacs retry`` takes too."""
        snapshot, today = self.state(), dt.date.today()
        candidates = {instance_key(uids[2]): uids for uids in self.new_instances(snapshot, today)}
        known = [*snapshot.retry.items(), *((k, f.get("uids", [])) for k, f in snapshot.failures.items())]
        for key, released in known:  # released by pacs retry, or failing: by their UIDs, whatever the dates
            if len(released) == 3 and key not in snapshot.handled:
                candidates.setdefault(key, (released[0], released[1], released[2]))
        counts = {"scored": 0, "skipped": 0, "failed": 0, "parked": 0}
        for key, uids in candidates.items():
            try:
                outcome, error = self.handle(uids), None
            except Exception as exc:  # noqa: BLE001 - one instance's failure must not end the poller
                # a DICOMweb call that failed, or anything unexpected (named by its type only: a
                # message may quote the instance's values): tried again next poll, then parked
                outcome, error = "", str(exc) if isinstance(exc, RetriableError) else f"failed: {type(exc).__name__}"
            with _locked_state(self.spool) as state:
                state.retry.pop(key, None)
                if error is None:
                    state.handled.add(key)
                    state.failures.pop(key, None)
                    counts[outcome] += 1
                    continue
                failure = state.failures.pop(key, {"attempts": 0})
                failure = {"attempts": failure["attempts"] + 1, "last_error": error, "uids": list(uids)}
                if failure["attempts"] >= self.settings.max_attempts:
                    state.parked[key] = failure
                    counts["parked"] += 1
                    log.warning("parked an instance after %d failed polls: %s", failure["attempts"], error)
                else:
                    state.failures[key] = failure
                    counts["failed"] += 1
        with _locked_state(self.spool) as state:  # complete: the next poll searches from today's date
            state.cursor = max(state.cursor, today.strftime("%Y%m%d"))
        self.gauges.update(self.state())
        return counts



def poll_forever(poller: DicomwebPoller, interval_s: float, metrics: tuple[str, int] | None = None) -> None:
    """``cxrtune pacs poll`` without ``--once``: a poll every ``interval_s`` until Ctrl-C.

    Args:
        metrics: (host, port) to serve the Prometheus gauges at ``/metrics``."""
    if metrics:
        start_http_server(metrics[1], addr=metrics[0], registry=poller.gauges.registry)
    try:
        while True:
            try:
                counts = poller.poll_once()
            except Exception as exc:  # noqa: BLE001 - the search itself failed: the next poll tries again
                log.warning("poll failed: %s", exc if isinstance(exc, RetriableError) else type(exc).__name__)
            else:
                if any(counts.values()):
                    log.warning("poll: %s", json.dumps(counts))
            time.sleep(interval_s)
    except KeyboardInterrupt:
        pass


def _read_state(spool: Spool) -> PollState:
    path = spool.root / STATE_FILE
    return PollState.from_json(path.read_bytes()) if path.exists() else PollState()


def retry_parked(spool: Spool) -> int:
    """Let every parked instance be polled again (``pacs retry``), by its UIDs: whatever the
    window, at the next poll. Safe beside a running poller (the state's lock)."""
    if not (spool.root / STATE_FILE).exists():
        return 0
    with _locked_state(spool) as state:
        for key, item in state.parked.items():
            state.retry[key] = list(item.get("uids", []))
        moved = len(state.parked)
        state.parked.clear()
    return moved


def poll_status(spool: Spool) -> dict:
    """The poll state's counts for ``pacs status``."""
    state = _read_state(spool)
    reasons: dict[str, int] = {}
    for item in state.parked.values():
        reasons[item["last_error"]] = reasons.get(item["last_error"], 0) + 1
    return {"handled": len(state.handled), "failing": len(state.failures), "parked": len(state.parked),
            "parked_reasons": reasons, "released": len(state.retry)}

