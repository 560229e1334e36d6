"""``cxrtune pacs listen``: a DICOM C-STORE SCP (pynetdicom) that scores what a modality or PACS
sends and C-STOREs the SR and SEG to a destination AE.

Each instance is written to the spool (fsynced) before its success response; a worker thread
scores it, with the bundle in this process (the library's scoring policy, as ``cxrtune score``)
or through the served scorer (``--endpoint``), queues its results in the spool's outbox and only
then forgets the instance; a sender thread delivers the outbox with retries and backoff, and parks
what keeps failing (at once what a retry cannot mend). A crash at any point
leaves the instance or its results in the spool, and a restart goes on from there: delivery is
at least once, and a resend is the same objects (derived UIDs, ``results.py``), so a PACS stores
them once.

Intake: every instance is scored on its own (a study with several frontal images gets results
for each). What the DICOM rules refuse (lateral, not a chest, secondary capture, DX for
processing...) is skipped: the C-STORE still succeeds, and the log names the instance by its
pseudonym (the study key), never by a patient identifier. What cannot be decoded (a codec
missing, a corrupt file), is too large, or fails unexpectedly (in this process, or the served
scorer's 500) is parked with its reason, never dropped, and ``pacs retry`` scores it again.
"""

from __future__ import annotations

import contextlib
import errno
import io
import ipaddress
import logging
import os
import signal
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

import requests
from prometheus_client import CollectorRegistry, Gauge, start_http_server
from pydicom import Dataset, dcmread
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
)
from pynetdicom import AE, evt

from ..config_files import read_private_file
from ..dicom import pseudonym_key, read_header
from ..errors import DECODE_FAILURE, REPLICA_FAILED, CxrtuneError, InputRefused
from ..preprocessing import load_scan
from ..scoring.scorer import Scorer, load_bundle
from .results import DICOM_RESULTS, dicom_results, parts_of, to_bytes
from .spool import Spool, open_spool

log = logging.getLogger("cxrtune.pacs")
# Fault injection for the delivery tests (docs/pacs.md): the process exits at once, as if killed,
# at the named point: ``spooled`` (after spooling, before the C-STORE response) or ``scored``
# (after the results are queued, before they are sent).
KILL_AT_ENV = "CXRTUNE_PACS_KILL_AT"


def _kill_point(name: str) -> None:
    if os.environ.get(KILL_AT_ENV) == name:
        os._exit(137)

# SOP classes by UID (pynetdicom.sop_class makes its names at run time, out of the type checker's sight)
VERIFICATION = "1.2.840.10008.1.1"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# what the listener accepts: CR and DX images (DX for processing, and secondary captures, are
# accepted so that the sender gets a success, then skipped by the DICOM rules)
ACCEPTED_SOP_CLASSES = (CR_IMAGE, DX_FOR_PRESENTATION, DX_FOR_PROCESSING, SECONDARY_CAPTURE)
TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit, JPEGExtended12Bit,
                     JPEGLosslessSV1, JPEGLossless, JPEG2000Lossless, JPEG2000)
WARNING_STATUSES = {0xB000, 0xB006, 0xB007}  # coercion, elements discarded, data set mismatch: stored
OUT_OF_RESOURCES = 0xA700
NOT_AUTHORISED = 0x0124  # Refused: not authorised
GAUGE_INTERVAL_S = 2.0


def permanent_failure(status: int) -> bool:
    """A C-STORE failure that a retry cannot mend, parked at once: SOP class not supported
    (0x0122), data set does not match the SOP class (0xA9xx), cannot understand (0xCxxx). Out of
    resources (0xA7xx), not authorised (0x0124, a configuration being fixed) and the rest are
    retried."""
    return status == 0x0122 or 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF


@dataclass(frozen=True)
class Peer:
    """A DICOM application entity: its AE title, host and port (``AE@HOST:PORT``)."""
    ae_title: str
    host: str
    port: int = 104

    @classmethod
    def parse(cls, text: str) -> "Peer":
        try:
            ae_title, address = text.split("@", 1)
            host, _, port = address.partition(":")
            return cls(ae_title, host, int(port) if port else 104)
        except ValueError:
            raise CxrtuneError(f"{text!r}: give a peer as AE_TITLE@HOST:PORT") from None


