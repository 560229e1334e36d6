"""``cxrtune pacs listen``: a DICOM C-STORE SCP (pynetdicom) that scores what a modality or PACS
sends and C-STOREs the SR and SEG to a destination AE.

Each instance is written to the spool (fsynced) before its success response; a worker thread
scores it with the bundle in this process (the library's scoring policy, as ``cxrtune score``),
queues its results in the spool's outbox and only then forgets the instance; a sender thread
delivers the outbox with retries and backoff, and parks what keeps failing. A crash at any point
leaves the instance or its results in the spool, and a restart goes on from there: delivery is
at least once, and a resend is the same objects (derived UIDs, ``results.py``), so a PACS stores
them once.

Intake: every instance is scored on its own (a study with several frontal images gets results
for each). What the DICOM rules refuse (lateral, not a chest, secondary capture, DX for
processing...) is skipped: the C-STORE still succeeds, and the log names the instance by its
pseudonym (the study key), never by a patient identifier.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field

from pydicom import Dataset, dcmread
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
)
from pynetdicom import AE, evt

from ..dicom import pseudonym_key, read_header
from ..errors import CxrtuneError
from ..preprocessing import load_scan
from ..scoring.scorer import Scorer, load_bundle
from .results import dicom_results, to_bytes
from .spool import Spool, open_spool

log = logging.getLogger("cxrtune.pacs")

# SOP classes by UID (pynetdicom.sop_class makes its names at run time, out of the type checker's sight)
VERIFICATION = "1.2.840.10008.1.1"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# what the listener accepts: CR and DX images (DX for processing, and secondary captures, are
# accepted so that the sender gets a success, then skipped by the DICOM rules)
ACCEPTED_SOP_CLASSES = (CR_IMAGE, DX_FOR_PRESENTATION, DX_FOR_PROCESSING, SECONDARY_CAPTURE)
TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLosslessSV1,
                     JPEG2000Lossless, JPEG2000)
WARNING_STATUSES = {0xB000, 0xB006, 0xB007}  # coercion, elements discarded, data set mismatch: stored
OUT_OF_RESOURCES = 0xA700


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
class ListenerSettings:
    """What ``cxrtune pacs listen`` runs with.

    Args:
        callers: who may send (AE title and host; the port is theirs): another AE title gets
            A-ASSOCIATE-RJ, another address a closed connection.
        destination: where the SR and SEG go by C-STORE.
        max_spool_bytes: past it, a C-STORE is answered 0xA700 (out of resources).
        max_attempts, backoff_s: a result that fails ``max_attempts`` deliveries is parked; the
            n-th retry waits ``backoff_s`` x 2^(n-1)."""
    ae_title: str
    host: str
    port: int
    callers: tuple[Peer, ...]
    destination: Peer
    max_associations: int = 4
    max_spool_bytes: int = 4 * 1024 ** 3
    max_attempts: int = 5
    backoff_s: float = 5.0
    poll_s: float = 0.2


@dataclass
class PacsListener:
    """The SCP, the scoring worker and the sender, over one spool."""
    settings: ListenerSettings
    spool: Spool
    scorer: Scorer
    study_key: bytes
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _server: object = None

    # ------------------------------------------------------------------ receiving
    def _on_connection(self, event) -> None:
        """A connection from an address no caller has is closed before any association; an
        unknown calling AE title from a known address gets A-ASSOCIATE-RJ (``require_calling_aet``)."""
        if event.address[0] not in {c.host for c in self.settings.callers}:
            log.warning("connection from an address that is not configured: closed")
            event.assoc.kill()

    def _on_store(self, event) -> int:
        if self.spool.used_bytes() > self.settings.max_spool_bytes:
            log.warning("spool over %d bytes: C-STORE refused (out of resources)", self.settings.max_spool_bytes)
            return OUT_OF_RESOURCES
        ds: Dataset = event.dataset
        ds.file_meta = event.file_meta
        self.spool.receive(str(ds.SOPInstanceUID), to_bytes(ds))  # fsynced before the success response
        return 0x0000

    # ------------------------------------------------------------------ scoring
    def score_one(self, path) -> None:
        """Score one spooled instance and queue its results; what the DICOM rules refuse, or what
        cannot be read, is skipped with its reason, by pseudonym."""
        data = path.read_bytes()
        try:
            who = read_header(data, self.study_key).instance or "an instance without a UID"
        except CxrtuneError as exc:
            log.warning("skipped an unreadable instance: %s", exc)
            self.spool.done(path)
            return
        try:
            scan = load_scan(data)
        except CxrtuneError as exc:  # the DICOM rules, a decode failure: that instance only
            log.info("skipped %s: %s", who, exc)
            self.spool.done(path)
            return
        (record, detail), = self.scorer.score_scans([scan])
        try:
            results = dicom_results(data, record, detail.lung, detail.opacity)
        except CxrtuneError as exc:
            log.warning("no results for %s: %s", who, exc)
            self.spool.done(path)
            return
        self.spool.enqueue({str(o.SOPInstanceUID): to_bytes(o) for o in results.objects()})
        self.spool.done(path)
        log.info("scored %s: %s, score %s; %d result object(s) queued", who, record["status"], record["score"],
                 len(results.objects()))

    def _score_loop(self) -> None:
        while not self._stop.is_set():
            for path in self.spool.received():
                if self._stop.is_set():
                    return
                self.score_one(path)
            self._stop.wait(self.settings.poll_s)

    # ------------------------------------------------------------------ sending
    def send_one(self, item) -> None:
        """One C-STORE of a queued result to the destination: sent (success or a warning
        status), retried later, or parked."""
        ds = dcmread(item)
        reason = self._c_store(ds)
        if reason is None:
            self.spool.sent(item)
            return
        parked = self.spool.failed(item, reason, self.settings.max_attempts, self.settings.backoff_s)
        log.warning("delivery to %s failed (%s)%s", self.settings.destination.ae_title, reason,
                    ": parked" if parked else "; will retry")

    def _c_store(self, ds: Dataset) -> str | None:
        dest = self.settings.destination
        ae = AE(ae_title=self.settings.ae_title)
        ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
        if not assoc.is_established:
            return "association rejected or aborted" if (assoc.is_rejected or assoc.is_aborted) else "no association"
        try:
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
        code = int(status.Status) if status and "Status" in status else None
        if code == 0x0000:
            return None
        if code in WARNING_STATUSES:
            log.warning("destination stored a result with warning status 0x%04X", code)
            return None
        return "no C-STORE response" if code is None else f"C-STORE status 0x{code:04X}"

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            for item in self.spool.due():
                if self._stop.is_set():
                    return
                self.send_one(item)
            self._stop.wait(self.settings.poll_s)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "PacsListener":
        """Serve (in the background) and start the worker and the sender."""
        for noisy in ("pynetdicom", "pynetdicom.assoc", "pynetdicom.events", "pynetdicom.acse", "pynetdicom.dimse"):
            logging.getLogger(noisy).setLevel(logging.WARNING)  # at DEBUG they log UIDs and dataset elements
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_associations = self.settings.max_associations
        ae.require_calling_aet = sorted({c.ae_title for c in self.settings.callers})
        ae.add_supported_context(VERIFICATION)
        for sop_class in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        self._server = ae.start_server((self.settings.host, self.settings.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store),
                                                     (evt.EVT_CONN_OPEN, self._on_connection)])
        for loop in (self._score_loop, self._send_loop):
            thread = threading.Thread(target=loop, daemon=True, name=f"cxrtune-pacs-{loop.__name__}")
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()  # type: ignore[attr-defined]
        for thread in self._threads:
            thread.join(timeout=30)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_listener(settings: ListenerSettings, spool: str, bundle: str, key_file: str | None = None,
                 device: str | None = None) -> None:
    """``cxrtune pacs listen``: serve until Ctrl-C or SIGTERM; the spool keeps whatever is left."""
    key = pseudonym_key(key_file)  # before anything starts: skipped instances are logged by pseudonym
    scp = PacsListener(settings, open_spool(spool), load_bundle(bundle, device=device), key).start()
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
