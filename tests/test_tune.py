"""The search service on a real local Ray instance (through the real CLI, in subprocesses):
ASHA stops trials early, results land on the S3 server over HTTP, W&B offline runs hold the
metrics, the report is produced, a killed driver's sweep resumes with its searcher."""

import csv
import glob
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import yaml

from cxrtune import storage
from tests import golden
from tests.conftest import cli, cli_in_process, ray_session_logs
from tests.wandb_reader import summarize

SPACE = {
    "task": "lung", "objective": "dice",
    "fixed": {"batch_size": 4, "size": 64, "model": {"in_channels": 1, "encoder": "resnet18"}},
    "parameters": {
        "arch": {"type": "choice", "values": ["FPN", "Linknet"]},
        "optimizer": {"type": "choice", "values": ["adam", "sgd"]},
        "lr": {"type": "log-float", "low": 1e-5, "high": 1e-2},
    },
}


@pytest.fixture
def space_file(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(SPACE))
    return str(path)


@pytest.fixture
def study_database(request):
    """The PostgreSQL fixture's ``(URL, password)``, or None where PostgreSQL cannot start (the
    sweep then keeps its study in the journal, and the test says what it did not check)."""
    try:
        return request.getfixturevalue("postgres")
    except pytest.skip.Exception as exc:
        return str(exc)