@dataclass(frozen=True)
class TlsSettings:
    """Mutual TLS on the DICOM connections, in and out (pynetdicom's SSL contexts): this AE's
    certificate and key, and the CA bundle the callers' and the destination's certificates must
    chain to. A caller without a trusted certificate is refused at the handshake."""
    certificate: str
    key: str  # an owner-only file
    trusted: str

    def __post_init__(self) -> None:
        if not (self.certificate and self.key and self.trusted):
            raise CxrtuneError("TLS needs a certificate, its key and the trusted CA bundle (--tls-cert, --tls-key, "
                               "--tls-ca)")

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        read_private_file(self.key, "the listener's TLS key")  # refuses a key others can read
        ctx = ssl.create_default_context(purpose, cafile=self.trusted)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.certificate, self.key)
        return ctx

    def server_context(self) -> ssl.SSLContext:
        ctx = self._context(ssl.Purpose.CLIENT_AUTH)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        return self._context(ssl.Purpose.SERVER_AUTH)


@dataclass(frozen=True)
class ListenerSettings:
    """What ``cxrtune pacs listen`` runs with.

    Args:
        callers: who may send (AE title and host, allowed as pairs; the port is theirs): any other
            pair gets A-ASSOCIATE-RJ.
        max_associations: more at once get A-ASSOCIATE-RJ (transient, local limit exceeded).
        destination: where the SR and SEG go by C-STORE.
        max_spool_bytes: past it, a C-STORE is answered 0xA700 (out of resources).
        max_attempts, backoff_s: a result that fails ``max_attempts`` deliveries, or an instance
            the served scorer defers that often (:class:`ScoreLater`'s ``this_instance``), is
            parked; the n-th retry waits ``backoff_s`` x 2^(n-1)."""
    ae_title: str
    host: str
    port: int
    callers: tuple[Peer, ...]
    destination: Peer
    max_associations: int = 4
    max_spool_bytes: int = 4 * 1024 ** 3
    max_attempts: int = 20  # 5 s, 10 s ... capped at 15 min: about 3 h before a result is parked
    backoff_s: float = 5.0
    poll_s: float = 0.2
    tls: TlsSettings | None = None
    endpoint: str | None = None  # score through the served scorer (its base URL) instead of in process
    metrics_port: int | None = None  # Prometheus metrics at http://HOST:PORT/metrics
    overlay: bool = False  # also send the overlay, a Secondary Capture "not for diagnostic use"

    def __post_init__(self) -> None:
        if self.endpoint:
            check_endpoint(self.endpoint)


