"""The search service on a real local Ray instance (through the real CLI, in subprocesses):
ASHA stops trials early, results land on the S3 server over HTTP, W&B offline runs hold the
metrics, the report is produced, a killed driver's sweep resumes with its searcher."""

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import yaml

from cxrtune import storage
from tests.wandb_reader import summarize

pytestmark = pytest.mark.slow

SPACE = {
    "task": "lung", "objective": "dice",
    "fixed": {"batch_size": 4, "size": 64, "model": {"in_channels": 1, "encoder": "resnet18"}},
    "parameters": {
        "arch": {"type": "choice", "values": ["FPN", "Linknet"]},
        "optimizer": {"type": "choice", "values": ["adam", "sgd"]},
        "lr": {"type": "log-float", "low": 1e-5, "high": 1e-2},
    },
}


def cli(*args, env=None, timeout=420, check=True):
    r = subprocess.run([sys.executable, "-m", "cxrtune.cli", *args], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=timeout)
    if check:
        assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return r


@pytest.fixture
def space_file(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(SPACE))
    return str(path)


def test_asha_sweep_on_s3_with_wandb_report_and_promote(phantom_dir, space_file, bucket, tmp_path):
    import secrets

    wandb_dir = tmp_path / "wb"
    wandb_dir.mkdir()
    creds = {"AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),  # distinctive: grep-able
             "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30), "AWS_SESSION_TOKEN": secrets.token_urlsafe(40)}
    r = cli("tune", "--space", space_file, "--manifest", str(phantom_dir / "manifest.parquet"),
            "--name", "asha", "--storage", f"s3://{bucket}/exps", "--num-samples", "6", "--scheduler", "asha",
            "--max-epochs", "3", "--grace", "1", "--num-cpus", "2", "--max-concurrent", "2",
            "--wandb-project", "cxrtune-test", env={"WANDB_DIR": str(wandb_dir), "WANDB_API_KEY": "", **creds})
    summary = json.loads(r.stdout[r.stdout.index("{\n"):])
    assert summary["trials"] == 6 and summary["errored"] == 0
    assert summary["stopped_early"] >= 1  # ASHA cut some trials before 4 epochs
    assert 0 < summary["best_metric"] <= 1 and set(summary["best_config"]) == {"arch", "optimizer", "lr"}
    assert "Trial status" in r.stdout or "Trial status" in r.stderr  # the live progress table

    s3 = boto3.client("s3", endpoint_url=storage.endpoint_url())
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="exps/asha/")["Contents"]]
    assert any(k.endswith("tuner.pkl") for k in keys) and any("experiment_state" in k for k in keys)
    for k in keys:  # no secret in experiment storage: tuner.pkl and the state files pickle the filesystem
        body = s3.get_object(Bucket=bucket, Key=k)["Body"].read()
        for name, value in creds.items():
            assert value.encode() not in body, (name, k)
    assert "exps/asha/cxrtune.json" in keys and "exps/asha/summary.json" in keys
    assert any(k.endswith("/result.json") for k in keys)
    assert any("/checkpoint_" in k and k.endswith("/model.pt") for k in keys)
    assert any(k.startswith("exps/asha/searcher-state") for k in keys)

    runs = glob.glob(str(wandb_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 6
    logged = summarize(runs[0])
    assert logged["project"] == "cxrtune-test" and logged["group"] == "asha"
    assert {"arch", "optimizer", "lr"} <= set(logged["config"])
    assert logged["history"] and "val_dice" in logged["history"][0]
    images = [row for run in runs for row in summarize(run)["history"] if "overlays/_type" in row]
    assert images and images[0]["overlays/_type"] == "image-file"  # validation overlays per trial
    assert images[0]["overlays/format"] == "png" and images[0]["overlays/width"] > images[0]["overlays/height"]
    for f in wandb_dir.rglob("*"):  # no API key anywhere
        if f.is_file() and f.stat().st_size < 5_000_000:
            assert b"WANDB_API_KEY=" not in f.read_bytes()

    out = tmp_path / "report"
    cli("report", f"s3://{bucket}/exps/asha", "--out", str(out))
    table = (out / "trials.csv").read_text().splitlines()
    assert len(table) == 7 and "param:arch" in table[0]
    imp = json.loads((out / "importance.json").read_text())
    assert imp["evaluator"].startswith("optuna") and set(imp["importance"]) <= {"arch", "optimizer", "lr"}
    assert (out / "correlation.png").exists()

    cli("promote", f"s3://{bucket}/exps/asha", "--to", str(tmp_path / "promoted"))
    meta = json.loads((tmp_path / "promoted" / "best" / "meta.json").read_text())
    assert meta["config"]["task"] == "lung" and (tmp_path / "promoted" / "best" / "model.pt").exists()
    cli("promote", f"s3://{bucket}/exps/asha", "--to", f"s3://{bucket}/runs/retrained", "--retrain", "--epochs", "1")
    run = json.loads(storage.read_text(f"s3://{bucket}/runs/retrained/run.json"))
    assert run["epochs"] == 1 and run["config"]["tuning_subset"] is False
    assert {k: run["config"]["model"][k] for k in ("arch",)} == {"arch": summary["best_config"]["arch"]}


def _finished_trials(exp: Path, epochs: int) -> int:
    done = 0
    for progress in exp.glob("*/progress.csv"):
        if len(progress.read_text().strip().splitlines()) - 1 >= epochs:
            done += 1
    return done


def test_killed_driver_resumes_with_its_searcher(phantom_dir, space_file, tmp_path):
    from ray.tune.search.optuna import OptunaSearch

    exp = tmp_path / "exps" / "resume"
    args = [sys.executable, "-m", "cxrtune.cli", "tune", "--space", space_file, "--manifest",
            str(phantom_dir / "manifest.parquet"), "--name", "resume", "--storage", str(tmp_path / "exps"),
            "--num-samples", "5", "--scheduler", "none", "--max-epochs", "2", "--num-cpus", "2",
            "--max-concurrent", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and _finished_trials(exp, 2) < 2:
        time.sleep(1)
    assert _finished_trials(exp, 2) >= 2, "sweep did not get going"
    time.sleep(2)  # let Tune save its experiment state once more
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.parent.name.split("_")[2] for p in exp.glob("run_trial_*/progress.csv")
              if len(p.read_text().strip().splitlines()) - 1 >= 2}
    time.sleep(3)

    r = cli("tune", "--resume", str(exp))
    summary = json.loads(r.stdout[r.stdout.index("{\n"):])
    assert summary["trials"] == 5 and summary["errored"] == 0

    searcher = OptunaSearch()
    searcher.restore_from_dir(str(exp))
    trials = searcher._ot_study.trials
    assert len(trials) == 5  # one study across the restart, not a fresh one
    configs = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(configs)) == 5  # a restarted seeded sampler would repeat its first proposals
    after = {p.name.split("_")[2] for p in exp.glob("run_trial_*")}
    assert len(before) >= 2 and len(after) == 5 and before <= after  # finished trials were kept


def test_multi_objective_pareto(phantom_dir, space_file, tmp_path):
    r = cli("tune", "--space", space_file, "--manifest", str(phantom_dir / "manifest.parquet"), "--name", "mo",
            "--storage", str(tmp_path / "exps"), "--num-samples", "3", "--scheduler", "asha", "--multi-objective",
            "--max-epochs", "1", "--num-cpus", "2", check=False)
    assert r.returncode == 2 and "no ASHA" not in r.stderr and "--scheduler none" in r.stderr
    cli("tune", "--space", space_file, "--manifest", str(phantom_dir / "manifest.parquet"), "--name", "mo",
        "--storage", str(tmp_path / "exps"), "--num-samples", "3", "--scheduler", "none", "--multi-objective",
        "--max-epochs", "1", "--num-cpus", "2")
    cli("report", str(tmp_path / "exps" / "mo"), "--out", str(tmp_path / "rep"))
    front = (tmp_path / "rep" / "pareto.csv").read_text().splitlines()
    assert len(front) >= 2 and "latency_ms" in front[0]
    assert (tmp_path / "rep" / "pareto.png").exists()


def test_trial_that_cannot_fit_fails_fast(phantom_dir, space_file, tmp_path):
    """A local instance never grows: asking for more than it has is an error, not an endless wait."""
    common = ("tune", "--space", space_file, "--manifest", str(phantom_dir / "manifest.parquet"),
              "--name", "nofit", "--storage", str(tmp_path / "exps"), "--num-cpus", "1")
    r = cli(*common, "--gpus-per-trial", "1000", check=False, timeout=120)
    assert r.returncode == 2 and "a trial asks for 1000 GPUs" in r.stderr and "Traceback" not in r.stderr
    r = cli(*common, "--cpus-per-trial", "2", check=False, timeout=120)
    assert r.returncode == 2 and "2 CPUs but this Ray instance has 1" in r.stderr
    assert not (tmp_path / "exps").exists()  # nothing written


def test_space_errors_name_the_key(tmp_path):
    from cxrtune.errors import CxrtuneError
    from cxrtune.search_space import load_space, parse_space

    bad = {**SPACE, "parameters": {"lr": {"type": "log-float", "low": 0, "high": 1}}}
    with pytest.raises(CxrtuneError, match=r"parameters.lr.low"):
        parse_space(bad)
    with pytest.raises(CxrtuneError, match=r"parameters.arch.values"):
        parse_space({**SPACE, "parameters": {"arch": {"type": "choice", "values": ["Unett"]}}})
    with pytest.raises(CxrtuneError, match=r"parameters.encoder.given"):
        parse_space({**SPACE, "parameters": {"encoder": {"type": "choice", "given": "arch", "values": {"x": ["a"]}}}})
    for f in Path(__file__).parent.parent.glob("search_spaces/*.yaml"):
        space = load_space(str(f))
        assert space.params
