"""Serve's own tools against a real Ray cluster (`ray start --head` with the dashboard and token
authentication): `serve deploy` of the shipped CPU config, `serve status`, an update under load
with `cxrtune deploy` to a calibrated bundle written from the live one, a Stage replica killed
under load (no failed request, no answer mixing two bundles' stages), and `serve shutdown`."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from cxrtune.errors import CxrtuneError
from cxrtune.serving.deploy import load_config
from tests.conftest import ROOT, free_port, shipped_cpu_config

BIN = Path(sys.executable).parent
KEY = "deploy-test-key-0123456789"
AUTH = {"X-API-Key": KEY}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node cluster started as an operator would, with token auth on (Ray 2.60's default
    for local clusters); 4 logical CPUs so a rolling update can place new replicas beside the old."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "CXRTUNE_API_KEY": KEY}  # the replicas inherit the key
    dash, gcs = free_port(), free_port()
    r = subprocess.run([str(BIN / "ray"), "start", "--head", "--num-cpus", "4", "--port", str(gcs),
                        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
                        "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    try:
        yield {"address": f"http://127.0.0.1:{dash}", "env": env, "gcs": f"127.0.0.1:{gcs}"}
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def serve_cli(cluster, *args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "serve"), *args, "--address", cluster["address"]], env=cluster["env"],
                          capture_output=True, text=True, timeout=timeout)


STAGE1_REPLICAS = """
import sys
import ray
ray.init(address=sys.argv[1], logging_level="ERROR")
names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#Stage1#" in a["name"])
if sys.argv[2] == "kill":  # one replica started after the names given (the update's), SIGKILLed
    name = next(n for n in names if n not in sys.argv[3:])
    ray.kill(ray.get_actor(name, namespace="serve"))
    names = [name]
