"""What hostile input costs the CPU scorer (issue 21, item 10).

    python bench/hostile.py [--bundle B] [--out DIR] [--haproxy]

Starts the scorer in-process on 127.0.0.1 (Ray Serve, one ingress and one replica per stage, an
API key, ``max_in_flight`` 4) with ``--bundle`` or a bundle of tiny random networks (speed and
refusals do not depend on the weights), sends each case below over real HTTP and reports, per case,
the HTTP codes, the seconds of the slowest answer and the ingress replica's RSS, USS (RSS less
shared pages such as the object store's) and the object store's pages in its RSS after it, then a
summary against the targets: no 5xx, nothing unanswered, every bomb refused in <= 1 s, no case over
2 s, ingress RSS growth <= 200 MB, and the planted patient name in no response, no log of the Ray
session and no temporary file. Prints one JSON object.
``--haproxy`` puts HAProxy in front, as ``cxrtune serve --haproxy`` does: each body then goes
from HAProxy to the ingress replica's own HTTP server, not through Serve's proxy and the object store.

Cases: decompression bombs (Deflated DICOM of zeros, a JPEG 2000 frame larger than its header,
a 16-bit RGBA PNG, a PNG header of 40,000 x 40,000), multi-frame and colour multi-frame DICOM,
malformed DICOM attributes, truncated PNG/JPEG/DICOM, wrong formats, malformed and oversized
requests (multipart, chunked, many text fields, a chunked file part over the limit), bad keys,
bursts past admission control, slow uploads and trickling clients beside normal clients.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

KEY = "hostile-bench-key-0123456789"
SECRET = "DOE^JOHN^MRN123"
TARGETS = {"max_5xx": 0, "max_unanswered": 0, "bomb_s": 1.0, "worst_s": 2.0, "rss_growth_mb": 200}


def _dicom(pixels, transfer_syntax=None, **tags) -> bytes:
    """A DX chest PA DICOM holding ``pixels`` (frames first for a multi-frame one), with the
    planted patient name."""
    import numpy as np
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = SECRET, "MRN123"
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "DX", "PA", "CHEST"
    colour = pixels.ndim == 4 or (pixels.ndim == 3 and tags.get("NumberOfFrames") is None and pixels.shape[-1] == 3)
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = (3, "RGB") if colour else (1, "MONOCHROME2")
    if colour:
        ds.PlanarConfiguration = 0
    bits = 16 if pixels.dtype == np.uint16 else 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.PixelData = pixels.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def cases(normal: bytes) -> dict[str, tuple[str, bytes]]:
    """name -> (kind, payload): ``bomb`` cases must be refused within the bomb target."""
    import numpy as np
    import pydicom
    from PIL import Image
    from pydicom.data import get_testdata_file
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from cxrtune import images

    out: dict[str, tuple[str, bytes]] = {}
    zeros = np.zeros((6000, 6000), np.uint16)  # 72 MB of zeros: deflates to ~70 kB
    out["deflated_dicom_bomb"] = ("bomb", _dicom(zeros, DeflatedExplicitVRLittleEndian))
    j2k = pydicom.dcmread(get_testdata_file("RG1_J2KR.dcm"))
    j2k.Rows, j2k.Columns = 64, 64  # the codestream says 1955 x 1841
    buf = io.BytesIO()
    j2k.save_as(buf)
    out["jpeg2000_larger_than_header"] = ("bomb", buf.getvalue())
    rgba = np.zeros((4096, 4096, 4), np.uint16)
    out["png_16bit_rgba_4k"] = ("bomb", images.encode_png(rgba))
    head = bytearray(images.encode_png(np.zeros((8, 8), np.uint8)))
    head[16:24] = (40000).to_bytes(4, "big") * 2
    out["png_header_40000x40000"] = ("bomb", bytes(head))
    g = (np.tile(np.linspace(0, 4095, 512), (512, 1))).astype(np.uint16)
    out["dicom_48_frames"] = ("input", _dicom(np.stack([g] * 48), NumberOfFrames=48))
    rgb = np.stack([(g >> 4).astype(np.uint8)] * 3, axis=-1)
    out["dicom_colour_2_frames"] = ("input", _dicom(np.stack([rgb, rgb]), NumberOfFrames=2))
    out["dicom_rescale_slope_garbage"] = ("input", _dicom(g, RescaleSlope="1.5", RescaleIntercept="0")
                                          .replace(b"1.5 ", b"DOE^"))
    out["png_truncated"] = ("input", normal[: len(normal) // 2])
    jpeg = io.BytesIO()
    Image.fromarray((g >> 4).astype(np.uint8)).save(jpeg, format="JPEG")
    out["jpeg_truncated"] = ("input", jpeg.getvalue()[: len(jpeg.getvalue()) // 3])
    out["dicom_truncated"] = ("input", _dicom(g)[:-100_000])
    out["gif"] = ("input", b"GIF89a" + b"\0" * 200)
    out["text"] = ("input", SECRET.encode() * 50)
    out["empty"] = ("input", b"")
    out["zlib_not_png"] = ("input", images.PNG_MAGIC + zlib.compress(b"\0" * 10_000_000))
    # what is not a frontal CXR: unscored (noise) or refused (a colour photograph), never scored
    out["uniform_noise_png"] = ("input", images.encode_png(np.random.default_rng(0).integers(0, 256, (512, 512), dtype=np.uint8)))
    import matplotlib

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    out["colour_photograph_jpeg"] = ("input", photo.read_bytes())
    return out


def ingress_memory() -> tuple[float, float, float]:
    """The ingress replica's (RSS, USS, object store) in MB: USS leaves out shared pages (the
    object store's mapping, shared libraries) that RSS counts; the last is the part of RSS mapped
    from Ray's object store (``/dev/shm/plasma*``)."""
    import psutil

    found = [p for p in psutil.process_iter(["cmdline"])
             if "ServeReplica:cxrtune:Ingress" in " ".join(p.info.get("cmdline") or [])]
    if not found:
        return float("nan"), float("nan"), float("nan")
    process = max(found, key=lambda p: p.memory_info().rss)
    m = process.memory_full_info()
    store = sum(region.rss for region in process.memory_maps() if "plasma" in region.path)
    return round(m.rss / 1e6, 1), round(m.uss / 1e6, 1), round(store / 1e6, 1)


