"""cluster.yaml, checked two ways without a cloud: against Ray's own cluster schema, and on Ray's
``fake_multinode`` provider, where the autoscaler must add ``gpu_worker`` nodes when a sweep asks
for fractional GPUs, run the trials there, and remove the nodes once they sit idle."""

import contextlib
import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import ROOT, free_port
from tests.test_tune import SPACE

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
    # no node updaters here, so nothing is copied: the nodes get the token from RAY_AUTH_TOKEN. Kept,
    # the mount of ~/.ray/auth_token makes the autoscaler hash a file that a fresh machine lacks,
    # and it fails at start (every trial then waits, PENDING, for a node that never comes)
    config["file_mounts"] = {}
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
def fake_cluster(tmp_path):  # yields (address, env, autoscaling config path)
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
        yield address, env, config
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def _busy_worker_raylets() -> list:
    """The raylet processes of the fake provider's gpu_worker nodes (the head has no GPU) that hold
    a trial actor now: a worker process of theirs titled ``ray::...`` other than ``ray::IDLE``."""
    out = []
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if "raylet" not in (p.info.get("name") or "") or "GPU" not in cmd:
            continue
        try:
            titles = [" ".join(c.cmdline()) for c in p.children(recursive=True)]
        except psutil.Error:
            continue
        if any(t.startswith("ray::") and not t.startswith("ray::IDLE") for t in titles):
            out.append(p)
    return out


def _trials_mid_way(experiment: Path, epochs: int) -> int:
    """Trials that have checkpointed at least once and reported fewer than ``epochs`` epochs."""
    count = 0
    for trial in experiment.glob("*/"):
        progress = trial / "progress.csv"
        if list(trial.glob("checkpoint_*")) and progress.exists():
            if len(progress.read_text().strip().splitlines()) - 1 < epochs:
                count += 1
    return count


