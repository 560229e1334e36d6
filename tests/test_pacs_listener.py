"""`cxrtune pacs listen` over real DICOM associations on 127.0.0.1 (issue 22, item 3): a pynetdicom
SCU plays the modality, a pynetdicom storage SCP the destination PACS; the listener scores with
the phantom bundle in process."""

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt

from cxrtune.data.phantom import make_phantom
from cxrtune.pacs.listener import (
    CR_IMAGE,
    DX_FOR_PRESENTATION,
    DX_FOR_PROCESSING,
    SECONDARY_CAPTURE,
    VERIFICATION,
    ListenerSettings,
    PacsListener,
    Peer,
    ScoreLater,
)
from cxrtune.pacs.results import SCHEME, dicom_results, to_bytes
from cxrtune.pacs.spool import Spool, open_spool
from cxrtune.preprocessing import load_scan
from cxrtune.scoring.scorer import load_bundle
from tests.conftest import free_port
from tests.test_dicom import make_dicom

SR_STORAGE, SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.66.4"
PATIENT = "DOE^LISTENER^MRN4711"
KEY = b"listener-test-study-key-0123456789"

# unique values in the patient and study fields: none may appear in any log (issue 22, item 6); a
# name without a caret, as many modalities write it, makes highdicom warn, quoting it
MARKERS = {"PatientName": "MARKERPATIENTQ7Z3", "PatientID": "MARKERID8K2W", "PatientBirthDate": "19010203",
           "AccessionNumber": "MARKACC5R1", "OtherPatientIDs": "MARKOTH4J9", "ReferringPhysicianName": "MARKER^DOC^X2R8",
           "InstitutionName": "MARKER HOSPITAL V6T5"}


def assert_no_marker(text: str) -> None:
    """No marker in ``text``, whole or as its last, unique component (a name written another way)."""
    for name, value in MARKERS.items():
        assert value not in text and value.replace("^", " ").split()[-1] not in text, name


class Destination:
    """A storage SCP standing in for the PACS: keeps what it is sent, answers ``status``;
    ``accepts``: the SOP classes it takes."""

    def __init__(self, status: int = 0x0000, accepts: tuple[str, ...] = (SR_STORAGE, SEG_STORAGE)):
        self.status, self.received = status, []
        self.port = free_port()
        ae = AE(ae_title="PACS")
        for uid in accepts:
            ae.add_supported_context(uid, ExplicitVRLittleEndian)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event) -> int:
        if self.status in (0x0000, 0xB000, 0xB006, 0xB007):
            self.received.append(event.dataset)
        return self.status

    def peer(self) -> Peer:
        return Peer("PACS", "127.0.0.1", self.port)

    def stop(self) -> None:
        self.server.shutdown()


def dx(tmp_path: Path, name: str, **tags) -> pydicom.Dataset:
    """A phantom CXR as a DX with its own patient, study, series and instance."""
    pixels = (make_phantom(128, "covid", seed=3).image * 4095).astype(np.uint16)
    path = make_dicom(tmp_path / f"{name}.dcm", pixels, BitsStored=12, StudyInstanceUID=generate_uid(),
                      SeriesInstanceUID=generate_uid(), **{"PatientName": PATIENT, **tags})
    return pydicom.dcmread(path)


