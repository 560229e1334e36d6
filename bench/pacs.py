"""Throughput of the PACS paths on this machine (issue 22, item 8).

    python bench/pacs.py [--bundle B] [--n 20] [--orthanc http://127.0.0.1:8042] [--serve]

Inputs: ``--n`` copies of pydicom-data's CR chest PA (1955 x 1841, 15-bit), each a new instance in
its own study. With ``--bundle`` (default: tiny random networks, whose records are unscored, so no
SEG is written: pass a trained bundle to measure the SEG too). Measures, one after the other on a
quiet machine:

* ``library``: load + score in this process, per instance (the floor under every path);
* ``dicom_results``: writing the SR and SEG of a record (``dicom_results`` + Part 10 bytes);
* ``listener``: ``pacs listen`` in this process, a pynetdicom SCU sending all instances over one
  association and a pynetdicom storage SCP receiving the results, from the first C-STORE to the
  last result delivered;
* ``poll`` (with ``--orthanc``, an Orthanc with the DICOMweb plugin): the instances uploaded to
  Orthanc dated today, then one ``pacs poll`` (QIDO, WADO, scoring, STOW) timed;
* ``http`` (with ``--serve``): the same bundle served by Ray Serve in this process (the CPU
  config's one replica per stage), each instance posted to ``/v1/score`` asking for the DICOM
  results, one at a time.

Prints one JSON object: instances per minute for each path and the latency of writing SR + SEG.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pydicom
import requests
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from serve_load import free_port

from cxrtune.pacs.listener import CR_IMAGE, ListenerSettings, PacsListener, Peer
from cxrtune.pacs.poll import DicomwebPoller, PollSettings
from cxrtune.pacs.results import DICOM_RESULTS, dicom_results, to_bytes
from cxrtune.pacs.spool import Spool
from cxrtune.preprocessing import load_scan
from cxrtune.scoring.scorer import load_bundle

KEY = b"pacs-bench-study-key-0123456789"
SR_STORAGE, SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.66.4"


def copies(n: int) -> list[pydicom.Dataset]:
    out = []
    for i in range(n):
        ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID, ds.StudyDate = f"BENCH{i:04d}", datetime.date.today().strftime("%Y%m%d")
        out.append(ds)
    return out


def per_minute(n: int, seconds: float) -> float:
    return round(60 * n / seconds, 1)


def library(scorer, sources) -> tuple[dict, list]:
    records, t0 = [], time.perf_counter()
    for ds in sources:
        records.append(scorer.score_scans([load_scan(to_bytes(ds))])[0])
    seconds = time.perf_counter() - t0
    return {"instances": len(sources), "seconds": round(seconds, 2), "per_minute": per_minute(len(sources), seconds)}, records


def writing(sources, records) -> dict:
    times, kinds = [], set()
    for ds, (record, detail) in zip(sources, records):
        t0 = time.perf_counter()
        objects = dicom_results(ds, record, detail).objects()
        [to_bytes(o) for o in objects]
        times.append(1000 * (time.perf_counter() - t0))
        kinds |= {o.Modality for o in objects}
    return {"objects": sorted(kinds), "median_ms": round(statistics.median(times), 1),
            "max_ms": round(max(times), 1), "statuses": sorted({r["status"] for r, _ in records})}


def listener(scorer, sources, work: Path) -> dict:
    received: list = []
    pacs_ae = AE(ae_title="PACS")
    for uid in (SR_STORAGE, SEG_STORAGE):
        pacs_ae.add_supported_context(uid, ExplicitVRLittleEndian)
    pacs_port = free_port()
    pacs = pacs_ae.start_server(("127.0.0.1", pacs_port), block=False,
                                evt_handlers=[(evt.EVT_C_STORE, lambda e: received.append(e.dataset.Modality) or 0)])
    settings = ListenerSettings("CXRTUNE", "127.0.0.1", free_port(), (Peer("MODALITY", "127.0.0.1"),),
                                Peer("PACS", "127.0.0.1", pacs_port), poll_s=0.05)
    scp = PacsListener(settings, Spool(work / "spool"), scorer, KEY).start()
    expected = None
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CR_IMAGE, ExplicitVRLittleEndian)
        t0 = time.perf_counter()
        assoc = ae.associate("127.0.0.1", settings.port, ae_title="CXRTUNE")
        for ds in sources:
            assoc.send_c_store(ds)
        assoc.release()
        stored = time.perf_counter() - t0
        while scp.spool.status().incoming or scp.spool.status().outbox:
            time.sleep(0.05)
        seconds = time.perf_counter() - t0
        expected = len(received)
    finally:
        scp.stop()
        pacs.shutdown()
    return {"instances": len(sources), "results_delivered": expected, "store_seconds": round(stored, 2),
            "seconds": round(seconds, 2), "per_minute": per_minute(len(sources), seconds)}


def poll(scorer, sources, orthanc: str, work: Path) -> dict:
    for ds in sources:
        requests.post(f"{orthanc}/instances", data=to_bytes(ds), timeout=60).raise_for_status()
    poller = DicomwebPoller(PollSettings(f"{orthanc}/dicom-web", modalities=("CR",)), Spool(work / "poll"), scorer, KEY)
    t0 = time.perf_counter()
    counts = poller.poll_once()
    seconds = time.perf_counter() - t0
    return {"instances": len(sources), "counts": counts, "seconds": round(seconds, 2),
            "per_minute": per_minute(sum(counts.values()), seconds)}


def http(bundle: str, sources) -> dict:
    import os

    import ray
    from ray import serve

    from cxrtune.cluster import start_ray
    from cxrtune.serving.app import application

    key = "pacs-bench-key-0123456789"
    os.environ["CXRTUNE_API_KEY"] = key
    start_ray(num_cpus=2, include_dashboard=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    one = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}
    serve.run(application({"bundle": bundle, "device": "cpu", "max_batch_size": 4, "max_in_flight": 4},
                          {"Stage1": one, "Stage2": one, "Ingress": one}), name="cxrtune", route_prefix="/")
    headers = {"X-API-Key": key, "Accept": DICOM_RESULTS}
    try:
        requests.post(f"http://127.0.0.1:{port}/v1/score", data=to_bytes(sources[0]), headers=headers, timeout=120)
        t0 = time.perf_counter()
        codes = [requests.post(f"http://127.0.0.1:{port}/v1/score", data=to_bytes(ds), headers=headers,
                               timeout=120).status_code for ds in sources]
        seconds = time.perf_counter() - t0
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"instances": len(sources), "codes": sorted(set(codes)), "seconds": round(seconds, 2),
            "per_minute": per_minute(len(sources), seconds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", help="a bundle (default: tiny random networks)")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--orthanc", help="an Orthanc REST URL with the DICOMweb plugin at /dicom-web")
    ap.add_argument("--serve", action="store_true", help="also through Ray Serve over HTTP")
    args = ap.parse_args()
    from json_stdout import reserve_stdout  # bench/, beside this script

    json_out = reserve_stdout()  # Ray prints to stdout: keep it for the JSON
    work = Path(tempfile.mkdtemp(prefix="cxrtune-pacs-bench-"))
    bundle = args.bundle
    if not bundle:
        from serve_gpu import QUICK_PAIR, random_bundle

        bundle = str(random_bundle(work, QUICK_PAIR))
    scorer = load_bundle(bundle, device="cpu")
    report: dict = {"bundle": "given" if args.bundle else "tiny random networks", "n": args.n}
    report["library"], records = library(scorer, copies(args.n))
    report["dicom_results"] = writing(copies(args.n), records)
    report["listener"] = listener(scorer, copies(args.n), work)
    if args.orthanc:
        report["poll"] = poll(scorer, copies(args.n), args.orthanc, work)
    if args.serve:
        report["http"] = http(bundle, copies(args.n))
    print(json.dumps(report, indent=1), file=json_out, flush=True)


if __name__ == "__main__":
    main()