def raw_http(port: int, head: bytes, body_chunks, pause_s: float = 0.0, timeout: float = 30) -> tuple[int, float]:
    """One request written by hand (chunked bodies, trickling clients): (status code, seconds); 0
    when no answer came. It stops sending once the server has answered, as a client does."""
    import select

    t = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(head)
            for chunk in body_chunks:
                if select.select([s], [], [], 0)[0]:
                    break  # answered (a refusal before the body was all sent)
                try:
                    s.sendall(chunk)
                except OSError:
                    break
                if pause_s:
                    time.sleep(pause_s)
            reply = s.recv(64)
        code = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else 0
    except OSError:
        code = 0
    return code, round(time.perf_counter() - t, 3)


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def main() -> None:
    import requests
    from serve_load import free_port, shipped_ingress_options

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", help="a bundle to serve (default: tiny random networks)")
    ap.add_argument("--out", help="where the random bundle goes (default: a temporary folder, removed at exit)")
    ap.add_argument("--haproxy", action="store_true", help="HAProxy in front of the ingress (cxrtune serve --haproxy)")
    args = ap.parse_args()
    from json_stdout import reserve_stdout  # bench/, beside this script

    json_out = reserve_stdout()  # Ray prints to stdout: keep it for the JSON

    import atexit
    import os

    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions

    from cxrtune.cluster import start_ray
    from cxrtune.data.phantom import make_phantom
    from cxrtune.images import encode_png
    from cxrtune.serving.app import application
    from cxrtune.serving.deploy import haproxy_front

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="cxrtune-hostile-"))
    if not args.out:
        atexit.register(shutil.rmtree, out, ignore_errors=True)
    bundle = args.bundle
    if not bundle:
        from serve_gpu import QUICK_PAIR, random_bundle

        bundle = str(random_bundle(out, QUICK_PAIR))
    os.environ["CXRTUNE_API_KEY"] = KEY
    port = free_port()
    http = HTTPOptions(host="127.0.0.1", port=port, request_timeout_s=30)
    front = haproxy_front(http) if args.haproxy else None
    if front:
        os.environ.update(front.env)  # before Ray starts: its processes inherit it
        atexit.register(front.stop)  # its private folder goes on an error or SIGTERM too (not SIGKILL)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # an instance of its own, never a running cluster
    session_dir = Path(start_ray(num_cpus=2, include_dashboard=False).address_info["session_dir"])
    serve.start(http_options=http)
    one = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}
    ingress = {"num_replicas": 1, "max_ongoing_requests": 64, "ray_actor_options": shipped_ingress_options()}
    serve.run(application({"bundle": bundle, "device": "cpu", "max_batch_size": 4, "max_in_flight": 4},
                          {"Stage1": one, "Stage2": one, "Ingress": ingress}),
              name="cxrtune", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/score"
    auth = {"X-API-Key": KEY}
    normal = encode_png(make_phantom(256, "covid", seed=1).image)
    for _ in range(3):  # warm-up
        requests.post(url, data=normal, headers=auth, timeout=60)
    rss0, uss0, store0 = ingress_memory()
    report: dict[str, dict] = {}

    def record(name: str, kind: str, codes: list[int], seconds: list[float], texts: list[str]) -> None:
        rss, uss, store = ingress_memory()
        report[name] = {"kind": kind, "codes": sorted(set(codes)), "seconds": max(seconds), "rss_mb": rss, "uss_mb": uss,
                        "store_mb": store,
                        "secret_echoed": any(SECRET in t or "MRN123" in t for t in texts)}

    for name, (kind, data) in cases(normal).items():
        t = time.perf_counter()
        try:
            r = requests.post(url, data=data, headers=auth, timeout=60)
            code, text = r.status_code, r.text
        except requests.RequestException:
            code, text = 0, ""
        record(name, kind, [code], [round(time.perf_counter() - t, 3)], [text])
        if code == 200:  # what a scored-looking answer says: noise must be unscored, never scored
            report[name]["status"] = json.loads(text).get("status")

    for name, request in {
        "multipart_without_file": lambda: requests.post(url, files={"nofile": (None, "x")}, headers=auth, timeout=60),
        "multipart_broken_boundary": lambda: requests.post(url, data=b"--x\r\nnot a part", headers={
            **auth, "Content-Type": "multipart/form-data; boundary=x"}, timeout=60),
        "key_non_ascii": lambda: requests.post(url, data=normal, headers={"X-API-Key": b"\xff" * 20}, timeout=60),
        "key_wrong": lambda: requests.post(url, data=normal, headers={"X-API-Key": "w" * 30}, timeout=60),
    }.items():
        t = time.perf_counter()
        try:
            r = request()
            code, text = r.status_code, r.text
        except requests.RequestException:
            code, text = 0, ""
        record(name, "request", [code], [round(time.perf_counter() - t, 3)], [text])

    head = (f"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {KEY}\r\n"
            "Transfer-Encoding: chunked\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
    chunk = _chunked(b"\0" * 1_000_000)
    code, seconds = raw_http(port, head, [chunk] * 80 + [b"0\r\n\r\n"])  # 80 MB chunked: over the 64 MB limit
    record("chunked_80MB", "request", [code], [seconds], [])
    multipart = head.replace(b"application/octet-stream", b"multipart/form-data; boundary=zz")
    fields = (_chunked(f'--zz\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\n'.encode() + b"a" * 1_000_000
                       + b"\r\n") for i in range(1000))
    code, seconds = raw_http(port, multipart, fields)  # 1,000 x 1 MB text fields, chunked
    record("many_text_fields_1000x1MB", "request", [code], [seconds], [])
    part = _chunked(b'--zz\r\nContent-Disposition: form-data; name="file"; filename="' + SECRET.encode() + b'.png"\r\n\r\n')
    code, seconds = raw_http(port, multipart, [part, *[chunk] * 80])  # one 80 MB file part, chunked
    record("file_part_80MB_chunked", "request", [code], [seconds], [])

    burst: list[tuple[int, float]] = []

    def post_one() -> None:
        t = time.perf_counter()
        try:
            burst.append((requests.post(url, data=normal, headers=auth, timeout=60).status_code,
                          round(time.perf_counter() - t, 3)))
        except requests.RequestException:
            burst.append((0, 0.0))
    threads = [threading.Thread(target=post_one) for _ in range(24)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    record("burst_24", "burst", [c for c, _ in burst], [s for _, s in burst], [])

    slow_head = (f"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {KEY}\r\n"
                 f"Content-Length: {len(normal)}\r\nContent-Type: image/png\r\n\r\n").encode()

    def beside_slow_clients(chunk: int, pause_s: float) -> tuple[list, list]:
        """Six clients sending ``normal`` ``chunk`` bytes every ``pause_s``, and four normal
        requests beside them: ((code, s) of the normal ones, (code, s) of the slow ones)."""
        pieces = [normal[i:i + chunk] for i in range(0, len(normal), chunk)]
        slow: list[tuple[int, float]] = []
        threads = [threading.Thread(target=lambda: slow.append(raw_http(port, slow_head, pieces, pause_s=pause_s)))
                   for _ in range(6)]
        for th in threads:
            th.start()
        time.sleep(0.5)
        beside = []
        for _ in range(4):
            t = time.perf_counter()
            r = requests.post(url, data=normal, headers=auth, timeout=60)
            beside.append((r.status_code, round(time.perf_counter() - t, 3)))
        for th in threads:
            th.join()
        return beside, slow

    beside, slow = beside_slow_clients(4096, 0.05)  # 80 kB/s: above the minimum rate
    record("normal_beside_6_slow_uploads", "request", [c for c, _ in beside], [s for _, s in beside], [])
    record("slow_uploads_6", "slow", [c for c, _ in slow], [s for _, s in slow], [])
    # 10 bytes every 0.5 s (under the minimum rate): cut off with 408 after the grace period
    beside, trickling = beside_slow_clients(10, 0.5)
    record("normal_beside_6_trickling_clients", "request", [c for c, _ in beside], [s for _, s in beside], [])
    record("trickling_clients_6", "slow", [c for c, _ in trickling], [s for _, s in trickling], [])

    serve.shutdown()  # first: buffered request logs are flushed, and the files stay in the session folder
    ray.shutdown()
    # every log of this instance's own session (not whatever /tmp/ray/session_latest names): the
    # replicas' stdout and stderr (worker-*.out/.err) as well as Serve's own files; HAProxy's own
    # files are in its private folder
    folders = [session_dir / "logs", *([front.folder] if front else [])]
    logs = [p for folder in folders for p in folder.rglob("*") if p.is_file() and p.stat().st_size < 200_000_000]
    in_logs = any(SECRET.encode() in text or b"MRN123" in text for text in (p.read_bytes() for p in logs))
    in_tmp = any(b"MRN123" in p.read_bytes() for p in Path(tempfile.gettempdir()).glob("tmp*")
                 if p.is_file() and p.stat().st_size < 200_000_000)

    timed = {k: v for k, v in report.items() if v["kind"] not in ("slow", "burst")}
    summary = {
        # admission control's 503 + Retry-After is the designed answer to a burst: counted apart
        "5xx": sum(any(500 <= c < 600 and c != 503 for c in v["codes"]) for v in report.values()),
        "cases_with_503_backpressure": sorted(k for k, v in report.items() if 503 in v["codes"]),
        "unanswered": sum(0 in v["codes"] for v in report.values()),
        "slowest_bomb_s": max(v["seconds"] for v in report.values() if v["kind"] == "bomb"),
        "worst_s": max(v["seconds"] for v in timed.values()),
        "rss_growth_mb": round(max(v["rss_mb"] for v in report.values()) - rss0, 1),
        "uss_growth_mb": round(max(v["uss_mb"] for v in report.values()) - uss0, 1),
        "store_growth_mb": round(max(v["store_mb"] for v in report.values()) - store0, 1),
        "secret_in_responses": any(v["secret_echoed"] for v in report.values()),
        "ray_logs_read": len(logs), "secret_in_ray_logs": in_logs, "secret_in_temporary_files": in_tmp,
    }
    summary["meets_targets"] = (summary["5xx"] <= TARGETS["max_5xx"] and summary["unanswered"] <= TARGETS["max_unanswered"]
                                and summary["slowest_bomb_s"] <= TARGETS["bomb_s"] and summary["worst_s"] <= TARGETS["worst_s"]
                                and summary["rss_growth_mb"] <= TARGETS["rss_growth_mb"]
                                and not (summary["secret_in_responses"] or in_logs or in_tmp)
                                and len(logs) > 0)  # no log read would be no check, not a pass
    print(json.dumps({"targets": TARGETS, "haproxy": args.haproxy, "ingress_rss_start_mb": rss0,
                      "ingress_uss_start_mb": uss0, "ingress_store_start_mb": store0, "cases": report,
                      "summary": summary}, indent=1), file=json_out, flush=True)


if __name__ == "__main__":
    main()