@pytest.mark.slow
def test_sweep_scales_gpu_workers_up_and_down_and_survives_a_lost_node(fake_cluster, phantom_dir, tmp_path):
    """The autoscaler adds gpu_worker nodes for the fractional-GPU trials (both at once: cxrtune
    keeps as many trials pending as the cluster holds at its largest, read from the autoscaling
    config, without --max-concurrent); a worker node killed while it runs trials loses none: Tune
    retries them from their last checkpoint (FailureConfig) and they complete; idle nodes go."""
    address, env, config = fake_cluster
    assert _workers(address, env) == 0  # min_workers 0: no GPU node until a sweep asks
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    args = ["tune", "--space", str(space), "--manifest", str(phantom_dir / "manifest.parquet"),
            "--name", "cluster", "--storage", str(tmp_path / "exps"), "--num-samples", "4",
            "--scheduler", "none", "--max-epochs", "4", "--cpus-per-trial", "0.5", "--gpus-per-trial", "0.5",
            "--max-failures", "3"]
    log = tmp_path / "tune.log"
    killed = 0
    with log.open("w") as out:
        sweep = subprocess.Popen([sys.executable, "-m", "cxrtune.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                 env={**env, "RAY_ADDRESS": address, "CXRTUNE_CLUSTER_CONFIG": str(config)})
        peak, started = 0, time.time()
        while sweep.poll() is None:
            peak = max(peak, _workers(address, env))
            if not peak and time.time() - started > 180:  # the autoscaler never added a node: say why now
                sweep.kill()
                sweep.wait()
                pytest.fail(f"no gpu_worker node within 180 s:\n{log.read_text()[-3000:]}")
            if not killed and _trials_mid_way(tmp_path / "exps" / "cluster", epochs=4):
                # a node lost mid-trial: SIGKILL the raylet of a worker that holds a trial now, and
                # its worker processes with it, as a lost machine loses them (alone, they run on and
                # finish before the missed heartbeats mark the node dead); an idle node's loss
                # would retry nothing
                for raylet in _busy_worker_raylets()[:1]:
                    for p in [*raylet.children(recursive=True), raylet]:
                        with contextlib.suppress(psutil.NoSuchProcess):
                            p.kill()
                    killed += 1
            time.sleep(1)
    text = log.read_text()
    assert sweep.returncode == 0, text[-3000:]
    summary = json.loads(text[text.index("{\n"):text.rindex("}") + 1])
    assert killed == 1
    assert summary["trials"] == 4 and summary["errored"] == 0  # every trial accounted for, none lost
    assert summary["retried"] >= 1  # the interrupted trial was retried (FailureConfig) and completed
    assert summary["max_concurrent"] == 4
    assert summary["gpu_hours"] > 0  # accounted at 0.5 GPU per trial
    epochs = [len(p.read_text().strip().splitlines()) - 1 for p in (tmp_path / "exps" / "cluster").glob("*/progress.csv")]
    assert len(epochs) == 4 and all(e >= 4 for e in epochs), epochs  # every trial ran its 4 epochs
    # the head has no GPU, so the trials could only run on gpu_worker nodes the autoscaler added;
    # with more than one trial pending it asked for both at once
    assert peak == 2

    deadline = time.time() + 120  # idle_timeout_minutes 0.05: the workers go once the sweep is over
    while _workers(address, env) and time.time() < deadline:
        time.sleep(2)
    assert _workers(address, env) == 0


@pytest.mark.slow
def test_trials_on_a_worker_node_get_the_endpoint_but_no_secret(phantom_dir, bucket, s3_server, tmp_path):
    """A two-node local cluster: the head (no CPUs for trials) and a worker started with its own
    S3 credentials but without the endpoint or the W&B variables, as an instance profile would
    leave it. Trials run on the worker, read the manifest and images from the S3 server and write
    checkpoints there: the endpoint and W&B settings reached them through the runtime_env, the
    driver's credentials did not."""
    import boto3

    from cxrtune import storage
    from cxrtune.data import manifest

    df = manifest.load_manifest(str(phantom_dir / "manifest.parquet"))
    manifest.push_manifest(df, f"s3://{bucket}/data", f"s3://{bucket}/data/manifest.parquet", progress=False)
    port = free_port()
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("AWS_", "CXRTUNE_", "WANDB_", "RAY_ADDRESS"))}
    # a real multi-node cluster, on the loopback address only (conftest's single-node switch off,
    # every node told its address is 127.0.0.1)
    base.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1",
                PATH=f"{Path(RAY).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    worker_env = {**base, "AWS_ACCESS_KEY_ID": "worker-key", "AWS_SECRET_ACCESS_KEY": "worker-secret",
                  "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        for cmd, cmd_env in (([RAY, "start", "--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
                               "--disable-usage-stats", "--node-ip-address=127.0.0.1"], base),
                              ([RAY, "start", f"--address=127.0.0.1:{port}", "--num-cpus=2",
                                "--node-ip-address=127.0.0.1"], worker_env)):
            started = subprocess.run(cmd, env=cmd_env, capture_output=True, text=True, timeout=120)
            assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        driver_env = {**base, "RAY_ADDRESS": f"127.0.0.1:{port}", "CXRTUNE_S3_ENDPOINT_URL": s3_server,
                      "AWS_ACCESS_KEY_ID": "driver-key-" + secrets.token_hex(6),
                      "AWS_SECRET_ACCESS_KEY": "driver-secret-" + secrets.token_hex(6),
                      "AWS_DEFAULT_REGION": "us-east-1", "WANDB_API_KEY": "", "WANDB_DIR": str(tmp_path / "wb")}
        (tmp_path / "wb").mkdir()
        space = tmp_path / "space.yaml"
        space.write_text(yaml.safe_dump(SPACE))
        r = subprocess.run([sys.executable, "-m", "cxrtune.cli", "tune", "--space", str(space), "--manifest",
                            f"s3://{bucket}/data/manifest.parquet", "--name", "twonode", "--storage",
                            f"s3://{bucket}/exps", "--num-samples", "2", "--scheduler", "none", "--max-epochs", "1",
                            "--cpus-per-trial", "1", "--wandb-project", "cxrtune-twonode"],
                           env=driver_env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        summary = json.loads(r.stdout[r.stdout.index("{\n"):])
        assert summary["trials"] == 2 and summary["errored"] == 0
    finally:
        subprocess.run([RAY, "stop", "--force"], env=base, capture_output=True, timeout=120)
    s3 = boto3.client("s3", endpoint_url=storage.endpoint_url())
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="exps/twonode/")["Contents"]]
    assert sum(k.endswith("/model.pt") for k in keys) >= 2  # each trial checkpointed to S3 from the worker
    results = [json.loads(line) for k in keys if k.endswith("/result.json")
               for line in s3.get_object(Bucket=bucket, Key=k)["Body"].read().decode().splitlines() if line]
    assert len(results) == 2 and all(0 <= r["val_dice"] <= 1 for r in results)
    for k in keys:  # the driver's credentials are nowhere in the experiment
        body = s3.get_object(Bucket=bucket, Key=k)["Body"].read()
        assert driver_env["AWS_SECRET_ACCESS_KEY"].encode() not in body and b"driver-key-" not in body, k


