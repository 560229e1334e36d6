"""The listener against a real PACS (issue 22, item 5a and 5c): Debian's Orthanc on 127.0.0.1 with
temporary storage. An image uploaded to Orthanc is C-STOREd by Orthanc to `cxrtune pacs listen`
(a modality added over Orthanc's REST API); the SR and SEG appear in the same study in Orthanc
and read back to what the library scores for the same file. Skips with the reason where Orthanc
is not installed."""

import datetime
import io
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import highdicom as hd
import prometheus_client
import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from cxrtune.pacs.listener import ListenerSettings, PacsListener, Peer
from cxrtune.pacs.results import SCORE, STATUS, ZONE_AFFECTED, to_bytes
from cxrtune.pacs.spool import Spool, open_spool
from cxrtune.preprocessing import load_scan
from cxrtune.scoring.scorer import load_bundle
from tests.conftest import free_port
from tests.test_pacs_listener import KEY, MARKERS, PATIENT, assert_no_marker, dx, wait_for
from tests.test_pacs_results import source_copy

ORTHANC = "/usr/sbin/Orthanc"
SHARED_DICOM = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """Orthanc with the DICOMweb plugin, HTTP and DICOM on free ports of 127.0.0.1, remote access
    off: ``(REST base URL, its DICOM Peer)``."""
    if not Path(ORTHANC).exists() or not Path(DICOMWEB_PLUGIN).exists():
        pytest.skip("Orthanc or its DICOMweb plugin is not installed (Debian's orthanc and orthanc-dicomweb; "
                    ".ci/run installs them)")
    root = tmp_path_factory.mktemp("orthanc")
    http_port, dicom_port = free_port(), free_port()
    config = {"Name": "cxrtune-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
              "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
              "HttpBindAddress": "127.0.0.1", "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
              "DicomAlwaysAllowStore": True, "DicomModalitiesInDatabase": True, "ExecuteLuaEnabled": False,
              "RestApiWriteToFileSystemEnabled": False, "StorageCompression": False,
              "Plugins": [DICOMWEB_PLUGIN],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (root / "config.json").write_text(json.dumps(config))
    log = open(root / "orthanc.log", "w")
    proc = subprocess.Popen([ORTHANC, str(root / "config.json")], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"

    def up() -> bool:
        try:
            return requests.get(f"{url}/system", timeout=2).ok
        except requests.ConnectionError:
            return False
    if not wait_for(lambda: proc.poll() is not None or up(), 60) or proc.poll() is not None:
        proc.kill()  # installed but not starting: a broken configuration fails, it does not skip
        pytest.fail(f"Orthanc did not start: {(root / 'orthanc.log').read_text()[-500:]}")
    yield url, Peer("ORTHANC", "127.0.0.1", dicom_port)
    proc.terminate()
    proc.wait(timeout=30)
    log.close()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def scp(orthanc, phantom_bundle, tmp_path_factory):
    """`pacs listen` for Orthanc: Orthanc may call it, and it sends its results to Orthanc; Orthanc
    knows it as the modality ``cxrtune``."""
    url, peer = orthanc
    settings = ListenerSettings("CXRTUNE", "127.0.0.1", free_port(), callers=(Peer("ORTHANC", "127.0.0.1"),),
                                destination=peer, backoff_s=0.2, poll_s=0.05)
    listener = PacsListener(settings, open_spool(tmp_path_factory.mktemp("spool") / "spool"),
                            load_bundle(str(phantom_bundle), device="cpu"), KEY).start()
    requests.put(f"{url}/modalities/cxrtune", json={"AET": "CXRTUNE", "Host": "127.0.0.1", "Port": settings.port},
                 timeout=10).raise_for_status()
    yield listener
    listener.stop()


def upload_and_send(url: str, ds: pydicom.Dataset) -> str:
    """Upload to Orthanc, then have Orthanc C-STORE it to the listener: Orthanc's study id."""
    stored = requests.post(f"{url}/instances", data=to_bytes(ds), timeout=30)
    stored.raise_for_status()
    instance = stored.json()["ID"]
    sent = requests.post(f"{url}/modalities/cxrtune/store", json={"Resources": [instance], "Synchronous": True},
                         timeout=60)
    sent.raise_for_status()
    return requests.get(f"{url}/instances/{instance}/study", timeout=10).json()["ID"]


def study_objects(url: str, study: str) -> list[pydicom.Dataset]:
    out = []
    for item in requests.get(f"{url}/studies/{study}/instances", timeout=10).json():
        out.append(pydicom.dcmread(io.BytesIO(requests.get(f"{url}/instances/{item['ID']}/file", timeout=30).content)))
    return out


def assert_results_in_orthanc(url: str, study: str, ds: pydicom.Dataset, record: dict) -> dict[str, pydicom.Dataset]:
    """The study in Orthanc holds ``ds`` and its results, which read back to ``record`` (what
    `cxrtune score` gives the same file): score, status, zones and the references to ``ds``.
    Returns the study's objects by modality."""
    objects = {o.Modality: o for o in study_objects(url, study)}
    sr = objects["SR"]
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert evidence.ReferencedSOPInstanceUID == ds.SOPInstanceUID and sr.StudyInstanceUID == ds.StudyInstanceUID
    groups = {str(g.tracking_identifier): g
              for g in hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_image_measurement_groups()}
    assert [q.value.meaning for q in groups["image"].get_qualitative_evaluations(name=STATUS)] == \
        [f"cxrtune result {record['status']}"]
    assert [m.value for m in groups["image"].get_measurements(name=SCORE)] == \
        ([float(record["score"])] if record["status"] == "scored" else [])
    for letter, zone in (record["zones"] or {}).items():
        if zone["affected"] is not None:
            assert [q.value.meaning for q in groups[f"zone {letter}"].get_qualitative_evaluations(
                name=ZONE_AFFECTED)] == ["Yes" if zone["affected"] else "No"]
    if record["status"] != "unscored":
        seg = objects["SEG"]
        assert seg.StudyInstanceUID == ds.StudyInstanceUID
        assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
            ds.SOPInstanceUID
    return objects


def test_orthanc_sends_an_image_and_gets_its_sr_and_seg_in_the_same_study(orthanc, scp, phantom_bundle, tmp_path):
    url, _ = orthanc
    sources = [source_copy("CXRTUNE^ORTHANC", 7), dx(tmp_path, "dx")]  # pydicom-data's CR chest PA, a phantom DX
    expected = []
    scorer = load_bundle(str(phantom_bundle), device="cpu")
    for ds in sources:
        (record, _), = scorer.score_scans([load_scan(to_bytes(ds))])  # what `cxrtune score` gives the same file
        expected.append(record)
        study = upload_and_send(url, ds)
        want = 2 if record["status"] == "unscored" else 3  # the image, its SR, and its SEG when scored
        assert wait_for(lambda: len(study_objects(url, study)) == want, 90), (record["status"], scp.spool.status())
        assert_results_in_orthanc(url, study, ds, record)
    assert [r["status"] for r in expected] == ["scored", "scored"]  # both went the whole way, SEG included


def test_a_secondary_capture_sent_by_orthanc_is_skipped_and_gets_no_result(orthanc, scp, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="cxrtune.pacs")
    url, _ = orthanc
    capture = dx(tmp_path, "sc", SOPClassUID="1.2.840.10008.5.1.4.1.1.7")
    capture.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    captures = [capture]
    # the real secondary captures of chest radiographs in ../shared/data/dicom, when it is there
    # (its two files are one instance, MONOCHROME1 and 2: each gets its own study, series and instance)
    for path in sorted(SHARED_DICOM.glob("*.dcm")) if SHARED_DICOM.is_dir() else []:
        shared = pydicom.dcmread(path)
        shared.StudyInstanceUID, shared.SeriesInstanceUID = generate_uid(), generate_uid()
        shared.SOPInstanceUID = shared.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        captures.append(shared)
    studies = [upload_and_send(url, ds) for ds in captures]
    assert wait_for(lambda: scp.spool.status().incoming == 0)
    time.sleep(1.0)
    assert scp.spool.status().outbox == 0
    assert [len(study_objects(url, study)) for study in studies] == [1] * len(captures)  # each capture alone
    assert caplog.text.count("skipped ins-") == len(captures) and "secondary capture" in caplog.text
    assert PATIENT not in caplog.text


class DicomwebProxy:
    """An HTTP proxy in front of Orthanc's DICOMweb (GETs only): with ``status``, every WADO-RS
    retrieval is answered that (a server that finds instances but cannot deliver them); with
    ``page_cap``, a QIDO-RS search returns at most that many results whatever its ``limit`` (a
    server capping its pages); with ``qido_status`` (modality -> status), a search for that
    modality is answered that status."""

    def __init__(self, upstream: str, status: int | None = None, page_cap: int | None = None,
                 qido_status: dict[str, int] | None = None):
        import http.server
        import threading

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path
                if page_cap is not None and "/instances?" in path and "/studies/" not in path:  # QIDO-RS
                    path = re.sub(r"limit=\d+", f"limit={page_cap}", path)
                failing = next((code for modality, code in (qido_status or {}).items()
                                if "/instances?" in path and f"Modality={modality}" in path), None)
                if failing is not None or (status is not None and "/studies/" in path):  # refused
                    outer.refused += 1
                    self.send_response(failing if failing is not None else status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                answer = requests.get(upstream + path, headers={"Accept": self.headers.get("Accept", "*/*")},
                                      timeout=30)
                self.send_response(answer.status_code)
                self.send_header("Content-Type", answer.headers.get("Content-Type", "application/dicom+json"))
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

        self.refused = 0
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()


def today(days_ago: int = 0) -> str:
    return (datetime.date.today() - datetime.timedelta(days=days_ago)).strftime("%Y%m%d")


def test_pacs_poll_finds_new_instances_over_dicomweb_and_stores_results(orthanc, scp, tmp_path, caplog, recwarn):
    """QIDO-RS finds today's DX instances (earlier tests' have no Study Date, or an old one), WADO-RS
    brings each, STOW-RS stores its SR, SEG and (asked for) overlay in its study; a second poll finds
    nothing new; a lateral is skipped by the DICOM rules. At DEBUG, no patient marker and no UID of
    the image is logged (dicomweb-client and urllib3 log URLs holding UIDs)."""
    import logging

    from cxrtune.pacs.poll import DicomwebPoller, PollSettings
    from cxrtune.pacs.spool import Spool

    caplog.set_level(logging.DEBUG)
    url, _ = orthanc
    frontal, lateral = dx(tmp_path, "polled", StudyDate=today(), **MARKERS), dx(tmp_path, "side", StudyDate=today(),
                                                                                  ViewPosition="LL")
    chest_cr = source_copy("CXRTUNE^POLLED", 11)  # pydicom-data's CR chest PA, as in 5a
    # and in JPEG 2000, which this Orthanc (no GDCM plugin) cannot transcode: retrieved as stored
    chest_j2k = source_copy("CXRTUNE^POLLEDJ2K", 12, "RG1_J2KR.dcm")
    chest_cr.StudyDate = chest_j2k.StudyDate = today()
    studies = []
    for ds in (frontal, lateral, chest_cr, chest_j2k):
        stored = requests.post(f"{url}/instances", data=to_bytes(ds), timeout=30)
        stored.raise_for_status()
        studies.append(requests.get(f"{url}/instances/{stored.json()['ID']}/study", timeout=10).json()["ID"])
    # one a page: today's two DX instances take two full pages and an empty one (paged by offset)
    poller = DicomwebPoller(PollSettings(f"{url}/dicom-web", overlay=True, page_size=1), Spool(tmp_path / "spool"),
                            scp.scorer, KEY)
    assert poller.poll_once() == {"scored": 3, "skipped": 1, "failed": 0, "parked": 0}
    objects = {o.Modality: o for o in study_objects(url, studies[0])}
    assert set(objects) == {"DX", "SR", "SEG", "OT"}  # OT: the overlay, a secondary capture
    assert objects["OT"].BurnedInAnnotation == "YES"
    (record, _), = scp.scorer.score_scans([load_scan(to_bytes(frontal))])  # what `cxrtune score` gives the file
    assert_results_in_orthanc(url, studies[0], frontal, record)
    evidence = objects["SR"].CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == frontal.SOPInstanceUID
    assert len(study_objects(url, studies[1])) == 1  # the lateral alone
    for study, ds in zip(studies[2:], (chest_cr, chest_j2k)):
        (record, _), = scp.scorer.score_scans([load_scan(to_bytes(ds))])
        assert record["status"] == "scored"
        assert_results_in_orthanc(url, study, ds, record)  # its SR and SEG
    assert poller.poll_once() == {"scored": 0, "skipped": 0, "failed": 0, "parked": 0}  # nothing new
    assert "non-frontal view" in caplog.text and PATIENT not in caplog.text
    assert_no_marker(caplog.text)
    assert_no_marker(" ".join(str(w.message) for w in recwarn))  # highdicom warns quoting a name without a caret
    assert frontal.SOPInstanceUID not in caplog.text and frontal.StudyInstanceUID not in caplog.text


def test_pacs_poll_retries_a_503_then_parks_the_instance_and_retry_frees_it(orthanc, scp, tmp_path):
    """Behind a proxy whose WADO-RS answers 503, each of today's instances (the last test's too: a new
    spool has handled none) is tried twice a poll, parked after two polls, left alone while parked,
    and polled again after `pacs retry`."""
    from cxrtune.pacs.poll import DicomwebPoller, PollSettings, poll_status, retry_parked
    from cxrtune.pacs.spool import Spool

    url, _ = orthanc
    requests.post(f"{url}/instances", data=to_bytes(dx(tmp_path, "unlucky", StudyDate=today())),
                  timeout=30).raise_for_status()
    proxy = DicomwebProxy(url, status=503)
    try:
        spool = Spool(tmp_path / "spool")
        poller = DicomwebPoller(PollSettings(f"{proxy.url}/dicom-web", retries=2, backoff_s=0.01, max_attempts=2),
                                spool, scp.scorer, KEY)
        first, second = poller.poll_once(), poller.poll_once()
        assert first["failed"] >= 1 and second["parked"] == first["failed"], (first, second)
        assert proxy.refused == 2 * 2 * first["failed"]  # two tries a poll, two polls, per instance
        status = poll_status(spool)
        assert status["parked"] == first["failed"] and status["parked_reasons"] == {"WADO-RS: HTTP 503": first["failed"]}
        assert poller.poll_once() == {"scored": 0, "skipped": 0, "failed": 0, "parked": 0}  # parked: not tried again
        metrics = prometheus_client.generate_latest(poller.gauges.registry).decode()
        assert f"cxrtune_pacs_poll_parked {float(first['failed'])}" in metrics and "cxrtune_pacs_poll_failing 0.0" in metrics
        assert retry_parked(spool) == first["failed"] and poll_status(spool)["released"] == first["failed"]
    finally:
        proxy.stop()
    # released by their UIDs: polled again even by a poller whose window no longer holds them
    again = DicomwebPoller(PollSettings(f"{url}/dicom-web", modalities=("MG",)), spool, scp.scorer, KEY).poll_once()
    assert again["scored"] + again["skipped"] == first["failed"] and again["scored"] >= 1  # today's DX, this one too
    assert poll_status(spool)["released"] == 0 and poll_status(spool)["parked"] == 0


def test_pacs_poll_pages_past_a_server_that_caps_its_pages(orthanc, scp, tmp_path):
    """A server that returns fewer results than ``limit`` asks (here one a page, behind a proxy) has
    not run out: the poller goes on until a page comes back empty and finds what a direct search
    finds."""
    from cxrtune.pacs.poll import DicomwebPoller, PollSettings, PollState

    url, _ = orthanc
    for name in ("paged-1", "paged-2"):
        requests.post(f"{url}/instances", data=to_bytes(dx(tmp_path, name, StudyDate=today())),
                      timeout=30).raise_for_status()
    direct = DicomwebPoller(PollSettings(f"{url}/dicom-web"), Spool(tmp_path / "direct"), scp.scorer, KEY)
    everything = set(direct.new_instances(PollState(), datetime.date.today()))
    assert len(everything) >= 2
    proxy = DicomwebProxy(url, page_cap=1)
    try:
        capped = DicomwebPoller(PollSettings(f"{proxy.url}/dicom-web", page_size=100), Spool(tmp_path / "capped"),
                                scp.scorer, KEY)
        assert set(capped.new_instances(PollState(), datetime.date.today())) == everything
    finally:
        proxy.stop()


def test_pacs_poll_searches_from_its_cursor_after_an_outage(orthanc, scp, tmp_path):
    """An instance of a study dated five days ago, with a one-day window: a poller whose last
    complete poll was ten days ago (it was down) finds it; one that polled today does not."""
    from cxrtune.pacs.poll import DicomwebPoller, PollSettings, PollState

    url, _ = orthanc
    late = dx(tmp_path, "late", StudyDate=today(5))
    requests.post(f"{url}/instances", data=to_bytes(late), timeout=30).raise_for_status()
    poller = DicomwebPoller(PollSettings(f"{url}/dicom-web", window_days=1), Spool(tmp_path / "spool"), scp.scorer,
                            KEY)
    found = {uids[2] for uids in poller.new_instances(PollState(cursor=today(10)), datetime.date.today())}
    assert late.SOPInstanceUID in found
    found = {uids[2] for uids in poller.new_instances(PollState(cursor=today()), datetime.date.today())}
    assert late.SOPInstanceUID not in found


def test_cxrtune_pacs_poll_once_scores_prints_its_counts_and_moves_its_cursor(orthanc, phantom_bundle, tmp_path,
                                                                             monkeypatch):
    """The command itself: `cxrtune pacs poll --once` with the study key from the environment scores
    today's instances (the earlier tests' too: a new spool has handled none), prints the counts as
    JSON, records today as its cursor, and a second poll finds nothing new."""
    from tests.conftest import cli_in_process

    url, _ = orthanc
    monkeypatch.setenv("CXRTUNE_PSEUDONYM_KEY", KEY.decode())
    args = ("pacs", "poll", "--dicomweb", f"{url}/dicom-web", "--bundle", str(phantom_bundle), "--spool",
            str(tmp_path / "spool"), "--once", "--device", "cpu")
    first = json.loads(cli_in_process(*args).stdout)
    assert first["scored"] >= 2 and first["failed"] == first["parked"] == 0, first
    assert json.loads((tmp_path / "spool" / "poll_state.json").read_text())["cursor"] == today()
    assert json.loads(cli_in_process(*args).stdout) == {"scored": 0, "skipped": 0, "failed": 0, "parked": 0}


def test_pacs_poll_keeps_its_cursor_when_a_search_fails(orthanc, scp, tmp_path):
    """A poll whose DX search fails after its CR search succeeded is not complete: the cursor stays
    where it was, so the next poll searches as far back again."""
    from cxrtune.pacs.poll import STATE_FILE, DicomwebPoller, PollSettings, PollState, RetriableError

    url, _ = orthanc
    spool = Spool(tmp_path / "spool")
    spool.write_state(STATE_FILE, PollState(cursor=today(10)).to_json())
    proxy = DicomwebProxy(url, qido_status={"DX": 503})
    try:
        poller = DicomwebPoller(PollSettings(f"{proxy.url}/dicom-web", retries=1), spool, scp.scorer, KEY)
        with pytest.raises(RetriableError, match="QIDO-RS: HTTP 503"):
            poller.poll_once()
        assert proxy.refused == 1 and poller.state().cursor == today(10)
    finally:
        proxy.stop()


def test_pacs_poll_retries_a_failing_instance_by_its_uids_whatever_its_date(orthanc, scp, tmp_path):
    """An instance that failed once, of a study dated long before the search window, is retrieved by
    its UIDs at the next poll (here one that searches another modality) and handled."""
    from cxrtune.pacs.poll import STATE_FILE, DicomwebPoller, PollSettings, PollState, instance_key

    url, _ = orthanc
    old = dx(tmp_path, "failing-old", StudyDate=today(40))
    requests.post(f"{url}/instances", data=to_bytes(old), timeout=30).raise_for_status()
    uids = [old.StudyInstanceUID, old.SeriesInstanceUID, old.SOPInstanceUID]
    spool = Spool(tmp_path / "spool")
    failing = {instance_key(old.SOPInstanceUID): {"attempts": 1, "last_error": "WADO-RS: HTTP 503", "uids": uids}}
    spool.write_state(STATE_FILE, PollState(cursor=today(), failures=failing).to_json())
    poller = DicomwebPoller(PollSettings(f"{url}/dicom-web", modalities=("MG",)), spool, scp.scorer, KEY)
    assert poller.poll_once() == {"scored": 1, "skipped": 0, "failed": 0, "parked": 0}
    assert poller.state().failures == {} and instance_key(old.SOPInstanceUID) in poller.state().handled


def test_pacs_poll_asks_the_server_to_transcode_only_what_it_cannot_decode(orthanc, scp, tmp_path, monkeypatch):
    """An instance stored as JPEG Baseline, for which (pretending) cxrtune has no decoder: retrieved
    as stored, then again in Explicit VR Little Endian (Orthanc transcodes JPEG Baseline), and
    scored. Where neither decodes, the instance fails "cannot decode" (poll_once then counts it
    failed, and parks it after its polls)."""
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

    import cxrtune.pacs.poll as poll_module
    from cxrtune.errors import ImageDecodeError
    from cxrtune.pacs.poll import DicomwebPoller, PollSettings, RetriableError
    from tests.test_pacs_listener import jpeg_dx

    url, _ = orthanc
    stored = jpeg_dx(tmp_path, "stored-jpeg", StudyDate=today(3))
    requests.post(f"{url}/instances", data=to_bytes(stored), timeout=30).raise_for_status()
    seen, real = [], poll_module.load_scan

    def without_jpeg(data, *args, **kwargs):
        syntax = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID
        seen.append(syntax)
        if syntax != ExplicitVRLittleEndian:
            raise ImageDecodeError("no decoder for this transfer syntax (the test's)")
        return real(data, *args, **kwargs)

    monkeypatch.setattr(poll_module, "load_scan", without_jpeg)
    poller = DicomwebPoller(PollSettings(f"{url}/dicom-web"), Spool(tmp_path / "spool"), scp.scorer, KEY)
    uids = (stored.StudyInstanceUID, stored.SeriesInstanceUID, stored.SOPInstanceUID)
    assert poller.handle(uids) == "scored"
    assert seen == [JPEGBaseline8Bit, ExplicitVRLittleEndian]

    def never(data, *args, **kwargs):
        raise ImageDecodeError("no decoder at all (the test's)")

    monkeypatch.setattr(poll_module, "load_scan", never)
    with pytest.raises(RetriableError, match="cannot decode: no decoder at all"):
        poller.handle(uids)


@pytest.mark.slow
def test_a_listener_killed_at_either_point_delivers_every_result_to_orthanc_once(orthanc, phantom_bundle, tmp_path):
    """Item 5d against Orthanc, with `cxrtune -v pacs listen` (DEBUG logging) as a process:
    killed after spooling, before its C-STORE response (Orthanc's send fails); restarted, it
    scores the spooled image and is killed after queuing the results, before sending; restarted
    again, it delivers them. Orthanc then resends the image whose send had failed: the results are
    the same objects (the same UIDs), so the study holds the image, one SR and one SEG, which read
    back to what `cxrtune score` gives the file. No patient marker is in the listener's log."""
    import os
    import signal
    import subprocess
    import sys

    from cxrtune.pacs.results import dicom_results

    url, peer = orthanc
    port = free_port()
    requests.put(f"{url}/modalities/cxrtune-cli", json={"AET": "CXRTUNECLI", "Host": "127.0.0.1", "Port": port},
                 timeout=10).raise_for_status()
    source = dx(tmp_path, "killed", **MARKERS)
    scorer = load_bundle(str(phantom_bundle), device="cpu")
    (record, detail), = scorer.score_scans([load_scan(to_bytes(source))])
    expected = {o.SOPInstanceUID for o in dicom_results(to_bytes(source), record, detail).objects()}
    stored = requests.post(f"{url}/instances", data=to_bytes(source), timeout=30)
    stored.raise_for_status()
    instance = stored.json()["ID"]
    study = requests.get(f"{url}/instances/{instance}/study", timeout=10).json()["ID"]
    command = [sys.executable, "-m", "cxrtune.cli", "-v", "pacs", "listen", "--bundle", str(phantom_bundle),
               "--spool", str(tmp_path / "spool"), "--destination", f"{peer.ae_title}@127.0.0.1:{peer.port}",
               "--allow", "ORTHANC@127.0.0.1", "--ae-title", "CXRTUNECLI", "--port", str(port), "--device", "cpu"]
    env = {**os.environ, "CXRTUNE_PSEUDONYM_KEY": KEY.decode()}
    logs = []

    def start(kill_at: str | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(command, env={**env, **({"CXRTUNE_PACS_KILL_AT": kill_at} if kill_at else {})},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert wait_for(lambda: proc.poll() is not None or echo_as_orthanc(url) == 200, 120), "never answered"
        return proc

    def send() -> int:
        return requests.post(f"{url}/modalities/cxrtune-cli/store", json={"Resources": [instance], "Synchronous": True},
                             timeout=120).status_code

    def echo_as_orthanc(url: str) -> int:
        return requests.post(f"{url}/modalities/cxrtune-cli/echo", json={}, timeout=10).status_code

    doomed = start("spooled")
    assert send() != 200  # killed before its C-STORE response: Orthanc's send failed
    assert doomed.wait(timeout=60) == 137
    logs.append(doomed.stdout.read())
    assert Spool(tmp_path / "spool").status().incoming == 1  # yet the image was kept
    doomed = start("scored")  # scores the spooled image, then dies before sending
    assert doomed.wait(timeout=120) == 137
    logs.append(doomed.stdout.read())
    # killed after queuing, before forgetting the image: both kept (the image is scored again, to the same UIDs)
    assert (Spool(tmp_path / "spool").status().incoming, Spool(tmp_path / "spool").status().outbox) == (1, 2)
    assert len(study_objects(url, study)) == 1  # nothing sent yet
    survivor = start()
    try:
        assert wait_for(lambda: len(study_objects(url, study)) == 3, 90), Spool(tmp_path / "spool").status()
        assert send() == 200  # Orthanc resends the image it got no answer for
        # the resent image is spooled before Orthanc's send returns, and leaves incoming/ only once its
        # results are queued
        assert wait_for(lambda: (Spool(tmp_path / "spool").status().incoming,
                                 Spool(tmp_path / "spool").status().outbox) == (0, 0), 90)
        assert Spool(tmp_path / "spool").status().parked == 0, Spool(tmp_path / "spool").status()
    finally:
        survivor.send_signal(signal.SIGTERM)
        logs.append(survivor.communicate(timeout=60)[0])
    objects = study_objects(url, study)
    assert len(objects) == 3 and {o.SOPInstanceUID for o in objects if o.Modality != "DX"} == expected
    assert_results_in_orthanc(url, study, source, record)
    logged = "\n".join(logs)
    assert "INFO cxrtune.pacs: scored ins-" in logged  # the log was written below WARNING: -v is DEBUG
    assert_no_marker(logged)
    assert source.SOPInstanceUID not in logged and source.StudyInstanceUID not in logged


def test_pacs_poll_parks_an_instance_whose_scoring_fails_and_goes_on(orthanc, scp, tmp_path, caplog):
    """An unexpected failure (not a DICOMweb call's) fails that instance only: tried again next
    poll, parked after ``max_attempts``, named by its type (the message may hold patient values)."""
    import logging

    from cxrtune.pacs.poll import DicomwebPoller, PollSettings, poll_status
    from tests.test_pacs_listener import BrokenScorer

    caplog.set_level(logging.INFO, logger="cxrtune.pacs")
    url, _ = orthanc
    requests.post(f"{url}/instances", data=to_bytes(dx(tmp_path, "doomed", StudyDate=today(), **MARKERS)),
                  timeout=30).raise_for_status()
    spool = Spool(tmp_path / "spool")
    poller = DicomwebPoller(PollSettings(f"{url}/dicom-web", max_attempts=2), spool, BrokenScorer(), KEY)
    first, second = poller.poll_once(), poller.poll_once()  # today's instances: this one and earlier tests'
    assert first["failed"] >= 1 and second["parked"] == first["failed"], (first, second)
    assert poll_status(spool)["parked_reasons"] == {"failed: RuntimeError": first["failed"]}
    assert_no_marker(caplog.text)


def test_pacs_poll_retries_a_429_and_a_connection_error(orthanc, scp, tmp_path):
    """A 429 (which dicomweb-client does not retry once its retries are off) is tried again within
    the poll; a server that cannot be reached fails the search after its tries."""
    from cxrtune.pacs.poll import DicomwebPoller, PollSettings, RetriableError

    url, _ = orthanc
    requests.post(f"{url}/instances", data=to_bytes(dx(tmp_path, "busy", StudyDate=today())),
                  timeout=30).raise_for_status()
    proxy = DicomwebProxy(url, status=429)
    try:
        poller = DicomwebPoller(PollSettings(f"{proxy.url}/dicom-web", retries=3, backoff_s=0.01), Spool(tmp_path / "a"),
                                scp.scorer, KEY)
        counts = poller.poll_once()
        assert counts["failed"] >= 1 and proxy.refused == 3 * counts["failed"]  # three tries each
        assert {f["last_error"] for f in poller.state().failures.values()} == {"WADO-RS: HTTP 429"}
    finally:
        proxy.stop()
    nowhere = DicomwebPoller(PollSettings(f"http://127.0.0.1:{free_port()}/dicom-web", retries=2, backoff_s=0.01),
                             Spool(tmp_path / "b"), scp.scorer, KEY)
    with pytest.raises(RetriableError, match="QIDO-RS"):
        nowhere.poll_once()