def send(port: int, *datasets: pydicom.Dataset, calling: str = "MODALITY",
         source: str = "127.0.0.1") -> list[int] | str:
    """C-STORE each dataset to the listener from ``source``: the statuses, or how the association
    failed (``rejected`` or ``aborted``)."""
    ae = AE(ae_title=calling)
    for uid in (CR_IMAGE, DX_FOR_PRESENTATION, DX_FOR_PROCESSING, SECONDARY_CAPTURE):
        ae.add_requested_context(uid, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRTUNE", bind_address=(source, 0))
    if not assoc.is_established:
        return "rejected" if assoc.is_rejected else "aborted"
    try:
        statuses = []
        for ds in datasets:
            answer = assoc.send_c_store(ds)
            if "Status" not in answer:  # the association died before the response
                return "aborted"
            statuses.append(int(answer.Status))
        return statuses
    finally:
        assoc.release()


def send_compressed(port: int, ds: pydicom.Dataset) -> int:
    """C-STORE ``ds`` in its own (compressed) transfer syntax, which the listener must accept: the
    status."""
    syntax = ds.file_meta.TransferSyntaxUID
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRTUNE")
    assert assoc.is_established and assoc.accepted_contexts[0].transfer_syntax[0] == syntax
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def echo(port: int) -> int | None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRTUNE")
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def wait_for(condition, timeout_s: float = 60) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def scorer(phantom_bundle):
    return load_bundle(str(phantom_bundle), device="cpu")


def listener(scorer, spool: Path, destination: Peer, **changes) -> PacsListener:
    settings = ListenerSettings(**{"ae_title": "CXRTUNE", "host": "127.0.0.1", "port": free_port(),
                                   "callers": (Peer("MODALITY", "127.0.0.1"),), "destination": destination,
                                   "backoff_s": 0.1, "poll_s": 0.05, **changes})
    return PacsListener(settings, open_spool(spool), scorer, KEY).start()


def test_received_images_are_scored_and_their_sr_and_seg_delivered(scorer, tmp_path, caplog, recwarn):
    caplog.set_level(logging.DEBUG)
    pacs = Destination()
    scp = listener(scorer, tmp_path / "spool", pacs.peer())
    try:
        assert echo(scp.settings.port) == 0x0000
        source = dx(tmp_path, "one", **MARKERS)
        assert send(scp.settings.port, source) == [0x0000]
        assert wait_for(lambda: len(pacs.received) == 2), scp.spool.status()
        sr, seg = sorted(pacs.received, key=lambda ds: ds.Modality != "SR")
        assert (sr.Modality, seg.Modality) == ("SR", "SEG")
        assert sr.StudyInstanceUID == seg.StudyInstanceUID == source.StudyInstanceUID
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert evidence.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == SCHEME
        assert wait_for(lambda: scp.spool.status().outbox == 0)
        status = scp.spool.status()
        assert (status.incoming, status.outbox, status.parked) == (0, 0, 0)
        assert (tmp_path / "spool").stat().st_mode & 0o777 == 0o700
    finally:
        scp.stop()
        pacs.stop()
    logged = caplog.text
    assert "scored ins-" in logged
    assert_no_marker(logged)
    assert_no_marker(" ".join(str(w.message) for w in recwarn))  # highdicom warns quoting a name without a caret
    assert source.SOPInstanceUID not in logged  # pynetdicom's DEBUG lines (UIDs) are silenced


def test_what_the_dicom_rules_refuse_is_accepted_then_skipped_with_its_reason(scorer, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cxrtune.pacs")
    pacs = Destination()
    scp = listener(scorer, tmp_path / "spool", pacs.peer())
    try:
        capture = dx(tmp_path, "sc", SOPClassUID=SECONDARY_CAPTURE)
        capture.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
        lateral = dx(tmp_path, "lateral", ViewPosition="LL")
        knee = dx(tmp_path, "knee", BodyPartExamined="KNEE")
        for_processing = dx(tmp_path, "raw", SOPClassUID=DX_FOR_PROCESSING)
        for_processing.file_meta.MediaStorageSOPClassUID = DX_FOR_PROCESSING
        assert send(scp.settings.port, capture, lateral, knee, for_processing) == [0x0000] * 4
        assert wait_for(lambda: scp.spool.status().incoming == 0)
        time.sleep(0.5)
        assert pacs.received == [] and scp.spool.status().outbox == 0
    finally:
        scp.stop()
        pacs.stop()
    assert caplog.text.count("skipped ins-") == 4
    assert "secondary capture" in caplog.text and "non-frontal view (ViewPosition LL)" in caplog.text
    assert "KNEE" in caplog.text and "for processing" in caplog.text.lower()
    assert PATIENT not in caplog.text


def test_an_unknown_calling_ae_or_address_is_rejected(scorer, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="cxrtune.pacs")
    pacs = Destination()
    scp = listener(scorer, tmp_path / "spool", pacs.peer())
    try:
        assert send(scp.settings.port, dx(tmp_path, "x"), calling="INTRUDER") == "rejected"  # A-ASSOCIATE-RJ
        assert send(scp.settings.port, dx(tmp_path, "y"), source="127.0.0.2") == "rejected"  # not a configured host
        assert send(scp.settings.port, dx(tmp_path, "z")) == [0x0000]  # the configured caller
        assert wait_for(lambda: len(pacs.received) == 2)
        # the admin sees who was refused (AE title and address are not patient data)
        assert "INTRUDER at 127.0.0.1 rejected" in caplog.text and "MODALITY at 127.0.0.2 rejected" in caplog.text
    finally:
        scp.stop()
        pacs.stop()


def test_failed_deliveries_back_off_then_park_and_pacs_retry_delivers_them(scorer, tmp_path):
    import requests

    pacs = Destination(status=0xA700)  # the PACS is out of resources
    metrics = free_port()
    scp = listener(scorer, tmp_path / "spool", pacs.peer(), max_attempts=2, metrics_port=metrics)
    try:
        assert send(scp.settings.port, dx(tmp_path, "one")) == [0x0000]
        assert wait_for(lambda: scp.spool.status().parked == 2), scp.spool.status()
        assert scp.spool.status().parked_reasons == {"C-STORE status 0xA700": 2}
        assert wait_for(lambda: "cxrtune_pacs_parked 2.0" in requests.get(f"http://127.0.0.1:{metrics}/metrics").text)
        page = requests.get(f"http://127.0.0.1:{metrics}/metrics").text
        assert "cxrtune_pacs_outbox 0.0" in page and "cxrtune_pacs_spool_bytes" in page
        pacs.status = 0xB000  # stored with coercion: a warning is a delivery
        assert scp.spool.retry_parked() == (2, 0)
        assert wait_for(lambda: len(pacs.received) == 2 and scp.spool.status().outbox == 0)
    finally:
        scp.stop()
        pacs.stop()


def test_a_restart_delivers_what_was_spooled_before_a_crash(scorer, tmp_path):
    """An instance in incoming/ and a result in outbox/ (the listener stopped after its C-STORE
    response and after scoring): a new listener on the same spool delivers both, with the same
    UIDs as a fresh scoring of the same image."""
    pacs = Destination()
    spool = Spool(tmp_path / "spool")
    first, second = dx(tmp_path, "first"), dx(tmp_path, "second")
    spool.receive(first.SOPInstanceUID, to_bytes(first))
    crashed = PacsListener(ListenerSettings("CXRTUNE", "127.0.0.1", free_port(), (), pacs.peer()), spool, scorer, KEY)
    crashed.score_one(next(iter(spool.received())))  # scored and queued, never sent
    queued = {pydicom.dcmread(p).SOPInstanceUID for p in spool.due()}
    spool.receive(second.SOPInstanceUID, to_bytes(second))  # received, never scored
    scp = listener(scorer, tmp_path / "spool", pacs.peer())
    try:
        assert wait_for(lambda: len(pacs.received) == 4), scp.spool.status()
        assert queued <= {ds.SOPInstanceUID for ds in pacs.received}
    finally:
        scp.stop()
        pacs.stop()
    fresh = set()
    for ds in (first, second):  # the same images scored afresh give the same objects
        (record, detail), = scorer.score_scans([load_scan(to_bytes(ds))])
        fresh |= {o.SOPInstanceUID for o in dicom_results(to_bytes(ds), record, detail).objects()}
    assert fresh == {ds.SOPInstanceUID for ds in pacs.received}


def test_a_spool_others_can_read_is_refused(tmp_path):
    from cxrtune.errors import CxrtuneError

    (tmp_path / "open").mkdir(mode=0o755)
    (tmp_path / "open").chmod(0o755)
    with pytest.raises(CxrtuneError, match="can be read by others"):
        open_spool(tmp_path / "open")


@pytest.mark.slow
def test_cxrtune_pacs_listen_runs_until_sigterm_and_status_reads_its_spool(phantom_bundle, tmp_path):
    """The command itself, as a service manager runs it: it answers C-ECHO, delivers, stops on
    SIGTERM with exit status 0; `pacs status` and `pacs retry` read the spool it leaves."""
    import json
    import signal
    import subprocess
    import sys

    from tests.conftest import cli_in_process

    pacs, port = Destination(), free_port()
    key = tmp_path / "study.key"
    key.write_text(KEY.decode())
    key.chmod(0o600)
    command = [sys.executable, "-m", "cxrtune.cli", "pacs", "listen", "--bundle", str(phantom_bundle),
               "--spool", str(tmp_path / "spool"), "--destination", f"PACS@127.0.0.1:{pacs.port}",
               "--allow", "MODALITY@127.0.0.1", "--port", str(port), "--pseudonym-key-file", str(key), "--device", "cpu"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: proc.poll() is not None or echo(port) == 0x0000, 120), "the listener never answered"
        assert proc.poll() is None
        assert send(port, dx(tmp_path, "one")) == [0x0000]
        assert wait_for(lambda: len(pacs.received) == 2)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        pacs.stop()
    assert proc.returncode == 0, err[-2000:]
    assert "cxrtune pacs listener CXRTUNE on 127.0.0.1" in out and PATIENT not in out + err
    assert "INFO cxrtune.pacs: scored ins-" in err  # without -v a service still says what it scored
    status = json.loads(cli_in_process("pacs", "status", "--spool", str(tmp_path / "spool")).stdout)
    assert status == {"incoming": 0, "outbox": 0, "parked": 0, "bytes": 0, "parked_reasons": {},
                      "poll": {"handled": 0, "failing": 0, "parked": 0, "parked_reasons": {}, "released": 0}}
    assert "0 parked result(s) queued again" in cli_in_process("pacs", "retry", "--spool", str(tmp_path / "spool")).stdout


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["spooled", "scored"])
def test_a_listener_killed_mid_way_loses_nothing_and_a_resend_is_the_same_objects(phantom_bundle, tmp_path, kill_at):
    """`cxrtune pacs listen` killed after spooling (before its C-STORE response) or after scoring
    (before sending): restarted on the same spool, every result arrives; the modality's resend of
    the image it got no answer for gives the same SR and SEG (the same UIDs), not new ones."""
    import os
    import subprocess
    import sys

    pacs, port = Destination(), free_port()
    source = dx(tmp_path, "one")
    command = [sys.executable, "-m", "cxrtune.cli", "pacs", "listen", "--bundle", str(phantom_bundle),
               "--spool", str(tmp_path / "spool"), "--destination", f"PACS@127.0.0.1:{pacs.port}",
               "--allow", "MODALITY@127.0.0.1", "--port", str(port), "--device", "cpu"]
    env = {**os.environ, "CXRTUNE_PSEUDONYM_KEY": KEY.decode()}

    def start(**extra) -> subprocess.Popen:
        proc = subprocess.Popen(command, env={**env, **extra}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        assert wait_for(lambda: proc.poll() is not None or echo(port) == 0x0000, 120), "the listener never answered"
        return proc
    try:
        doomed = start(CXRTUNE_PACS_KILL_AT=kill_at)
        first = send(port, source)
        assert doomed.wait(timeout=120) == 137  # killed where it was told
        assert first == ("aborted" if kill_at == "spooled" else [0x0000])
        left = Spool(tmp_path / "spool").status()
        assert (left.incoming, left.outbox) == ((1, 0) if kill_at == "spooled" else (1, 2))
        restarted = start()
        try:
            if kill_at == "spooled":
                assert send(port, source) == [0x0000]  # the modality resends what got no answer
            assert wait_for(lambda: {ds.SOPInstanceUID for ds in pacs.received} and
                            Spool(tmp_path / "spool").status().incoming == 0 and
                            Spool(tmp_path / "spool").status().outbox == 0, 90)
        finally:
            restarted.terminate()
            restarted.wait(timeout=60)
    finally:
        pacs.stop()
    uids = [ds.SOPInstanceUID for ds in pacs.received]
    assert len(set(uids)) == 2 and len(uids) >= 2  # one SR and one SEG, however often delivered
    assert sorted(ds.Modality for ds in pacs.received[:2]) == ["SEG", "SR"]


def test_mutual_tls_in_and_out(scorer, tmp_path):
    """With TLS the listener takes associations only over TLS from a caller with a trusted
    certificate, and sends its results over TLS; a plain connection and a caller without a
    certificate get nothing."""
    import ssl

    from cxrtune.pacs.listener import TlsSettings
    from tests.conftest import self_signed_certificate

    cert, key = self_signed_certificate(tmp_path)  # one CA-signed-by-itself identity for all three here
    tls = TlsSettings(str(cert), str(key), str(cert))
    received: list = []
    pacs_ae = AE(ae_title="PACS")
    for uid in (SR_STORAGE, SEG_STORAGE):
        pacs_ae.add_supported_context(uid, ExplicitVRLittleEndian)
    pacs_port = free_port()
    pacs = pacs_ae.start_server(("127.0.0.1", pacs_port), block=False, ssl_context=tls.server_context(),
                                evt_handlers=[(evt.EVT_C_STORE, lambda e: received.append(e.dataset) or 0x0000)])
    scp = listener(scorer, tmp_path / "spool", Peer("PACS", "127.0.0.1", pacs_port), tls=tls)
    try:
        def store(ctx: ssl.SSLContext | None) -> list[int] | str:
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(DX_FOR_PRESENTATION, ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", scp.settings.port, ae_title="CXRTUNE",
                                 tls_args=(ctx, "127.0.0.1") if ctx else None)
            if not assoc.is_established:
                return "failed"
            try:
                return [int(assoc.send_c_store(dx(tmp_path, "tls")).Status)]
            finally:
                assoc.release()
        anonymous = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))  # trusts it, shows nothing
        assert store(None) == "failed" and store(anonymous) == "failed"
        assert store(tls.client_context()) == [0x0000]
        assert wait_for(lambda: len(received) == 2)  # delivered over TLS to a TLS-only PACS
    finally:
        scp.stop()
        pacs.shutdown()
    key.chmod(0o644)
    from cxrtune.errors import CxrtuneError
    with pytest.raises(CxrtuneError, match="may be read by others"):
        tls.server_context()


