"""`cxrtune pacs listen` over real DICOM associations on 127.0.0.1 (issue 22, item 3): a pynetdicom
SCU plays the modality, a pynetdicom storage SCP the destination PACS; the listener scores with
the phantom bundle in process."""

import logging
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt

from cxrtune.data.phantom import make_phantom
from cxrtune.pacs.listener import (
    CR_IMAGE,
    DX_FOR_PRESENTATION,
    SECONDARY_CAPTURE,
    VERIFICATION,
    ListenerSettings,
    PacsListener,
    Peer,
)
from cxrtune.pacs.results import SCHEME, to_bytes
from cxrtune.pacs.spool import Spool, open_spool
from cxrtune.scoring.scorer import load_bundle
from tests.conftest import free_port
from tests.test_dicom import make_dicom

SR_STORAGE, SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.66.4"
PATIENT = "DOE^LISTENER^MRN4711"
KEY = b"listener-test-study-key-0123456789"


class Destination:
    """A storage SCP standing in for the PACS: keeps what it is sent, answers ``status``."""

    def __init__(self, status: int = 0x0000):
        self.status, self.received = status, []
        self.port = free_port()
        ae = AE(ae_title="PACS")
        for uid in (SR_STORAGE, SEG_STORAGE):
            ae.add_supported_context(uid, ExplicitVRLittleEndian)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event) -> int:
        if self.status in (0x0000, 0xB000):
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
    for uid in (CR_IMAGE, DX_FOR_PRESENTATION, SECONDARY_CAPTURE):
        ae.add_requested_context(uid, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRTUNE", bind_address=(source, 0))
    if not assoc.is_established:
        return "rejected" if assoc.is_rejected else "aborted"
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
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
    settings = ListenerSettings(ae_title="CXRTUNE", host="127.0.0.1", port=free_port(),
                                callers=(Peer("MODALITY", "127.0.0.1"),), destination=destination,
                                **{"backoff_s": 0.1, "poll_s": 0.05, **changes})
    return PacsListener(settings, open_spool(spool), scorer, KEY).start()


def test_received_images_are_scored_and_their_sr_and_seg_delivered(scorer, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    pacs = Destination()
    scp = listener(scorer, tmp_path / "spool", pacs.peer())
    try:
        assert echo(scp.settings.port) == 0x0000
        source = dx(tmp_path, "one")
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
    assert "scored ins-" in logged and PATIENT not in logged and "MRN4711" not in logged
    assert source.SOPInstanceUID not in logged  # pynetdicom's DEBUG lines (UIDs) are silenced


def test_what_the_dicom_rules_refuse_is_accepted_then_skipped_with_its_reason(scorer, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cxrtune.pacs")
    pacs = Destination()
    scp = listener(scorer, tmp_path / "spool", pacs.peer())
    try:
        capture = dx(tmp_path, "sc", SOPClassUID=SECONDARY_CAPTURE)
        capture.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
        lateral = dx(tmp_path, "lateral", ViewPosition="LL")
        assert send(scp.settings.port, capture, lateral) == [0x0000, 0x0000]
        assert wait_for(lambda: scp.spool.status().incoming == 0)
        time.sleep(0.5)
        assert pacs.received == [] and scp.spool.status().outbox == 0
    finally:
        scp.stop()
        pacs.stop()
    assert caplog.text.count("skipped ins-") == 2
    assert "secondary capture" in caplog.text and "non-frontal view (ViewPosition LL)" in caplog.text
    assert PATIENT not in caplog.text


def test_an_unknown_calling_ae_is_rejected_and_an_unknown_address_cut_off(scorer, tmp_path):
    pacs = Destination()
    scp = listener(scorer, tmp_path / "spool", pacs.peer())
    try:
        assert send(scp.settings.port, dx(tmp_path, "x"), calling="INTRUDER") == "rejected"  # A-ASSOCIATE-RJ
        assert send(scp.settings.port, dx(tmp_path, "y"), source="127.0.0.2") == "aborted"  # not a configured host
        assert send(scp.settings.port, dx(tmp_path, "z")) == [0x0000]  # the configured caller
        assert wait_for(lambda: len(pacs.received) == 2)
    finally:
        scp.stop()
        pacs.stop()


def test_failed_deliveries_back_off_then_park_and_pacs_retry_delivers_them(scorer, tmp_path):
    pacs = Destination(status=0xA700)  # the PACS is out of resources
    scp = listener(scorer, tmp_path / "spool", pacs.peer(), max_attempts=2)
    try:
        assert send(scp.settings.port, dx(tmp_path, "one")) == [0x0000]
        assert wait_for(lambda: scp.spool.status().parked == 2), scp.spool.status()
        assert scp.spool.status().parked_reasons == {"C-STORE status 0xA700": 2}
        pacs.status = 0xB000  # stored with coercion: a warning is a delivery
        assert scp.spool.retry_parked() == 2
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
    status = json.loads(cli_in_process("pacs", "status", "--spool", str(tmp_path / "spool")).stdout)
    assert status == {"incoming": 0, "outbox": 0, "parked": 0, "bytes": 0, "parked_reasons": {}}
    assert "0 parked result(s) queued again" in cli_in_process("pacs", "retry", "--spool", str(tmp_path / "spool")).stdout