def test_worker_env_carries_settings_never_secrets(monkeypatch):
    from cxrtune.cluster import worker_env
    from cxrtune.errors import CxrtuneError

    monkeypatch.setenv("CXRTUNE_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("WANDB_API_KEY", "k3y")
    env = worker_env({"WANDB_PROJECT": "p", "WANDB_MODE": "offline"})
    assert env["CXRTUNE_S3_ENDPOINT_URL"] == "http://127.0.0.1:9000" and env["WANDB_PROJECT"] == "p"
    assert "AWS_SECRET_ACCESS_KEY" not in env and "WANDB_API_KEY" not in env
    with pytest.raises(CxrtuneError, match="must not travel"):
        worker_env({"AWS_SECRET_ACCESS_KEY": "x"})


def test_a_disk_past_rays_threshold_is_named_before_a_sweep_writes_there(monkeypatch, tmp_path):
    """Ray's rule, its boundary and its off switch; the folders a sweep's driver checks (never
    S3); a real disk measured at thresholds that call it full and not."""
    from cxrtune.cluster import disk_is_full, full_disk
    from cxrtune.errors import CxrtuneError
    from cxrtune.search.tuning import local_disks

    assert disk_is_full(250, 1000, 0.75) and not disk_is_full(251, 1000, 0.75)  # 25 % free is full at 0.75
    assert not disk_is_full(0, 1000, 1.0) and disk_is_full(0, 0, 0.95)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "ray"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # the documented override of gettempdir()
    assert local_disks("s3://bucket/exps") == [str(tmp_path / "ray"), str(tmp_path)]
    assert local_disks(str(tmp_path / "exps")) == [str(tmp_path / "ray"), str(tmp_path), str(tmp_path / "exps")]
    missing = tmp_path / "not" / "yet"  # measured at the folder it will be made in
    monkeypatch.setenv("RAY_local_fs_capacity_threshold", "0")
    problem = full_disk(["s3-is-never-passed-here", str(missing)]) or ""
    assert problem.startswith("s3-is-never-passed-here: the disk is ")  # a relative path: the working folder's disk
    assert full_disk([str(missing)]).startswith(f"{missing}: the disk is ")
    monkeypatch.setenv("RAY_local_fs_capacity_threshold", "1")
    assert full_disk([str(missing)]) is None
    monkeypatch.setenv("RAY_local_fs_capacity_threshold", "ninety")
    with pytest.raises(CxrtuneError, match="RAY_local_fs_capacity_threshold='ninety'"):
        full_disk([str(missing)])


@pytest.mark.slow
def test_the_head_command_of_cluster_yaml_starts_a_dashboard_that_needs_the_token(tmp_path):
    """cluster.yaml's own head command, run here (ports made free, no autoscaler file, one CPU):
    its dashboard and job API answer 401 without the cluster's token and 200 with it. The token
    is where `ray get-auth-token --generate` puts it and file_mounts copies it from. Its Ray
    settings (``--system-config``) are those of the instance cxrtune starts where there is none to
    join; cxrtune's init_ray joins it."""
    import requests

    config = _cluster_yaml()
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    head = next(c for c in config["head_start_ray_commands"] if "ray start --head" in c)
    workers = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    assert head.startswith("RAY_AUTH_MODE=token ") and all(c.startswith("RAY_AUTH_MODE=token ") for c in workers)
    assert "--dashboard-host=127.0.0.1" in head
    from cxrtune.cluster import ray_system_config

    system_config = re.search(r"--system-config='([^']*)'", head)
    assert system_config and json.loads(system_config.group(1)) == ray_system_config()  # as a local instance's
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    token = secrets.token_hex(32)
    (home / ".ray" / "auth_token").write_text(token)
    dash, gcs = free_port(), free_port()
    command = (head.replace("--port=6379", f"--port={gcs}")
               .replace("--autoscaling-config=~/ray_bootstrap_config.yaml", "")
               + f" --dashboard-port={dash} --num-cpus=1 --disable-usage-stats")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env.update(HOME=str(home), PATH=f"{Path(RAY).parent}{os.pathsep}{env.get('PATH', '')}")
    started = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        url = f"http://127.0.0.1:{dash}/api/jobs/"
        deadline = time.time() + 60
        while True:
            try:
                anonymous = requests.get(url, timeout=5)
                break
            except requests.ConnectionError:
                assert time.time() < deadline, "the dashboard did not start"
                time.sleep(1)
        assert anonymous.status_code == 401
        assert requests.get(url, headers={"Authorization": "Bearer wrong"}, timeout=5).status_code in (401, 403)
        assert requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=5).status_code == 200
        # cxrtune's init_ray joins it (num_cpus is not passed on), and the head applied the settings
        joined = _ray_that_init_ray_finds({**env, "RAY_AUTH_MODE": "token"})
        assert joined["gcs_address"].endswith(f":{gcs}") and joined["settings"] == ray_system_config(), joined
    finally:
        subprocess.run([RAY, "stop", "--force"], env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, timeout=120)
    started_own = _ray_that_init_ray_finds(env)  # nothing to join: an instance of its own, with the same settings
    assert not started_own["gcs_address"].endswith(f":{gcs}") and started_own["settings"] == ray_system_config()


def _ray_that_init_ray_finds(env: dict) -> dict:
    """In a new process: ``init_ray(num_cpus=1)``, then the GCS address of the instance it is on
    and that instance's settings of ``ray_system_config``'s keys."""
    probe = ("import json, ray\n"
             "from cxrtune.cluster import init_ray, ray_system_config\n"
             "init_ray(num_cpus=1)\n"
             "config = ray._private.state.state.get_system_config()\n"
             "print(json.dumps({'gcs_address': ray.get_runtime_context().gcs_address,\n"
             "                  'settings': {k: config.get(k) for k in ray_system_config()}}))\n")
    done = subprocess.run([sys.executable, "-c", probe], env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