def test_a_jpeg_2000_image_is_received_and_answered(scorer, tmp_path):
    """pydicom-data's CR chest PA in JPEG 2000 Lossless (a new instance), sent in its own transfer
    syntax: received, decoded, and its SR delivered (its SEG too unless the record is unscored)."""
    from pydicom.uid import JPEG2000Lossless

    pacs = Destination()
    scp = listener(scorer, tmp_path / "spool", pacs.peer())
    try:
        ds = pydicom.dcmread(get_testdata_file("RG1_J2KR.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless and ds.SOPClassUID == CR_IMAGE
        assert send_compressed(scp.settings.port, ds) == 0x0000
        assert wait_for(lambda: any(r.Modality == "SR" for r in pacs.received), 90), scp.spool.status()
        sr = next(r for r in pacs.received if r.Modality == "SR")
        assert sr.StudyInstanceUID == ds.StudyInstanceUID
    finally:
        scp.stop()
        pacs.stop()


def test_a_destination_without_the_seg_class_parks_the_seg_and_the_sender_goes_on(scorer, tmp_path):
    """A PACS that takes SR but not SEG: the SR arrives, the SEG is parked with that reason, and the
    sender keeps delivering (a later image's SR arrives too); a warning status is a delivery."""
    pacs = Destination(status=0xB006, accepts=(SR_STORAGE,))  # elements discarded: stored, with a warning
    scp = listener(scorer, tmp_path / "spool", pacs.peer(), max_attempts=1)
    try:
        assert send(scp.settings.port, dx(tmp_path, "one")) == [0x0000]
        assert wait_for(lambda: scp.spool.status().parked == 1 and len(pacs.received) == 1), scp.spool.status()
        assert scp.spool.status().parked_reasons == {"the destination accepts no Segmentation Storage": 1}
        assert send(scp.settings.port, dx(tmp_path, "two")) == [0x0000]
        assert wait_for(lambda: len(pacs.received) == 2 and scp.spool.status().parked == 2)
        assert {r.Modality for r in pacs.received} == {"SR"}
    finally:
        scp.stop()
        pacs.stop()


def test_callers_are_allowed_as_ae_and_address_pairs(scorer, tmp_path):
    """MODALITY may call from 127.0.0.1 and OTHER from 127.0.0.2; OTHER calling from 127.0.0.1
    (another caller's address) is rejected."""
    pacs = Destination()
    scp = listener(scorer, tmp_path / "spool", pacs.peer(),
                   callers=(Peer("MODALITY", "127.0.0.1"), Peer("OTHER", "127.0.0.2")))
    try:
        assert send(scp.settings.port, dx(tmp_path, "a"), calling="OTHER") == "rejected"
        assert send(scp.settings.port, dx(tmp_path, "b"), calling="OTHER", source="127.0.0.2") == [0x0000]
        assert wait_for(lambda: len(pacs.received) == 2)
        assert scp.spool.status().incoming == 0
    finally:
        scp.stop()
        pacs.stop()


def test_associations_past_the_limit_are_rejected(scorer, tmp_path):
    """With two associations open, a third gets A-ASSOCIATE-RJ (transient, local limit exceeded);
    once one is released, a caller gets in again."""
    pacs = Destination()
    scp = listener(scorer, tmp_path / "spool", pacs.peer(), max_associations=2)
    held = []
    try:
        for _ in range(2):
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(VERIFICATION)
            held.append(ae.associate("127.0.0.1", scp.settings.port, ae_title="CXRTUNE"))
        assert all(assoc.is_established for assoc in held)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(VERIFICATION)
        third = ae.associate("127.0.0.1", scp.settings.port, ae_title="CXRTUNE")
        assert third.is_rejected
        assert (third.acceptor.primitive.result, third.acceptor.primitive.result_source,
                third.acceptor.primitive.diagnostic) == (0x02, 0x03, 0x02)
        held.pop().release()
        assert wait_for(lambda: echo(scp.settings.port) == 0x0000, 10)
    finally:
        for assoc in held:
            assoc.release()
        scp.stop()
        pacs.stop()


def test_a_full_spool_answers_out_of_resources_and_keeps_what_it_has(scorer, tmp_path):
    """The destination is down, so the first image's SR and SEG stay in the outbox and fill the
    spool past its limit: the next C-STORE is answered 0xA700 (out of resources) and not spooled."""
    down = Peer("PACS", "127.0.0.1", free_port())  # nothing listens there
    scp = listener(scorer, tmp_path / "spool", down, max_spool_bytes=10_000, backoff_s=60)
    try:
        assert send(scp.settings.port, dx(tmp_path, "first")) == [0x0000]
        assert wait_for(lambda: scp.spool.status().outbox == 2), scp.spool.status()
        assert scp.spool.used_bytes() > 10_000
        assert send(scp.settings.port, dx(tmp_path, "second")) == [0xA700]
        status = scp.spool.status()
        assert (status.incoming, status.outbox) == (0, 2)  # the first image's results kept, the second not taken
    finally:
        scp.stop()


def test_an_instance_whose_scoring_fails_is_parked_with_its_reason_and_pacs_retry_scores_it_again(tmp_path):
    """`pacs status` names why a received instance was parked (its sidecar sits beside it), and
    `pacs retry` puts it back among the instances to score, bytes unchanged, never in the outbox."""
    spool = Spool(tmp_path / "spool")
    path = spool.receive("1.2.3.4", b"not really DICOM")
    spool.park_received(path, "scoring failed: RuntimeError")
    status = spool.status()
    assert (status.incoming, status.parked, status.parked_reasons) == (0, 1, {"scoring failed: RuntimeError": 1})
    assert spool.retry_parked() == (0, 1)
    status = spool.status()
    assert (status.incoming, status.outbox, status.parked) == (1, 0, 0)  # an input is never sent to the PACS
    assert [p.read_bytes() for p in spool.received()] == [b"not really DICOM"]
    assert list(spool.folder("parked").iterdir()) == []  # its reason went with it


def test_opening_a_running_listeners_spool_does_not_touch_its_writes_in_flight(scorer, tmp_path):
    """`pacs status` opens the spool of a running listener: a write in flight (in tmp/) is left
    alone; what a crash left there is removed when a listener starts on the spool."""
    spool = Spool(tmp_path / "spool")
    in_flight = spool.folder("tmp") / "x.dcm.0123.part"
    in_flight.write_bytes(b"half")
    Spool(tmp_path / "spool").status()
    open_spool(tmp_path / "spool")
    assert in_flight.exists()
    pacs = Destination()
    scp = listener(scorer, tmp_path / "spool", pacs.peer())
    try:
        assert not in_flight.exists()
    finally:
        scp.stop()
        pacs.stop()


def test_a_permanent_c_store_failure_is_parked_at_once(scorer, tmp_path):
    """0xC000 (cannot understand) will not mend by retrying: parked after one try, not twenty."""
    pacs = Destination(status=0xC000)
    scp = listener(scorer, tmp_path / "spool", pacs.peer(), backoff_s=60)
    try:
        assert send(scp.settings.port, dx(tmp_path, "one")) == [0x0000]
        assert wait_for(lambda: scp.spool.status().parked == 2, 30), scp.spool.status()
        assert scp.spool.status().parked_reasons == {"C-STORE status 0xC000": 2}
    finally:
        scp.stop()
        pacs.stop()


class BrokenScorer:
    """A scorer that fails unexpectedly, with a patient value in its message."""

    def score_scans(self, scans):
        raise RuntimeError(f"cannot score {MARKERS['PatientID']}")


def test_an_instance_the_scorer_fails_on_is_parked_and_the_worker_goes_on(tmp_path, caplog):
    """The worker parks what raised (by its exception's type: the message is not logged) and
    scores the next instance."""
    caplog.set_level(logging.DEBUG)
    pacs = Destination()
    scp = listener(BrokenScorer(), tmp_path / "spool", pacs.peer())
    try:
        assert send(scp.settings.port, dx(tmp_path, "one", **MARKERS), dx(tmp_path, "two")) == [0x0000, 0x0000]
        assert wait_for(lambda: scp.spool.status().parked == 2, 30), scp.spool.status()
        assert scp.spool.status().parked_reasons == {"scoring failed: RuntimeError": 2}
        assert scp._threads[0].is_alive()  # the worker is still there
    finally:
        scp.stop()
        pacs.stop()
    assert "scoring a spooled instance failed (RuntimeError): parked" in caplog.text
    assert_no_marker(caplog.text)


def jpeg_dx(tmp_path: Path, name: str, **tags) -> pydicom.Dataset:
    """A phantom DX (:func:`dx`) compressed as JPEG Baseline (OpenCV's encoder, 8-bit)."""
    import cv2
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    ds = dx(tmp_path, name, **tags)
    pixels = (ds.pixel_array >> 4).astype(np.uint8)  # 12-bit to 8-bit
    ok, jpeg = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok and jpeg.tobytes()[:2] == b"\xff\xd8"
    ds.PixelData = encapsulate([jpeg.tobytes()])
    ds["PixelData"].VR = "OB"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return ds


def test_a_jpeg_baseline_image_is_received_scored_and_answered(scorer, tmp_path):
    """A phantom DX compressed as JPEG Baseline (OpenCV's encoder, 8-bit), sent in that transfer
    syntax: received as sent, decoded, scored; its SR and SEG delivered."""
    ds = jpeg_dx(tmp_path, "jpeg")
    pacs = Destination()
    scp = listener(scorer, tmp_path / "spool", pacs.peer())
    try:
        assert send_compressed(scp.settings.port, ds) == 0x0000
        assert wait_for(lambda: len(pacs.received) == 2, 90), scp.spool.status()
        assert sorted(r.Modality for r in pacs.received) == ["SEG", "SR"]  # decoded and scored
    finally:
        scp.stop()
        pacs.stop()


def test_a_jpeg_lossless_image_is_received_decoded_and_answered(scorer, tmp_path):
    """pydicom-data's JPEG Lossless SV1 image (an ultrasound frame, relabelled a chest DX: no
    encoder for this syntax is at hand), sent in its transfer syntax: received, decoded, and its SR
    delivered (the record may be unscored: it is not a radiograph)."""
    from pydicom.uid import JPEGLosslessSV1

    ds = pydicom.dcmread(get_testdata_file("JPGLosslessP14SV1_1s_1f_8b.dcm"))
    assert ds.file_meta.TransferSyntaxUID == JPEGLosslessSV1
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition, ds.ImageType = "DX", "CHEST", "PA", ["ORIGINAL", "PRIMARY"]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    pacs = Destination()
    scp = listener(scorer, tmp_path / "spool", pacs.peer())
    try:
        assert send_compressed(scp.settings.port, ds) == 0x0000
        assert wait_for(lambda: any(r.Modality == "SR" for r in pacs.received), 90), scp.spool.status()
        sr = next(r for r in pacs.received if r.Modality == "SR")
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert evidence.ReferencedSOPInstanceUID == ds.SOPInstanceUID
    finally:
        scp.stop()
        pacs.stop()


class Answering:
    """An HTTP server on 127.0.0.1 that answers every POST with ``status`` and the JSON error
    ``error``: a served scorer that is misconfigured, not yet deployed, or refusing the input."""

    def __init__(self, status: int, error: str = "answered by the test"):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.dumps({"error": error}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()


@pytest.mark.parametrize(("status", "error", "outcome"), [
    (404, "Not Found", "kept"), (502, "Bad Gateway", "kept"), (401, "missing or wrong X-API-Key", "kept"),
    (503, "the scorer is at capacity; retry shortly", "kept"), (408, "Request timed out", "deferred"),
    (503, "a scoring replica failed; retry shortly", "deferred"),
    (422, "DICOM not scorable: non-frontal view", "skipped"),
    (422, "cannot decode the image: cannot decode DICOM pixel data", "parked"), (413, "too large", "parked"),
    (415, "not PNG, JPEG or DICOM", "parked"), (500, "internal error", "parked")])
def test_through_an_endpoint_only_a_refusal_by_the_rules_drops_a_spooled_instance(tmp_path, status, error, outcome):
    """The C-STORE was answered success, so nothing may be lost: a wrong URL (404), a proxy while the
    app deploys (502) or a wrong key (401) keep the instance for a later try; what the scorer cannot
    take as it is (an undecodable or oversized file, a 500) is parked with the answer; only a 422
    refusal by the DICOM rules skips it. An answer that may be the instance's doing (408, replicas that
    died under it) defers that instance alone, its try counted, so the instances behind it go on."""
    endpoint = Answering(status, error)
    settings = ListenerSettings(ae_title="CXRTUNE", host="127.0.0.1", port=free_port(), callers=(),
                                destination=Peer("PACS", "127.0.0.1", free_port()), endpoint=endpoint.url)
    scp = PacsListener(settings, open_spool(tmp_path / "spool"), None, KEY, api_key="k" * 32)
    try:
        path = scp.spool.receive("1.2.3", to_bytes(dx(tmp_path, "one")))
        assert scp.score_one(path) is (outcome != "kept")
        status_now = scp.spool.status()
        assert (status_now.incoming, status_now.parked) == {"kept": (1, 0), "deferred": (1, 0), "skipped": (0, 0),
                                                            "parked": (0, 1)}[outcome]
        tries = scp.spool.attempts(path)
        assert (tries.attempts, tries.last_error) == ((1, f"deferred: HTTP {status}") if outcome == "deferred" else (0, ""))
        assert scp.spool.received() == ([] if outcome == "deferred" else [path][:status_now.incoming])  # waits its backoff
        if outcome == "parked":
            assert status_now.parked_reasons == {f"cannot score: HTTP {status} {error}": 1}
    finally:
        endpoint.stop()


def test_an_undecodable_instance_is_parked_and_pacs_retry_scores_it_again(scorer, tmp_path, caplog):
    """Pixel data that cannot be decoded here (a corrupt file, a codec missing) is not a refusal by
    the rules: the instance is parked with its reason, not deleted, and `pacs retry` brings it back."""
    source = dx(tmp_path, "broken", **MARKERS)
    source.PixelData = source.PixelData[:100]  # the header says 128 x 128 x 16 bits
    scp = listener(scorer, tmp_path / "spool", Peer("PACS", "127.0.0.1", free_port()))
    try:
        assert send(scp.settings.port, source) == [0x0000]
        assert wait_for(lambda: scp.spool.status().parked == 1, 30), scp.spool.status()
        reasons = scp.spool.status().parked_reasons
        assert len(reasons) == 1 and next(iter(reasons)).startswith("cannot score: cannot decode DICOM pixel data")
        scp.stop()  # stopped, so that the retried instance is not parked again at once
        assert scp.spool.retry_parked() == (0, 1) and scp.spool.status().incoming == 1
    finally:
        scp.stop()
    assert_no_marker(caplog.text)


def test_a_spool_write_that_fails_answers_out_of_resources(scorer, tmp_path, monkeypatch):
    """A full disk while spooling is answered 0xA700 (out of resources: the modality retries), not a
    0xCxxx failure, which many modalities do not resend."""
    import errno

    scp = listener(scorer, tmp_path / "spool", Peer("PACS", "127.0.0.1", free_port()))
    try:
        def full(*args):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(scp.spool, "receive", full)
        assert send(scp.settings.port, dx(tmp_path, "one")) == [0xA700]
    finally:
        scp.stop()


def test_the_worker_and_the_sender_outlive_a_failing_spool(scorer, tmp_path, monkeypatch):
    """A spool operation that fails outside one instance's handling (a full disk while listing or
    recording) is logged, and both threads go on: the next instance is scored and delivered."""
    pacs = Destination()
    scp = listener(scorer, tmp_path / "spool", pacs.peer())
    failures = {"received": 3, "due": 3}
    try:
        for name in failures:
            real = getattr(scp.spool, name)

            def flaky(*args, _name=name, _real=real, **kwargs):
                if failures[_name] > 0:
                    failures[_name] -= 1
                    raise OSError("disk full")
                return _real(*args, **kwargs)

            monkeypatch.setattr(scp.spool, name, flaky)
        assert wait_for(lambda: failures == {"received": 0, "due": 0}, 30)
        assert all(thread.is_alive() for thread in scp._threads)
        assert send(scp.settings.port, dx(tmp_path, "one")) == [0x0000]
        assert wait_for(lambda: len(pacs.received) == 2, 60), scp.spool.status()
    finally:
        scp.stop()
        pacs.stop()


@pytest.mark.parametrize(("url", "allowed"), [("https://scorer.hospital.example:8000", True),
                                              ("http://127.0.0.1:8000", True), ("http://localhost:8000", True),
                                              ("http://[::1]:8000", True), ("http://scorer.hospital.example:8000", False),
                                              ("http://10.1.2.3:8000", False), ("ftp://127.0.0.1", False)])
def test_the_endpoint_must_not_carry_the_key_in_clear_across_the_network(url, allowed):
    from cxrtune.errors import CxrtuneError
    from cxrtune.pacs.listener import check_endpoint

    if allowed:
        check_endpoint(url)
    else:
        with pytest.raises(CxrtuneError, match="in clear"):
            check_endpoint(url)
        with pytest.raises(CxrtuneError, match="in clear"):  # the listener's settings check it
            ListenerSettings(ae_title="CXRTUNE", host="127.0.0.1", port=11112, callers=(),
                             destination=Peer("PACS", "127.0.0.1"), endpoint=url)


def test_a_full_disk_while_queuing_results_retries_the_instance_instead_of_parking_it(scorer, tmp_path, monkeypatch):
    """ENOSPC while the results are queued is the spool's fault, not the instance's: the worker
    waits and scores it again, and it is delivered once the disk has room; nothing is parked."""
    import errno

    pacs = Destination()
    scp = listener(scorer, tmp_path / "spool", pacs.peer())
    real, full = scp.spool.enqueue, {"left": 2}

    def enqueue(objects):
        if full["left"] > 0:
            full["left"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(objects)

    monkeypatch.setattr(scp.spool, "enqueue", enqueue)
    try:
        assert send(scp.settings.port, dx(tmp_path, "one")) == [0x0000]
        assert wait_for(lambda: len(pacs.received) == 2, 60), scp.spool.status()
        assert full["left"] == 0 and scp.spool.status().parked == 0
    finally:
        scp.stop()
        pacs.stop()


def test_an_instance_the_scorer_keeps_deferring_holds_up_nothing_and_is_parked_after_its_tries(tmp_path, monkeypatch):
    """An instance under which the served scorer's replicas keep dying (or that keeps timing out)
    does not block the queue: the instance behind it is scored in the same pass, and the deferred
    one is tried again after its backoff, then parked with its reason after ``max_attempts``
    (``pacs retry`` scores it again)."""
    settings = ListenerSettings(ae_title="CXRTUNE", host="127.0.0.1", port=free_port(), callers=(),
                                destination=Peer("PACS", "127.0.0.1", free_port()), endpoint="http://127.0.0.1:9",
                                max_attempts=2, backoff_s=0.0)
    scp = PacsListener(settings, open_spool(tmp_path / "spool"), None, KEY, api_key="k" * 32)
    deferred = to_bytes(dx(tmp_path, "first"))
    first = scp.spool.receive("1.2.3", deferred)
    os.utime(first, (1, 1))  # the oldest: scored first
    second = scp.spool.receive("1.2.4", to_bytes(dx(tmp_path, "second")))
    tried = []

    def over_http(data, who):
        tried.append(data == deferred)
        if data == deferred:
            raise ScoreLater("HTTP 503", this_instance=True)
        return []

    monkeypatch.setattr(scp, "_over_http", over_http)
    scp._score_received()
    assert tried == [True, False] and not second.exists()  # the second went on past the first
    assert scp.spool.status().incoming == 1 and scp.spool.attempts(first).attempts == 1
    scp._score_received()  # its second try: parked, never dropped
    status = scp.spool.status()
    assert (status.incoming, status.parked, status.parked_reasons) == (0, 1, {"deferred: HTTP 503": 1})
    assert scp.spool.retry_parked() == (0, 1) and scp.spool.received()[0].read_bytes() == deferred
    assert scp.spool.attempts(scp.spool.received()[0]).attempts == 0  # its tries start again
