"""cluster.yaml, checked two ways without a cloud: against Ray's own cluster schema, and on Ray's
``fake_multinode`` provider, where the autoscaler must add ``gpu_worker`` nodes when a sweep asks
for fractional GPUs, run the trials there, and remove the nodes once they sit idle."""

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, free_port
from tests.test_tune import SPACE

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))


def _cluster_yaml() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(_cluster_yaml())
    validate_config(config)  # raises on a misspelt key or a wrong type
    assert config["provider"]["type"] == "aws" and config["head_node_type"] == "head"
    worker = config["available_node_types"]["gpu_worker"]
    assert worker["min_workers"] == 0 and worker["max_workers"] >= 1  # GPUs only while sweeps need them
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}  # trials never land on the head
    text = (ROOT / "cluster.yaml").read_text()
    assert "aws_access_key_id" not in text.lower() and "aws_secret" not in text.lower()


def _fake_config(gcs_port: int, workers: int) -> dict:
    """cluster.yaml's worker type on the fake provider: the same name and scaling bounds, with the
    resources a cloud would detect (here 1 CPU and 1 logical GPU) written out. The fake provider
    names its head type ``ray.head.default``."""
    from ray.autoscaler._private.util import prepare_config

    config = prepare_config(_cluster_yaml())
    worker = config["available_node_types"]["gpu_worker"]
    config.pop("docker", None)
    config.update(
        max_workers=workers, idle_timeout_minutes=0.05, head_node_type="ray.head.default",
        provider={"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                  "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{gcs_port}"},
        available_node_types={
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "gpu_worker": {"min_workers": worker["min_workers"], "max_workers": workers,
                           "resources": {"CPU": 1, "GPU": 1}, "node_config": {}},
        })
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands", "initialization_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        config[key] = []
    return config


def _workers(address: str, env: dict) -> int:
    out = subprocess.run([RAY, "status", "--address", address], capture_output=True, text=True, env=env).stdout
    active = out.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return sum(int(line.split()[0]) for line in active.splitlines() if "gpu_worker" in line)


@pytest.fixture
def fake_cluster(tmp_path):
    port = free_port()
    config = tmp_path / "fake-cluster.json"
    config.write_text(json.dumps(_fake_config(port, workers=2)))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": f"{Path(RAY).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([RAY, "start", "--head", f"--port={port}", f"--autoscaling-config={config}", "--num-cpus=1",
                    "--include-dashboard=false", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=120)
    address = f"127.0.0.1:{port}"
    try:
        yield address, env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_sweep_scales_gpu_workers_up_and_down(fake_cluster, phantom_dir, tmp_path):
    address, env = fake_cluster
    assert _workers(address, env) == 0  # min_workers 0: no GPU node until a sweep asks
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    args = ["tune", "--space", str(space), "--manifest", str(phantom_dir / "manifest.parquet"),
            "--name", "cluster", "--storage", str(tmp_path / "exps"), "--num-samples", "4",
            "--scheduler", "none", "--max-epochs", "2", "--cpus-per-trial", "0.5", "--gpus-per-trial", "0.5",
            "--max-concurrent", "4"]
    log = tmp_path / "tune.log"
    with log.open("w") as out:
        sweep = subprocess.Popen([sys.executable, "-m", "cxrtune.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                 env={**env, "RAY_ADDRESS": address})
        peak = 0
        while sweep.poll() is None:
            peak = max(peak, _workers(address, env))
            time.sleep(1)
    text = log.read_text()
    assert sweep.returncode == 0, text[-3000:]
    summary = json.loads(text[text.index("{\n"):text.rindex("}") + 1])
    assert summary["trials"] == 4 and summary["errored"] == 0
    assert summary["gpu_hours"] > 0  # accounted at 0.5 GPU per trial
    # the head has no GPU, so the trials could only run on gpu_worker nodes the autoscaler added
    assert 1 <= peak <= 2

    deadline = time.time() + 90  # idle_timeout_minutes 0.05: the workers go once the sweep is over
    while _workers(address, env) and time.time() < deadline:
        time.sleep(2)
    assert _workers(address, env) == 0