print(" ".join(names))
"""


def stage1_replicas(cluster, *args: str) -> list[str]:
    """The Stage1 replica actors' names; with ``kill OLD...``: kills one not among OLD, returns it."""
    r = subprocess.run([sys.executable, "-c", STAGE1_REPLICAS, cluster["gcs"], *(args or ("list",))],
                       env=cluster["env"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.split()


def wait_ready(url: str, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} not ready after {seconds} s")


@pytest.mark.slow
def test_serve_deploy_status_update_under_load_and_shutdown(cluster, phantom_bundle, phantom_dir, tmp_path):
    from cxrtune.data import manifest
    from cxrtune.model.artifacts import bundle_hash
    from cxrtune.scoring.evaluation import CalibrateOptions, calibrate_bundle
    from cxrtune.scoring.onnx_export import export_bundle

    hash_a = bundle_hash(str(phantom_bundle))
    path, port = shipped_cpu_config(tmp_path, phantom_bundle)
    url = f"http://127.0.0.1:{port}"

    # Ray's own `serve deploy` and `serve status` with the shipped config
    r = serve_cli(cluster, "deploy", str(path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    wait_ready(url)
    status = serve_cli(cluster, "status")
    assert status.returncode == 0 and "RUNNING" in status.stdout and "cxrtune" in status.stdout, status.stdout

    png = sorted((phantom_dir / "images").iterdir())[1].read_bytes()
    first = requests.post(f"{url}/v1/score", data=png, timeout=60, headers=AUTH).json()
    assert first["models"]["stage_bundles"]["lung"] == hash_a and first["models"]["bundle_hash"] == hash_a
    assert first["models"]["stage_bundles"]["disease"] in (hash_a, None)  # None: no lungs, Stage II not asked

    # load from two clients while `cxrtune deploy` swaps the bundle
    answers, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                resp = requests.post(f"{url}/v1/score", data=png, timeout=120, headers=AUTH)
                answers.append((resp.status_code, resp.json() if resp.status_code == 200 else resp.text))
            except requests.RequestException as exc:
                answers.append((0, repr(exc)))

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        # under load, the second bundle is written from the live one (bundles never change in
        # place): calibrated, then with an ONNX export (the CPU fast path); a new content hash
        calibrated, second = tmp_path / "phantom-calibrated", tmp_path / "phantom-b"
        df = manifest.load_manifest(str(phantom_dir / "manifest.parquet"))
        calibrate_bundle(str(phantom_bundle), str(calibrated), df,
                         CalibrateOptions(what=("zone",), limit=8, progress=False), device="cpu")
        export_bundle(str(calibrated), str(second))
        hash_b = bundle_hash(str(second))
        assert hash_a != hash_b and len(answers) > 0
        before_update = stage1_replicas(cluster)
        r = subprocess.run([sys.executable, "-m", "cxrtune.cli", "deploy", "--config", str(path), "--bundle",
                            str(second), "--address", cluster["address"], "--wait", "300"],
                           env=cluster["env"], capture_output=True, text=True, timeout=360)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert f'"bundle_hash": "{hash_b}"' in r.stdout
        n_at_update = len(answers)
        deadline = time.time() + 60
        while time.time() < deadline and not any(
                a[0] == 200 and a[1]["models"]["bundle_hash"] == hash_b for a in answers[n_at_update:]):
            time.sleep(1)
        killed = stage1_replicas(cluster, "kill", *before_update)  # a replica of the update, serving B
        assert len(killed) == 1 and killed[0] not in before_update
        n_at_kill, deadline = len(answers), time.time() + 90
        while len(answers) < n_at_kill + 4 and time.time() < deadline:  # requests go on while Serve replaces it
            time.sleep(1)
        assert len(answers) >= n_at_kill + 4
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=180)

    models = requests.get(f"{url}/v1/models", timeout=30, headers=AUTH).json()
    assert models["bundle_hash"] == hash_b and models["stages"]["lung"]["runtime"] == "onnx"
    assert models["stages"]["disease"]["bundle_hash"] == hash_b

    failures = [a for a in answers if a[0] != 200]
    assert not failures, failures[:3]
    seen = []
    for _, record in answers:
        stages = record["models"]["stage_bundles"]
        assert stages["lung"] == record["models"]["bundle_hash"], stages  # no answer mixes two bundles
        assert stages["disease"] in (None, stages["lung"]), stages
        # what ran each answer: bundle B has an ONNX export (auto picks it on a CPU), bundle A not
        runtimes = record["models"]["stage_runtimes"]
        assert runtimes["lung"] == ("onnx" if stages["lung"] == hash_b else "torch"), (stages, runtimes)
        seen.append(stages["lung"])
    assert set(seen) == {hash_a, hash_b}, set(seen)
    assert seen[-1] == hash_b and seen.index(hash_b) > 0
    assert len(answers) >= 10

    # Ray's `serve shutdown` takes the app down
    r = serve_cli(cluster, "shutdown", "-y")
    assert r.returncode == 0, r.stderr[-2000:]
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            requests.get(f"{url}/healthz", timeout=3)
        except requests.RequestException:
            break
        time.sleep(1)
    else:
        raise AssertionError("the app still answers after `serve shutdown`")


def test_shipped_cpu_config_loads_with_a_bundle_override(tmp_path):
    """What `cxrtune serve` and `cxrtune deploy` read from a Serve config: its HTTP options, the
    app's args with --bundle put in, and the deployments by name; a file that is not a Serve config
    is a plain error."""
    http, args, deployments = load_config(str(ROOT / "serve" / "config.cpu.yaml"), bundle="s3://b/bundles/v2")
    assert args["bundle"] == "s3://b/bundles/v2" and http["host"] and http["port"]
    assert {"Ingress", "Stage1", "Stage2"} <= set(deployments)
    bad = tmp_path / "bad.yaml"
    bad.write_text("http_options: {}\n")
    with pytest.raises(CxrtuneError, match="not a Serve config"):
        load_config(str(bad))