@pytest.mark.slow
def test_asha_sweep_on_s3_with_wandb_report_and_promote(phantom_dir, space_file, bucket, tmp_path, study_database):
    """...and its study in a real PostgreSQL. Canary secrets (a W&B key, AWS credentials, the
    database password) reach no stored object, no W&B file and no Ray log."""
    import secrets

    database = study_database if isinstance(study_database, tuple) else None

    wandb_dir = tmp_path / "wb"
    wandb_dir.mkdir()
    aws = {"AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),  # distinctive: grep-able
           "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30), "AWS_SESSION_TOKEN": secrets.token_urlsafe(40)}
    creds = {**aws, "WANDB_API_KEY": "canary" + secrets.token_hex(18)}  # a W&B key (40 characters); offline
    if database:
        creds["CXRTUNE_OPTUNA_PASSWORD"] = database[1]
    warm = tmp_path / "warm.yaml"
    warm.write_text(yaml.safe_dump({"arch": "Linknet", "optimizer": "sgd", "lr": 0.00123}))
    r = cli("tune", "--space", space_file, "--manifest", str(phantom_dir / "manifest.parquet"),
            "--name", "asha", "--storage", f"s3://{bucket}/exps", "--num-samples", "6", "--scheduler", "asha",
            "--max-epochs", "3", "--grace", "1", "--num-cpus", "2", "--max-concurrent", "2",
            "--warm-start", str(warm), "--wandb-project", "cxrtune-test", "--wandb-images",
            *(["--optuna-storage", database[0]] if database else []),
            env={"WANDB_DIR": str(wandb_dir), "WANDB_MODE": "offline", "CXRTUNE_OPTUNA_DIR": str(tmp_path / "optuna"),
                 **creds})
    ray_logs = [f for f in ray_session_logs().rglob("*") if f.is_file()]  # the sweep's Ray
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

    # the Optuna study, in the database (else in the journal copied beside the experiment): what
    # optuna-dashboard opens
    import optuna
    from optuna.storages.journal import JournalFileBackend

    options = json.loads(s3.get_object(Bucket=bucket, Key="exps/asha/cxrtune.json")["Body"].read())
    if database:
        assert options["optuna_storage"] == database[0]  # recorded without its password
        assert "exps/asha/optuna.journal" not in keys
        study = optuna.load_study(study_name="asha", storage=optuna.storages.RDBStorage(
            database[0], engine_kwargs={"connect_args": {"password": database[1]}}))
    else:
        journal = tmp_path / "optuna.journal"
        journal.write_bytes(s3.get_object(Bucket=bucket, Key="exps/asha/optuna.journal")["Body"].read())
        study = optuna.load_study(study_name="asha", storage=optuna.storages.JournalStorage(JournalFileBackend(str(journal))))
    states = [t.state for t in study.trials]
    assert len(states) == 6
    # trials ASHA stopped reach Optuna as PRUNED, with their last value; the others COMPLETE
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert len(pruned) == summary["stopped_early"] and all(t.value is not None for t in pruned)
    assert states.count(optuna.trial.TrialState.COMPLETE) == 6 - len(pruned)
    assert study.trials[0].params == {"arch": "Linknet", "optimizer": "sgd", "lr": 0.00123}  # the warm start

    runs = glob.glob(str(wandb_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 6
    logged = summarize(runs[0])
    assert logged["project"] == "cxrtune-test" and logged["group"] == "asha"
    assert {"arch", "optimizer", "lr"} <= set(logged["config"])
    assert logged["history"] and "val_dice" in logged["history"][0]
    images = [row for run in runs for row in summarize(run)["history"] if "overlays/_type" in row]
    assert images and images[0]["overlays/_type"] == "image-file"  # validation overlays per trial
    assert images[0]["overlays/format"] == "png" and images[0]["overlays/width"] > images[0]["overlays/height"]
    assert ray_logs
    for f in [*wandb_dir.rglob("*"), *ray_logs]:  # no secret in W&B's files or Ray's session logs
        if f.is_file() and f.stat().st_size < 50_000_000:
            data = f.read_bytes()
            assert b"WANDB_API_KEY=" not in data and not [n for n, v in creds.items() if v.encode() in data], f
    assert not [n for n, v in creds.items() if v in r.stdout or v in r.stderr]  # nor in what the command printed

    out = tmp_path / "report"
    cli_in_process("report", f"s3://{bucket}/exps/asha", "--out", str(out))
    table = (out / "trials.csv").read_text().splitlines()
    golden.check("report_trials_columns", sorted(table[0].split(",")), exact=True)
    golden.check("report_importance", json.loads((out / "importance.json").read_text()))
    golden.check("tune_summary", summary)
    assert len(table) == 7 and "param:arch" in table[0]
    imp = json.loads((out / "importance.json").read_text())
    assert imp["evaluator"].startswith("optuna") and set(imp["importance"]) <= {"arch", "optimizer", "lr"}
    assert (out / "correlation.png").exists()

    cli_in_process("promote", f"s3://{bucket}/exps/asha", "--to", str(tmp_path / "promoted"))
    meta = json.loads((tmp_path / "promoted" / "best" / "meta.json").read_text())
    assert meta["config"]["task"] == "lung" and (tmp_path / "promoted" / "best" / "model.pt").exists()
    cli_in_process("promote", f"s3://{bucket}/exps/asha", "--to", f"s3://{bucket}/runs/retrained", "--retrain",
                   "--epochs", "1")
    run = json.loads(storage.read_text(f"s3://{bucket}/runs/retrained/run.json"))
    assert run["epochs"] == 1 and run["config"]["tuning_subset"] is False
    assert {k: run["config"]["model"][k] for k in ("arch",)} == {"arch": summary["best_config"]["arch"]}
    if not database:
        pytest.skip(f"the sweep passed with its study in the journal; the database part was not run: {study_database}")


def _trials_past(bucket: str, prefix: str, checkpoint: str) -> set[str]:
    """Trial folders on S3 that hold ``checkpoint`` (checkpoint_000001: two epochs reported)."""
    root = f"s3://{bucket}/{prefix}"
    return {k[len(root):].split("/", 1)[0] for k in storage.list_keys(root) if f"/{checkpoint}/" in k}


MIN_DICE = 0.3  # the resumed sweep's constraint (a 2-epoch phantom trial may or may not reach it)


@pytest.mark.slow
def test_killed_driver_resumes_an_s3_experiment_with_its_searcher(phantom_dir, bucket, tmp_path):
    """The driver of a multi-objective sweep on S3 (Dice against GMACs, a constraint) is killed
    (SIGKILL, no goodbye); `cxrtune tune --resume s3://...` from a fresh process keeps the finished
    trials, runs the rest, and continues the same Optuna study: every trial carries its constraint,
    and the front holds feasible trials only."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    exp = f"s3://{bucket}/exps/resume"
    fixed = tmp_path / "fixed.yaml"  # the space's own epochs, no --max-epochs: honoured
    fixed.write_text(yaml.safe_dump({**SPACE, "fixed": {**SPACE["fixed"], "epochs": 2}}))
    env = {**os.environ, "CXRTUNE_OPTUNA_DIR": str(tmp_path / "optuna-1")}
    args = [sys.executable, "-m", "cxrtune.cli", "tune", "--space", str(fixed), "--manifest",
            str(phantom_dir / "manifest.parquet"), "--name", "resume", "--storage", f"s3://{bucket}/exps",
            "--num-samples", "5", "--scheduler", "none", "--num-cpus", "2", "--max-concurrent", "1",
            "--multi-objective", "--constraint", f"val_dice>={MIN_DICE}"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=env)
    deadline = time.time() + 300
    while time.time() < deadline and len(_trials_past(bucket, "exps/resume/", "checkpoint_000001")) < 2:
        time.sleep(1)
    before = _trials_past(bucket, "exps/resume/", "checkpoint_000001")
    assert len(before) >= 2, "sweep did not get going"
    # kill once the experiment state on S3 holds those trials as finished (Tune uploads it in the
    # background; a trial's folder is named there from its start, so the name alone is not enough)
    def terminated() -> set[str]:
        states = sorted(k for k in storage.list_keys(f"{exp}/") if "/experiment_state" in k)
        if not states:
            return set()
        trials = [json.loads(t) for t, _ in json.loads(storage.read_text(states[-1]))["trial_data"]]
        return {t["relative_logdir"] for t in trials if t["status"] == "TERMINATED"}

    deadline, done = time.time() + 120, set()
    while time.time() < deadline and not before <= done:
        done = terminated()
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    assert before <= done, f"Tune's state on S3 did not hold {before} as finished in 120 s"
    proc.wait()

    # Tune uploads its experiment state and the searcher's in the background, one file after the
    # other: a kill between them leaves a searcher state from another moment, whose concurrency
    # limiter holds a finished trial live (the CI hang of 2026-12-07). Made certain here: the saved
    # limiter also holds a finished trial live; the resumed sweep must drop it, not wait for ever
    import ray.cloudpickle as cloudpickle

    saved = sorted(k for k in storage.list_keys(f"{exp}/") if "/search_gen_state-" in k)[-1]
    state = cloudpickle.loads(storage.read_bytes(saved))
    limiter = state["name:ConcurrencyLimiter"]
    limiter["live_trials"] = {*limiter["live_trials"], sorted(before)[0].split("_")[2]}  # run_trial_<id>_<n>_...
    limiter["num_unfinished_live_trials"] = len(limiter["live_trials"])
    storage.write_bytes(saved, cloudpickle.dumps(state))

    # a fresh driver elsewhere: the local Optuna journal is gone, the copy beside the experiment is not
    import shutil

    shutil.rmtree(tmp_path / "optuna-1")
    r = cli("tune", "--resume", exp, env={"CXRTUNE_OPTUNA_DIR": str(tmp_path / "optuna-2")})
    summary = json.loads(r.stdout[r.stdout.index("{\n"):])
    assert summary["trials"] == 5 and summary["errored"] == 0
    after = _trials_past(bucket, "exps/resume/", "checkpoint_000001")
    assert len(after) == 5 and before <= after  # finished trials were kept, not rerun under new names

    journal = tmp_path / "optuna.journal"
    journal.write_bytes(storage.read_bytes(f"{exp}/optuna.journal"))
    study = optuna.load_study(study_name="resume", storage=optuna.storages.JournalStorage(JournalFileBackend(str(journal))))
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 5  # one study across the restart, not a fresh one
    configs = [tuple(sorted(t.params.items())) for t in finished]
    assert len(set(configs)) == 5  # a restarted seeded sampler would repeat its first proposals
    assert all(set(t.constraints) == {"val_dice"} for t in finished)  # set before each was told, kept across the kill
    for t in finished:
        assert t.constraints["val_dice"] == pytest.approx(MIN_DICE - t.values[0])  # >= limit: limit - value
    assert study.best_trials and all(t.values[0] >= MIN_DICE for t in study.best_trials)
    logged = [[int(r["training_iteration"]) for r in csv.DictReader(io.StringIO(storage.read_text(k)))]
              for k in storage.list_keys(f"{exp}/") if k.endswith("/progress.csv")]
    # `fixed: epochs: 2`, not the default 16: epochs 1 and 2. A trial the kill interrupted is rerun
    # from the last checkpoint Tune had recorded, so its epochs after that checkpoint are reported
    # at least once: its log holds only the rerun's rows ([2]) or repeats that tail once, when
    # the row had reached S3 before Tune saved the trial's state ([1, 2, 2]; [1, 1, 2] from none)
    assert len(logged) == 5 and all(its in ([1, 2], [2], [1, 2, 2], [1, 1, 2]) for its in logged), logged


@pytest.mark.slow
def test_trial_that_cannot_fit_fails_fast(phantom_dir, space_file, tmp_path):
    """A local instance never grows: asking for more than it has is an error, not an endless wait."""
    common = ("tune", "--space", space_file, "--manifest", str(phantom_dir / "manifest.parquet"),
              "--name", "nofit", "--storage", str(tmp_path / "exps"), "--num-cpus", "1")
    r = cli(*common, "--gpus-per-trial", "1000", check=False, timeout=120)
    assert r.returncode == 2 and "a trial asks for 1000 GPUs" in r.stderr and "Traceback" not in r.stderr
    r = cli(*common, "--cpus-per-trial", "2", check=False, timeout=120)
    assert r.returncode == 2 and "2 CPUs but this Ray instance has 1" in r.stderr
    # a disk past Ray's threshold (here: any disk, at a threshold of 0) fails trials' writes: refused
    r = cli(*common, env={"RAY_local_fs_capacity_threshold": "0"}, check=False, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("cxrtune: error: the sweep cannot start: ") and " full (" in r.stderr, r.stderr
    assert "RAY_local_fs_capacity_threshold" in r.stderr
    assert not (tmp_path / "exps").exists()  # nothing written
    # an Optuna storage that cannot be opened: refused before the experiment is written, so the
    # same --name, corrected, starts (no "exists: continue it with --resume" for a sweep that never ran)
    r = cli(*common, "--optuna-storage", f"sqlite:///{tmp_path}/no/such/folder/optuna.db", check=False, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("cxrtune: error: cannot open the Optuna storage sqlite:///")
    assert not (tmp_path / "exps").exists()


@pytest.mark.slow
def test_a_disk_that_fills_during_a_sweep_is_an_error_that_names_it(phantom_dir, space_file, tmp_path):
    """Storage on a real 3 MiB filesystem: room to start, none for a checkpoint. The sweep exits
    with the full disk named, not with a summary of 0 trials (the CI failure of 2026-12-06, when
    the machine's disk filled)."""
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    if not shutil.which("mount"):
        pytest.skip("no mount command here")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(tiny)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        r = cli("tune", "--space", space_file, "--manifest", str(phantom_dir / "manifest.parquet"), "--name", "full",
                "--storage", str(tiny / "exps"), "--num-samples", "2", "--scheduler", "none", "--max-epochs", "2",
                "--num-cpus", "2", "--max-failures", "0", check=False)
    finally:
        subprocess.run(["umount", "-l", str(tiny)], check=False)
    assert r.returncode == 2, (r.returncode, r.stdout[-1500:], r.stderr[-1500:])
    last = r.stderr.strip().splitlines()[-1]  # the message, no traceback of cxrtune's after it
    assert last.startswith("cxrtune: error: ") and "{\n" not in r.stdout  # and no summary
    assert f"{tiny / 'exps'}: the disk is " in last and "Free space there first" in last, last


@pytest.mark.slow
def test_a_sweep_in_which_no_trial_reports_is_an_error(phantom_dir, space_file, tmp_path):
    """Every image corrupt: each trial fails before its first epoch. The sweep exits 2 saying so,
    not 0 with a summary of 0 trials."""
    bad = tmp_path / "bad"
    shutil.copytree(phantom_dir, bad)
    for image in (bad / "images").glob("*.png"):
        image.write_bytes(b"not a PNG" * 10)
    r = cli("tune", "--space", space_file, "--manifest", str(bad / "manifest.parquet"), "--name", "bad",
            "--storage", str(tmp_path / "exps"), "--num-samples", "2", "--scheduler", "none", "--max-epochs", "1",
            "--num-cpus", "2", "--max-failures", "0", check=False)
    assert r.returncode == 2 and "{\n" not in r.stdout, (r.returncode, r.stdout[-1500:])
    assert (f"cxrtune: error: {tmp_path / 'exps' / 'bad'}: all 2 trials failed before reporting; their error files "
            "are in the trial folders") in r.stderr.strip().splitlines()[-3:]


@pytest.mark.slow
def test_hyperband_and_patience_stop_trials(phantom_dir, space_file, tmp_path):
    """HyperBand with max_t 4: brackets (3 x [4]), (3 x [2, 4]): of 6 trials the second bracket's
    worst is cut at epoch 2. The patience stopper with a min_delta nothing can beat ends every
    trial after 1 + patience epochs."""
    common = ("--space", space_file, "--manifest", str(phantom_dir / "manifest.parquet"), "--storage",
              str(tmp_path / "exps"), "--num-cpus", "2", "--max-concurrent", "2")
    r = cli("tune", *common, "--name", "hb", "--num-samples", "6", "--scheduler", "hyperband", "--max-epochs", "4",
            "--patience", "0")
    summary = json.loads(r.stdout[r.stdout.index("{\n"):])
    assert summary["trials"] == 6 and summary["errored"] == 0
    assert "HyperBand brackets (trials, milestones in epochs): 3 x [4]; 3 x [2, 4]; 4 x [1, 2, 4]" in r.stderr
    epochs = sorted(len(p.read_text().strip().splitlines()) - 1 for p in (tmp_path / "exps" / "hb").glob("*/progress.csv"))
    assert len(epochs) == 6 and max(epochs) == 4 and all(e in (2, 4) for e in epochs), epochs  # its milestones
    shutil.rmtree(tmp_path / "exps" / "hb")  # 6 trials' checkpoints, ~2 GB: checked, not needed again
    r = cli("tune", *common, "--name", "patience", "--num-samples", "2", "--scheduler", "none", "--max-epochs", "4",
            "--patience", "1", "--min-delta", "1.0")
    summary = json.loads(r.stdout[r.stdout.index("{\n"):])
    epochs = [len(p.read_text().strip().splitlines()) - 1 for p in (tmp_path / "exps" / "patience").glob("*/progress.csv")]
    assert summary["stopped_early"] == 2 and epochs == [2, 2], epochs
    # a floor no trial reaches (Dice above 1) cuts every trial after its first epoch, alongside patience
    r = cli("tune", *common, "--name", "hopeless", "--num-samples", "2", "--scheduler", "none", "--max-epochs", "3",
            "--patience", "5", "--cut-below", "1.01")
    summary = json.loads(r.stdout[r.stdout.index("{\n"):])
    epochs = [len(p.read_text().strip().splitlines()) - 1 for p in (tmp_path / "exps" / "hopeless").glob("*/progress.csv")]
    assert summary["stopped_early"] == 2 and epochs == [1, 1], epochs


def test_hopeless_trial_rule():
    from cxrtune.search.tuning import HopelessTrial

    dice = HopelessTrial("val_dice", "max", 0.05)
    assert dice("t", {"val_dice": 0.0, "training_iteration": 1})
    assert not dice("t", {"val_dice": 0.2, "training_iteration": 1})
    assert not dice("t", {"val_dice": 0.0, "training_iteration": 2})  # only the first epoch is judged
    mae = HopelessTrial("val_score_mae", "min", 2.5)
    assert mae("t", {"val_score_mae": 3.0, "training_iteration": 1})
    assert not mae("t", {"val_score_mae": 1.0, "training_iteration": 1})


def test_hyperband_brackets_are_rays_and_the_docs_say_so():
    from cxrtune.search.tuning import hyperband_brackets
    from tests.conftest import ROOT

    brackets = hyperband_brackets(16, 2)
    assert [(b["trials"], b["milestones"][0]) for b in brackets] == [(5, 16), (5, 8), (7, 4), (10, 2), (16, 1)]
    assert brackets[2]["milestones"] == [4, 8, 16]
    doc = (ROOT / "docs" / "search_spaces.md").read_text()
    for b in brackets:
        assert f"| s = {b['bracket']} | {b['trials']} | {b['milestones'][0]} |" in doc


def test_budget_sized_sampler_settings_and_warm_start_checks():
    from cxrtune.errors import CxrtuneError
    from cxrtune.search.search_space import load_space, parse_space
    from cxrtune.search.tuning import startup_trials
    from tests.conftest import ROOT

    assert [startup_trials(n) for n in (4, 16, 100)] == [2, 4, 10]
    lung = load_space(str(ROOT / "search_spaces" / "lung_segmentation.yaml"))
    assert lung.optuna_params(lung.warm_start[0]) == {"arch": "DeepLabV3Plus", "encoder|DeepLabV3Plus": "efficientnet-b1",
                                                      "size": 512}
    disease = load_space(str(ROOT / "search_spaces" / "disease_segmentation.yaml"))
    assert disease.warm_start[0] == {"arch": "MAnet", "encoder": "tu-regnetx_064", "size": 544}
    with pytest.raises(CxrtuneError, match=r"warm_start\[0\]: size=1000 is outside"):
        parse_space({**SPACE, "parameters": {**SPACE["parameters"], "size": {"type": "int", "low": 64, "high": 96}},
                     "warm_start": [{"size": 1000}]}, "s")


def test_space_errors_name_the_key(tmp_path):
    from cxrtune.errors import CxrtuneError
    from cxrtune.search.search_space import load_space, parse_space

    bad = {**SPACE, "parameters": {"lr": {"type": "log-float", "low": 0, "high": 1}}}
    with pytest.raises(CxrtuneError, match=r"parameters.lr.low"):
        parse_space(bad)
    with pytest.raises(CxrtuneError, match=r"parameters.arch.values"):
        parse_space({**SPACE, "parameters": {"arch": {"type": "choice", "values": ["Unett"]}}})
    with pytest.raises(CxrtuneError, match=r"parameters.encoder.given"):
        parse_space({**SPACE, "parameters": {"encoder": {"type": "choice", "given": "arch", "values": {"x": ["a"]}}}})
    # a fixed value is checked as a drawn one is, its type too: refused now, not by every trial
    with pytest.raises(CxrtuneError, match=r"fixed.seg_loss: unknown value\(s\) \['dicee'\]"):
        parse_space({**SPACE, "fixed": {**SPACE["fixed"], "seg_loss": "dicee"}})
    with pytest.raises(CxrtuneError, match=r"fixed.model.arch: unknown value\(s\) \['UNet'\]"):
        parse_space({**SPACE, "fixed": {**SPACE["fixed"], "model": {"arch": "UNet"}}})
    with pytest.raises(CxrtuneError, match=r"fixed: training setting lr must be a number, got 'fast'"):
        parse_space({**SPACE, "fixed": {**SPACE["fixed"], "lr": "fast"}})
    with pytest.raises(CxrtuneError, match=r"warm_start\[0\]: lr must be a number, got 'x'"):
        parse_space({**SPACE, "warm_start": [{"lr": "x"}]})
    lr_param = next(p for p in parse_space(SPACE).params if p.name == "lr")
    low = f"{lr_param.low:.0e}".replace("e-0", "e-")  # text as YAML 1.1 reads 1e-4
    space = parse_space({**SPACE, "fixed": {**SPACE["fixed"], "weight_decay": "1e-5"}, "warm_start": [{"lr": low}]})
    assert space.train_config({}).weight_decay == 1e-5
    assert space.optuna_params(space.warm_start[0]) == {"lr": pytest.approx(lr_param.low)}
    for f in Path(__file__).parent.parent.glob("search_spaces/*.yaml"):
        space = load_space(str(f))
        assert space.params


def test_a_start_given_the_encoder_reaches_that_encoders_trials_only():
    """A sweep's trials can start as their retraining will (bench/search_to_serve.py): the encoder
    weights a choice given the encoder, one run for ResNet-18, none for the others. Each trial is
    asked of a real Optuna study and its config rebuilt from Optuna's names, as a trial's is; the
    warm start, which does not name the start, is given it."""
    import optuna

    from cxrtune.search.search_space import parse_space, settings_of

    space = parse_space({"task": "disease", "fixed": {"model": {"in_channels": 1}}, "parameters": {
        "encoder": {"type": "choice", "values": ["resnet18", "mobilenet_v2"]},
        "encoder_weights": {"type": "choice", "given": "encoder", "values": {"resnet18": ["runs/lung"]}}},
        "warm_start": [{"encoder": "resnet18"}]}, "s")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial(space.optuna_params(space.warm_start[0]))
    study.enqueue_trial({"encoder": "mobilenet_v2"})
    models = []
    for _ in range(2):
        trial = study.ask()
        space.suggest(trial)
        models.append(space.train_config(settings_of(trial.params)).model)
    assert [(m.encoder, m.encoder_weights) for m in models] == [("resnet18", "runs/lung"), ("mobilenet_v2", None)]


def _with_reader(phantom_dir: Path, out: Path, grade: int) -> str:
    """The phantom manifest with a reader P who gives every zone ``grade`` (0-3)."""
    from cxrtune.data import manifest
    from cxrtune.zones import ZONE_LETTERS

    df = manifest.load_manifest(str(phantom_dir / "manifest.parquet"))
    for z in ZONE_LETTERS:
        df[f"reader_P_{z}"] = grade
    manifest.save_manifest(df, str(out))
    return str(out)


@pytest.mark.slow
def test_score_mae_objective_is_measured_against_the_reader(phantom_dir, phantom_bundle, tmp_path):
    """The clinical objective against reader P, who calls every zone affected (score 6), at the
    trial's own operating point, recomputed here by brute force: T_cls of maximum F1 over the
    labelled rows (scikit-learn's f1_score at every distinct probability, ties to the lowest), T
    of minimum MAE over the rows refined at that T_cls, then |score - 6| of the records scored at
    (T_cls, T) (the worst error for one not scored) and the FP rate on the Normal rows."""
    import numpy as np
    from sklearn.metrics import f1_score

    from cxrtune.data import manifest
    from cxrtune.errors import CxrtuneError
    from cxrtune.scoring.scorer import load_bundle, zone_fractions
    from cxrtune.search.tuning import ClinicalObjective

    df = manifest.load_manifest(_with_reader(phantom_dir, tmp_path / "m.parquet", 3)).head(8)
    objective = ClinicalObjective(str(phantom_bundle), df, reference="P")
    scorer = load_bundle(str(phantom_bundle)).with_thresholds(opacity=0.5)
    records = [r for r, _ in scorer.with_thresholds(cls=0.0).score_images(objective.images)]
    labels = [int(label != "normal") for label in df["label"]]
    probs = np.array([r["disease_probability"] for r in records], float)
    t_cls = min((-f1_score(labels, probs >= t), t) for t in np.unique(probs))[1]
    fracs = np.array([f if p >= t_cls else [0.0] * 6 for f, p in zip((zone_fractions(r) for r in records), probs)])
    grid = np.round(np.arange(0.01, 1.0001, 0.01), 4)
    t_zone = min((float(np.abs((fracs >= t).sum(1) - 6).mean()), float(np.sqrt((((fracs >= t).sum(1) - 6) ** 2).mean())), t)
                 for t in grid)[2]
    at_point = [r for r, _ in scorer.with_thresholds(cls=t_cls, zone=t_zone).score_images(objective.images)]
    point = objective(scorer.disease.model, scorer.disease.pre, scorer.disease.config)
    assert [sum(r) for r in objective.refs] == [6] * 8
    assert point.cls_threshold == pytest.approx(t_cls) and point.zone_threshold == pytest.approx(t_zone)
    assert point.score_mae == pytest.approx(np.mean([abs(r["score"] - 6) if r["status"] == "scored" else 6
                                                     for r in at_point]))
    normal = [r for r, label in zip(at_point, labels) if label == 0]
    assert point.n == 8 and point.n_normal == len(normal) > 0
    assert point.fp_rate_normal == pytest.approx(np.mean([(r["score"] or 0) > 0 for r in normal]))
    assert not scorer.disease.model.training  # left in the mode it was found in (a trainer's: training)
    with pytest.raises(CxrtuneError, match="reference 'Z' zone scores"):
        ClinicalObjective(str(phantom_bundle), df, reference="Z")


@pytest.mark.slow
def test_score_mae_sweep_against_reader_scores(phantom_dir, phantom_bundle, tmp_path):
    """A Stage II sweep whose objective is the severity-score MAE against reader P (phantoms; never
    brixia-dev: choosing models on it would be training on it)."""
    space = tmp_path / "disease.yaml"
    space.write_text(yaml.safe_dump({
        "task": "disease", "objective": "score_mae",
        "fixed": {"batch_size": 4, "size": 64, "max_val_images": 6, "model": {"in_channels": 1, "encoder": "resnet18"}},
        "parameters": {"arch": {"type": "choice", "values": ["FPN", "Unet"]},
                       "lr": {"type": "log-float", "low": 1e-4, "high": 1e-2}}}))
    r = cli("tune", "--space", str(space), "--manifest", _with_reader(phantom_dir, tmp_path / "m.parquet", 2),
            "--name", "mae", "--storage", str(tmp_path / "exps"), "--num-samples", "2", "--scheduler", "none",
            "--max-epochs", "1", "--num-cpus", "2", "--lung-bundle", str(phantom_bundle), "--reference", "P")
    summary = json.loads(r.stdout[r.stdout.index("{\n"):])
    assert summary["metric"] == "val_score_mae" and summary["mode"] == "min"
    assert summary["trials"] == 2 and summary["errored"] == 0
    reported = [json.loads(line)["val_score_mae"] for f in (tmp_path / "exps" / "mae").glob("*/result.json")
                for line in f.read_text().splitlines() if line.strip()]
    assert len(reported) == 2 and summary["best_metric"] == pytest.approx(min(reported))
    # an MAE of whole-zone errors over the validation rows (at most max_val_images=6): a multiple of 1/n
    from cxrtune.data import manifest

    df = manifest.load_manifest(str(phantom_dir / "manifest.parquet"))
    n = min(6, int(((df["split"] == "val") & (df["lung_mask"] != "") & (df["label"] != "")).sum()))
    assert all(abs(v * n - round(v * n)) < 1e-6 and 0 <= v <= 6 for v in reported), (n, reported)


def test_tune_options_check_themselves_once_before_anything_starts():
    """Every option conflict is refused when the options are made (the CLI, a resume, a test),
    naming the flag, before Ray starts or anything is written."""
    from cxrtune.errors import CxrtuneError
    from cxrtune.search.tuning import EMBEDDED_SPACE, TuneOptions

    base = {"space": EMBEDDED_SPACE, "manifest": "m.parquet", "name": "n", "storage": "s"}
    TuneOptions(**base)  # the embedded default is fine
    for bad, message in (({"scheduler": "pbt"}, "--scheduler must be one of"),
                         ({"sampler": "cmaes"}, "--sampler must be one of tpe, gp, random"),
                         ({"constraints": ["val_dice>=0.5"]}, "--constraint shapes a multi-objective front"),
                         ({"latency_table": "t.csv"}, "--latency-table gives a multi-objective sweep its cost"),
                         ({"multi_objective": True, "constraints": ["val_dice=0.5"]}, "expected NAME<=VALUE"),
                         ({"multi_objective": True, "constraints": ["val_dice>=half"]}, "must be a finite number"),
                         ({"grid": True, "warm_start": [{"lr": 0.1}]}, "--grid runs every combination once"),
                         ({"warm_start": [{"lr": 1e-3}, {"size": 1000}]}, r"--warm-start point 1: size=1000 is outside"),
                         ({"warm_start": [{"depth": 3}]}, "--warm-start point 0: 'depth' is not a parameter"),
                         ({"space": {**EMBEDDED_SPACE, "task": "disease"}, "objective": "score_mae"},
                          "needs --lung-bundle"),
                         ({"wandb_images": True}, "--wandb-images needs --wandb-project")):
        with pytest.raises(CxrtuneError, match=message):
            TuneOptions(**{**base, **bad})


def test_patient_images_reach_wandb_only_when_asked():
    """Validation overlays show the manifest's radiographs: with --wandb-project alone, W&B gets
    metrics and no image; --wandb-images adds them at epochs 1, 4, 8... and the last."""
    from cxrtune.search.tuning import EMBEDDED_SPACE, TuneOptions, wants_overlays

    base = {"space": EMBEDDED_SPACE, "manifest": "m.parquet", "name": "n", "storage": "s", "wandb_project": "p"}
    assert not any(wants_overlays(TuneOptions(**base), e, 9) for e in range(1, 10))
    asked = TuneOptions(**base, wandb_images=True)
    assert [e for e in range(1, 10) if wants_overlays(asked, e, 9)] == [1, 4, 8, 9]


def test_sweeps_and_promotions_that_would_mix_data_are_refused_before_they_start(phantom_dir, tmp_path):
    """`tune --resume` runs with the options the sweep started with: another option is refused by
    name, not dropped; and a manifest whose split changed since is refused before Ray starts, as
    new trials would train and validate on other rows than the finished ones. A sweep asking for a
    tuning subset the manifest lacks, and a promotion into a folder that holds a run, are refused
    before anything runs."""
    import pandas as pd

    from cxrtune.data.splits import split_hash
    from cxrtune.search.tuning import EMBEDDED_SPACE, EXPERIMENT_FILE, EXPERIMENT_FORMAT, TuneOptions
    from tests.conftest import cli_in_process

    df = pd.read_parquet(phantom_dir / "manifest.parquet")
    for column in ("image", "lung_mask", "opacity_mask"):  # the copy elsewhere names the same files
        df[column] = [str(phantom_dir / v) if v else v for v in df[column]]
    manifest_copy = tmp_path / "manifest.parquet"
    df.to_parquet(manifest_copy)
    o = TuneOptions(space=EMBEDDED_SPACE, manifest=str(manifest_copy), name="again", storage=str(tmp_path),
                    split_hash=split_hash(pd.read_parquet(manifest_copy)))
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / EXPERIMENT_FILE).write_text(json.dumps({"format": EXPERIMENT_FORMAT, **o.__dict__}))
    r = cli_in_process("tune", "--resume", tmp_path / "again", "--num-samples", "40", "--scheduler", "none",
                       check=False)
    assert r.returncode == 2 and "it takes no other option: drop --num-samples, --scheduler" in r.stderr, r.stderr
    moved = df.copy()
    moved.loc[moved.index[:3], "split"] = "test" if (moved["split"].iloc[:3] != "test").all() else "train"
    moved.to_parquet(manifest_copy)
    r = cli_in_process("tune", "--resume", tmp_path / "again", check=False)
    assert r.returncode == 2 and "its split or tuning subset changed since the sweep started" in r.stderr, r.stderr

    # a space that tunes on the tuning subset, over a manifest that marks none: refused before Ray
    # starts, not by each trial; nothing written
    subset = tmp_path / "subset.yaml"
    subset.write_text(yaml.safe_dump({**EMBEDDED_SPACE, "fixed": {**EMBEDDED_SPACE["fixed"], "tuning_subset": True}}))
    r = cli_in_process("tune", "--space", subset, "--manifest", manifest_copy, "--name", "subset", "--storage",
                       tmp_path / "exps", check=False)
    assert r.returncode == 2 and "marks no tuning subset" in r.stderr and not (tmp_path / "exps").exists(), r.stderr

    # promote into a folder that holds a run: refused first, before its release gates are scored
    (tmp_path / "run" / "best").mkdir(parents=True)
    (tmp_path / "run" / "best" / "model.pt").write_bytes(b"weights")
    r = cli_in_process("promote", tmp_path / "again", "--to", tmp_path / "run", "--gate", "hide-and-seek=x.json",
                       check=False)
    assert r.returncode == 2 and "run holds a run already: choose another folder" in r.stderr, r.stderr
    assert (tmp_path / "run" / "best" / "model.pt").read_bytes() == b"weights"