class SpoolGauges:
    """The spool as Prometheus gauges: what is waiting to be scored, to be sent, parked, and the
    bytes the spool holds (patient data at rest)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.received = Gauge("cxrtune_pacs_received", "instances waiting to be scored", registry=self.registry)
        self.outbox = Gauge("cxrtune_pacs_outbox", "result objects waiting to be sent", registry=self.registry)
        self.parked = Gauge("cxrtune_pacs_parked", "result objects and instances parked", registry=self.registry)
        self.bytes = Gauge("cxrtune_pacs_spool_bytes", "bytes held in the spool", registry=self.registry)

    def update(self, spool: Spool) -> None:
        status = spool.status()
        self.received.set(status.incoming)
        self.outbox.set(status.outbox)
        self.parked.set(status.parked)
        self.bytes.set(status.bytes)


class ScoreLater(Exception):
    """The served scorer could not score now (unreachable, 401/403: the key, 404: the URL, 408,
    429, 502-504: busy or deploying, ...): the instance stays spooled and is tried again.
    ``this_instance``: the answer may be the instance's doing (Serve's 408 for a request past its
    timeout, replicas that died under it), so its tries are counted and it waits its own backoff,
    while the instances behind it go on. No answer at all is the endpoint's state, not the instance's:
    the worker waits, and no instance is charged."""

    def __init__(self, reason: str, this_instance: bool = False):
        super().__init__(reason)
        self.this_instance = this_instance


class CannotScore(Exception):
    """An instance that cannot be scored as it is (not decodable, too large, or the served scorer's
    500, a bug): parked with this reason, never dropped; ``pacs retry`` scores it again."""


# what the served scorer answers for an input it cannot take as it is (docs/serving.md): parked
CANNOT_SCORE_OVER_HTTP = {406, 413, 415, 500}


@dataclass
class PacsListener:
    """The SCP, the scoring worker and the sender, over one spool. ``scorer``: the bundle in this
    process, or None with ``settings.endpoint`` (and ``api_key``) to score through the served one."""
    settings: ListenerSettings
    spool: Spool
    scorer: Scorer | None
    study_key: bytes
    api_key: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _server: object = None
    allowed: set[tuple[str, str]] = field(default_factory=set)
    gauges: SpoolGauges = field(default_factory=SpoolGauges)

    # ------------------------------------------------------------------ receiving
    def _callers(self) -> set[tuple[str, str]]:
        """(AE title, IP address) of every configured caller, host names resolved."""
        return {(c.ae_title, socket.gethostbyname(c.host)) for c in self.settings.callers}

    def _on_requested(self, event) -> None:
        """An A-ASSOCIATE-RQ from an (AE title, address) pair that is not configured gets
        A-ASSOCIATE-RJ (rejected permanent, calling AE title not recognised) before any negotiation:
        an unknown AE title, an unknown address, or a known AE title at another caller's address."""
        try:
            calling = str(event.assoc.requestor.primitive.calling_ae_title).strip()
            address = event.assoc.requestor.address
            allowed = (calling, address) in self.allowed
        except Exception:  # noqa: BLE001 - pynetdicom logs a handler's error and goes on: fail closed
            calling, address, allowed = "(unreadable)", "?", False
        if not allowed:
            log.warning("association from %s at %s rejected: not a configured caller", calling or "(no AE title)",
                        address)  # neither is patient data; an admin needs both
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)
            event.assoc.kill()  # waits until the reject is sent, as pynetdicom's own rejections do

    def _on_store(self, event) -> int:
        if (event.assoc.requestor.ae_title, event.assoc.requestor.address) not in self.allowed:
            return NOT_AUTHORISED  # the association check above, again: a C-STORE never gets past both
        if self.spool.used_bytes() > self.settings.max_spool_bytes:
            log.warning("spool over %d bytes: C-STORE refused (out of resources)", self.settings.max_spool_bytes)
            return OUT_OF_RESOURCES
        try:  # the instance as it was sent (no decode, no re-encoding), fsynced before the success response
            self.spool.receive(str(event.request.AffectedSOPInstanceUID), event.encoded_dataset())
        except OSError as exc:  # a full disk, a quota: the sender keeps it and tries again (0xCxxx would not)
            log.error("spooling an instance failed (%s): C-STORE refused (out of resources)",
                      exc.strerror or type(exc).__name__)
            return OUT_OF_RESOURCES
        _kill_point("spooled")
        return 0x0000

    # ------------------------------------------------------------------ scoring
    def _in_process(self, data: bytes, who: str) -> list[Dataset] | None:
        """The results from the bundle in this process; None: skipped (the reason logged)."""
        try:
            scan = load_scan(data)
        except InputRefused as exc:  # the DICOM rules, the image rules: that instance only
            log.info("skipped %s: %s", who, exc)
            return None
        except CxrtuneError as exc:  # a codec missing, a corrupt file: kept, for pacs retry
            raise CannotScore(str(exc)) from None
        assert self.scorer is not None
        (record, detail), = self.scorer.score_scans([scan])
        try:
            results = dicom_results(data, record, detail, overlay_of=scan.image if self.settings.overlay else None)
        except CxrtuneError as exc:
            log.warning("no results for %s: %s", who, exc)
            return None
        log.info("scored %s: %s, score %s", who, record["status"], record["score"])
        return results.objects()

    def _over_http(self, data: bytes, who: str) -> list[Dataset] | None:
        """The results from the served scorer (``POST /v1/score`` asking for DICOM, docs/serving.md);
        None: refused by the rules (a 422 other than a decode failure), the reason logged.

        Raises:
            CannotScore: 406, 413, 415, a 422 for an image it cannot decode, or 500 (a bug).
            ScoreLater: any other answer, or none: the instance stays spooled."""
        try:
            answer = requests.post(f"{self.settings.endpoint}/v1/score", data=data, timeout=120,
                                   params={"overlay": "true"} if self.settings.overlay else None,
                                   headers={"X-API-Key": self.api_key or "", "Accept": DICOM_RESULTS,
                                            "Content-Type": "application/dicom"})
        except requests.RequestException as exc:  # no answer (a scorer that hangs, for every instance): wait
            raise ScoreLater(type(exc).__name__) from None
        code = answer.status_code
        error = ""
        if code != 200 and "json" in answer.headers.get("content-type", ""):
            with contextlib.suppress(ValueError, AttributeError):
                error = str(answer.json().get("error", ""))
        if code in CANNOT_SCORE_OVER_HTTP or (code == 422 and error.startswith(DECODE_FAILURE)):
            raise CannotScore(f"HTTP {code} {error}".strip())
        if code == 422:  # the DICOM rules, the image rules
            log.info("skipped %s: HTTP %d %s", who, code, error)
            return None
        if code != 200:  # 401/403: fix the key; 404: fix the URL; 408, 429, 502-504: wait
            raise ScoreLater(f"HTTP {code}", this_instance=code == 408 or (code == 503 and error.startswith(REPLICA_FAILED)))
        log.info("scored %s: %s, score %s", who, answer.headers.get("X-Status"), answer.headers.get("X-Score"))
        return [dcmread(io.BytesIO(part)) for part in parts_of(answer.headers["content-type"], answer.content)]

    def score_one(self, path) -> bool:
        """Score one spooled instance and queue its results; what the DICOM rules refuse is skipped
        with its reason, by pseudonym; what cannot be read or decoded is parked with its reason.
        False: the served scorer could not score now, and the instance stays spooled for a later try.
        An instance the scorer may be failing on (:class:`ScoreLater`'s ``this_instance``) is tried
        again after its own backoff and parked after ``max_attempts``: True, the next one goes on."""
        data = path.read_bytes()
        try:
            who = read_header(data, self.study_key).instance or "an instance without a UID"
        except CxrtuneError as exc:
            log.warning("parked an unreadable instance: %s", exc)
            self.spool.park_received(path, f"unreadable: {exc}")
            return True
        try:
            objects = self._over_http(data, who) if self.settings.endpoint else self._in_process(data, who)
        except ScoreLater as exc:
            if not exc.this_instance:
                log.warning("scoring %s deferred: the scorer at the endpoint answered %s", who, exc)
                return False
            parked = self.spool.failed(path, f"deferred: {exc}", self.settings.max_attempts, self.settings.backoff_s)
            log.warning("scoring %s deferred (the scorer at the endpoint answered %s)%s", who, exc,
                        ": parked after too many tries" if parked else "; the instances behind it go on")
            return True
        except CannotScore as exc:
            log.warning("parked %s: %s", who, exc)
            self.spool.park_received(path, f"cannot score: {exc}")
            return True
        if objects:
            self.spool.enqueue({str(o.SOPInstanceUID): to_bytes(o) for o in objects})
            _kill_point("scored")
        self.spool.done(path)
        return True

    def _score_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._score_received()
            except Exception as exc:  # noqa: BLE001 - e.g. a full disk while parking: the worker must live on
                log.error("the scoring worker failed (%s); trying again", type(exc).__name__)
                self._stop.wait(self.settings.backoff_s)
            self._stop.wait(self.settings.poll_s)

    def _score_received(self) -> None:
        for path in self.spool.received():
            if self._stop.is_set():
                return
            try:
                scored = self.score_one(path)
            except Exception as exc:  # one instance's failure must not end the worker
                if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise  # the spool's fault, not the instance's: the loop waits and tries it again
                # the type only: a message or a traceback may quote the instance's values
                log.error("scoring a spooled instance failed (%s): parked", type(exc).__name__)
                self.spool.park_received(path, f"scoring failed: {type(exc).__name__}")
                continue
            if not scored:
                self._stop.wait(self.settings.backoff_s)  # the endpoint is down: not a busy loop
                return

    # ------------------------------------------------------------------ sending
    def send_one(self, item) -> None:
        """One C-STORE of a queued result to the destination: sent (success or a warning
        status), retried later, or parked."""
        permanent = False
        try:
            reason, permanent = self._c_store(dcmread(item))
        except Exception as exc:  # noqa: BLE001 - e.g. no accepted presentation context: a failed delivery
            reason = f"C-STORE failed: {type(exc).__name__}"
        if reason is None:
            self.spool.sent(item)
            return
        parked = self.spool.failed(item, reason, 1 if permanent else self.settings.max_attempts,
                                   self.settings.backoff_s)
        log.warning("delivery to %s failed (%s)%s", self.settings.destination.ae_title, reason,
                    ": parked" if parked else "; will retry")

    def _c_store(self, ds: Dataset) -> tuple[str | None, bool]:
        """(why the delivery failed, or None; whether a retry cannot mend it)."""
        dest = self.settings.destination
        ae = AE(ae_title=self.settings.ae_title)
        ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 30  # type: ignore[assignment]
        ae.add_requested_context(ds.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        tls = self.settings.tls
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                             tls_args=(tls.client_context(), dest.host) if tls else None)
        if not assoc.is_established:
            if any(cx.abstract_syntax == ds.SOPClassUID for cx in assoc.rejected_contexts):
                return f"the destination accepts no {ds.SOPClassUID.name}", False
            return ("association rejected or aborted" if (assoc.is_rejected or assoc.is_aborted) else "no association",
                    False)
        try:
            if not any(cx.abstract_syntax == ds.SOPClassUID for cx in assoc.accepted_contexts):
                return f"the destination accepts no {ds.SOPClassUID.name}", False
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
        code = int(status.Status) if status and "Status" in status else None
        if code == 0x0000:
            return None, False
        if code in WARNING_STATUSES:
            log.warning("destination stored a result with warning status 0x%04X", code)
            return None, False
        if code is None:
            return "no C-STORE response", False
        return f"C-STORE status 0x{code:04X}", permanent_failure(code)

    def _send_loop(self) -> None:
        measured = 0.0
        while not self._stop.is_set():
            try:
                for item in self.spool.due():
                    if self._stop.is_set():
                        return
                    self.send_one(item)
                if self.settings.metrics_port and time.monotonic() - measured >= GAUGE_INTERVAL_S:
                    self.gauges.update(self.spool)  # walks the spool: every few seconds, not every poll
                    measured = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - e.g. a full disk while recording a try: live on
                log.error("the sender failed (%s); trying again", type(exc).__name__)
                self._stop.wait(self.settings.backoff_s)
            self._stop.wait(self.settings.poll_s)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "PacsListener":
        """Serve (in the background) and start the worker and the sender."""
        self.spool.discard_partial_writes()
        for noisy in ("pynetdicom", "pynetdicom.assoc", "pynetdicom.events", "pynetdicom.acse", "pynetdicom.dimse"):
            logging.getLogger(noisy).setLevel(logging.WARNING)  # at DEBUG they log UIDs and dataset elements
        self.allowed = self._callers()
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_associations = self.settings.max_associations
        ae.require_called_aet = True  # a caller must address this AE by its title
        ae.add_supported_context(VERIFICATION)
        for sop_class in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        tls = self.settings.tls
        self._server = ae.start_server((self.settings.host, self.settings.port), block=False,
                                       ssl_context=tls.server_context() if tls else None,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store),
                                                     (evt.EVT_REQUESTED, self._on_requested)])
        if self.settings.metrics_port:
            start_http_server(self.settings.metrics_port, addr=self.settings.host, registry=self.gauges.registry)
        for loop in (self._score_loop, self._send_loop):
            thread = threading.Thread(target=loop, daemon=True, name=f"cxrtune-pacs-{loop.__name__}")
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:  # once: pynetdicom's shutdown fails when called twice
            server, self._server = self._server, None
            server.shutdown()  # type: ignore[attr-defined]
        for thread in self._threads:
            thread.join(timeout=30)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def check_endpoint(url: str) -> None:
    """The served scorer's URL: https, or http to this machine only (the API key and the patient's
    images would otherwise cross the network in clear).

    Raises:
        CxrtuneError: another scheme, or http to another host."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return
    host = parts.hostname or ""
    loopback = host == "localhost"
    with contextlib.suppress(ValueError):
        loopback = loopback or ipaddress.ip_address(host).is_loopback
    if parts.scheme != "http" or not loopback:
        raise CxrtuneError(f"--endpoint {url}: use https:// (or http:// to this machine only): the API key and the "
                           "images must not cross the network in clear")


def endpoint_key(key_file: str | None) -> str:
    """The served scorer's API key: the owner-only ``key_file``, else ``$CXRTUNE_API_KEY``."""
    key = read_private_file(key_file, "API key") if key_file else os.environ.get("CXRTUNE_API_KEY", "").strip()
    if not key:
        raise CxrtuneError("scoring through --endpoint needs its API key: --api-key-file or $CXRTUNE_API_KEY")
    return key


def run_listener(settings: ListenerSettings, spool: str, bundle: str | None, key_file: str | None = None,
                 device: str | None = None, api_key_file: str | None = None) -> None:
    """``cxrtune pacs listen``: serve until Ctrl-C or SIGTERM; the spool keeps whatever is left.
    Scores with ``bundle`` in this process, or through ``settings.endpoint``."""
    key = pseudonym_key(key_file)  # before anything starts: skipped instances are logged by pseudonym
    if settings.endpoint:
        scp = PacsListener(settings, open_spool(spool), None, key, endpoint_key(api_key_file)).start()
    elif bundle:
        scp = PacsListener(settings, open_spool(spool), load_bundle(bundle, device=device), key).start()
    else:
        raise CxrtuneError("give --bundle (score in this process) or --endpoint (score through the served scorer)")
    print(f"cxrtune pacs listener {settings.ae_title} on {settings.host}:{settings.port}, results to "
          f"{settings.destination.ae_title}@{settings.destination.host}:{settings.destination.port}; Ctrl-C stops",
          flush=True)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            threading.Event().wait(3600)
    except KeyboardInterrupt:
        pass
    finally:
        scp.stop()
