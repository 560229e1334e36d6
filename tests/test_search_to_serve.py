"""One path from a sweep to a served scorer (issue 23): a multi-objective Stage II sweep (score
MAE at each trial's own operating point against the int8 latency measured per network in a
latency table, ASHA, a constraint) -> ``cxrtune report`` (its fronts, over the sweep's own cost,
another table's and GMACs, checked against ones computed here from the trials' own result files)
-> ``promote --pick`` -> ``bundle make`` -> ``calibrate`` -> ``cxrtune serve`` -> a score over
HTTP, each hand-off asserted: the served Stage II weights are the promoted checkpoint's, and the
served model card names the promoted trial and how it was chosen."""

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import requests
import yaml

from cxrtune.data import manifest
from cxrtune.data.splits import split_hash
from cxrtune.model.artifacts import bundle_hash, read_bundle_meta
from cxrtune.search.report import pareto_front
from tests.conftest import cli, cli_in_process, ctrl_c_reaches_it, shipped_cpu_config, stop_with_ctrl_c, wait_until_ready

EPOCHS = 2
SPACE = {
    "task": "disease", "objective": "score_mae",
    "fixed": {"batch_size": 4, "size": 64, "model": {"in_channels": 1, "encoder": "resnet18"}},
    "parameters": {
        "arch": {"type": "choice", "values": ["FPN", "Unet", "Linknet"]},
        "decoder": {"type": "choice", "given": "arch", "values": {"Linknet": ["standard"], "default": ["slim", "standard"]}},
        "lr": {"type": "log-float", "low": 1e-4, "high": 1e-2},
    },
    # tried first, one at a time: the first trial to reach ASHA's rung is never cut, so a feasible
    # point is trained to the end (U-Net, slim decoder: ~0.19 GMACs at 64 px); then a violator
    "warm_start": [{"arch": "Unet", "decoder": "slim", "lr": 3e-3}, {"arch": "Linknet", "decoder": "standard", "lr": 3e-3}],
}
# A minimum-capacity constraint, GMACs >= 0.17: Linknet (~0.16) and FPN with the slim decoder
# (~0.15), the space's cheapest points, violate it (tests/test_report.py checks that the filter keeps
# a violator that would lead the front off it)
MIN_COST = 0.17
# The latency table the sweep's cost comes from (made here: U-Net fast, FPN slow, the reverse of
# their GMACs), and another one a report may draw the front over instead
INT8_MS = {("FPN", "slim"): 9.0, ("FPN", "standard"): 8.0, ("Unet", "slim"): 2.0, ("Unet", "standard"): 1.0,
           ("Linknet", "standard"): 0.5}
OTHER_MS = {("FPN", "slim"): 1.0, ("FPN", "standard"): 2.0, ("Unet", "slim"): 3.0, ("Unet", "standard"): 4.0,
            ("Linknet", "standard"): 0.5}


def write_latency_table(path: Path, ms: dict) -> Path:
    pd.DataFrame([{"arch": a, "encoder": "resnet18", "decoder": d, "size": 64, "gmacs": 0.0, "params_m": 0.0,
                   "int8_ms_per_image": v, "batch": 4, "threads": 1} for (a, d), v in ms.items()]).to_csv(path, index=False)
    return path


def network_ms(ms: dict):
    """A trial's latency in ``ms``, read from its own reported config."""
    def of(row: dict) -> float:
        arch = row["config"]["arch"]
        return ms[(arch, row["config"].get(f"decoder|{arch}", row["config"].get("decoder")))]
    return of


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def trial_results(experiment: Path) -> dict[str, list[dict]]:
    """Each trial's reported results, read from its own ``result.json`` (not through cxrtune)."""
    out = {}
    for f in experiment.glob("*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


def independent_front(results: dict[str, list[dict]], constraints, cost) -> set[str]:
    """Trials trained to the last epoch, meeting every constraint with their last result, that
    no other such trial beats on both score MAE (lower) and ``cost`` (lower)."""
    last = {t: rows[-1] for t, rows in results.items()
            if rows[-1]["training_iteration"] == EPOCHS and all(ok(rows[-1]) for ok in constraints)}

    def beats(a: dict, b: dict) -> bool:
        return (a["val_score_mae"] <= b["val_score_mae"] and cost(a) <= cost(b)
                and (a["val_score_mae"] < b["val_score_mae"] or cost(a) < cost(b)))

    return {t for t, r in last.items() if not any(beats(o, r) for u, o in last.items() if u != t)}


@pytest.mark.slow
def test_sweep_report_promote_bundle_calibrate_serve(phantom_dir, phantom_bundle, tmp_path):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    m = str(phantom_dir / "manifest.parquet")
    exp = tmp_path / "exps" / "mo"
    latency_csv = write_latency_table(tmp_path / "int8_ms.csv", INT8_MS)
    measured = network_ms(INT8_MS)
    r = cli("tune", "--space", str(space), "--manifest", m, "--name", "mo", "--storage", str(tmp_path / "exps"),
            "--num-samples", "6", "--scheduler", "asha", "--grace", "1", "--reduction-factor", "2",
            "--max-epochs", str(EPOCHS), "--multi-objective", "--latency-table", str(latency_csv),
            "--lung-bundle", str(phantom_bundle),
            "--constraint", f"gmacs>={MIN_COST}", "--constraint", "val_fp_rate_normal<=1.0",
            "--num-cpus", "2", "--max-concurrent", "1", "--seed", "3")
    summary = json.loads(r.stdout[r.stdout.index("{\n"):])
    assert summary["trials"] == 6 and summary["errored"] == 0
    results = trial_results(exp)
    assert len(results) == 6
    for rows in results.values():  # each trial at its own operating point, on every validation row
        last = rows[-1]
        # the phantoms' validation split: 5 labelled rows (T_cls), 2 of them Normal (FP rate), 4 with
        # a zone reference (MAE; the other-pneumonia phantom has none)
        assert last["val_n"] == 4 and last["val_n_normal"] == 2 and 0 <= last["val_f1_at_t_cls"] <= 1
        assert 0 <= last["val_cls_threshold"] <= 1 and 0 < last["val_zone_threshold"] <= 1
        assert last["val_fp_rate_normal"] in (0.0, 0.5, 1.0) and last["gmacs"] > 0
        assert last["int8_ms"] == measured(last)  # the cost: the network's entry in the table
    assert (exp / "latency_table.csv").read_bytes() == latency_csv.read_bytes()  # kept with the experiment

    # the study: constraints stored on every finished trial, stopped trials pruned without values
    study = optuna.load_study(study_name="mo", storage=optuna.storages.JournalStorage(
        JournalFileBackend(str(exp / "optuna.journal"))))
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 6 and all(set(t.constraints) == {"gmacs", "val_fp_rate_normal"} for t in finished)
    stopped = {t for t, rows in results.items() if rows[-1]["training_iteration"] < EPOCHS}
    assert len([t for t in finished if t.state == optuna.trial.TrialState.PRUNED]) == len(stopped)
    assert all(t.values is None for t in finished if t.state == optuna.trial.TrialState.PRUNED)
    told = [t for t in finished if t.state == optuna.trial.TrialState.COMPLETE]
    assert told and {t.values[1] for t in told} <= set(INT8_MS.values())  # Optuna's second objective: int8 ms
    # (whether ASHA cuts a trial here depends on the phantoms' coarse MAEs: that stopped trials stay
    # off the front is checked on a made table too, tests/test_report.py)
    infeasible = {t for t, rows in results.items() if rows[-1]["gmacs"] < MIN_COST}
    assert infeasible  # the warm-started Linknet at least

    constraints = [lambda x: x["gmacs"] >= MIN_COST, lambda x: x["val_fp_rate_normal"] <= 1.0]
    cli_in_process("report", str(exp), "--out", str(tmp_path / "rep"))
    front = pd.read_csv(tmp_path / "rep" / "pareto.csv", dtype={"trial_id": str})  # "12345678" stays an id
    expected = independent_front(results, constraints, measured)  # over the sweep's own cost
    assert expected and set(front["trial_id"]) == expected
    assert dict(zip(front["trial_id"], front["int8_ms"])) == {t: measured(results[t][-1]) for t in front["trial_id"]}
    assert not (set(front["trial_id"]) & (stopped | infeasible))
    assert (tmp_path / "rep" / "pareto.png").stat().st_size > 1000  # drawn: tests/test_report.py reads its artists
    table = pd.read_csv(tmp_path / "rep" / "trials.csv", dtype={"trial_id": str})
    assert set(table.loc[~table["feasible"], "trial_id"]) == infeasible
    by_gmacs = pareto_front(table, "val_score_mae", "min", "gmacs")  # the front a GMACs sweep would draw
    assert set(by_gmacs["trial_id"]) == independent_front(results, constraints, lambda x: x["gmacs"])

    # a report may redraw the front over another table (e.g. measured on the serving hardware)
    other_csv = write_latency_table(tmp_path / "other_ms.csv", OTHER_MS)
    cli_in_process("report", str(exp), "--out", str(tmp_path / "rep-other"), "--latency-table", str(other_csv))
    front_other = pd.read_csv(tmp_path / "rep-other" / "pareto.csv", dtype={"trial_id": str})
    assert set(front_other["trial_id"]) == independent_front(results, constraints, network_ms(OTHER_MS))
    other = network_ms(OTHER_MS)
    assert dict(zip(front_other["trial_id"], front_other["int8_ms"])) == {
        t: other(results[t][-1]) for t in front_other["trial_id"]}  # the other table's numbers, not the sweep's

    # promote the cheapest point of the front within any accuracy, recorded with how it was chosen
    run = tmp_path / "runs" / "picked"
    refused = cli_in_process("promote", str(exp), "--to", str(run), check=False)
    assert refused.returncode == 2 and "--pick" in refused.stderr
    cli_in_process("promote", str(exp), "--to", str(run), "--pick", "fastest:accuracy<=best+6")
    picked = front.sort_values(["int8_ms", "val_score_mae", "trial_id"]).iloc[0]["trial_id"]
    meta = json.loads((run / "best" / "meta.json").read_text())
    search = meta["search"]
    assert search["trial"] == picked and search["pick"] == "fastest:accuracy<=best+6"
    assert search["sampler"] == "tpe" and search["seed"] == 3 and search["objectives"] == ["val_score_mae", "int8_ms"]
    assert search["split_hash"] == split_hash(manifest.load_manifest(m))  # recorded when the sweep started
    assert search["space"] == str(space) and search["space_definition"] == yaml.safe_load(space.read_text())
    kept = exp / "latency_table.csv"  # the sweep's own table, as its trials read it
    assert search["latency_table"] == str(kept) and search["latency_table_sha256"] == sha256(latency_csv)
    assert json.loads((run / "run.json").read_text())["search"] == search
    trial_dir = next(d for d in exp.iterdir() if d.is_dir() and picked in d.name)
    last_checkpoint = sorted(trial_dir.glob("checkpoint_*"))[-1]
    assert sha256(run / "best" / "model.pt") == sha256(last_checkpoint / "model.pt")

    # any trial by its id, on the front or not (a candidate to be compared after retraining)
    named = sorted(infeasible)[0]
    refused = cli_in_process("promote", str(exp), "--to", str(tmp_path / "runs" / "x"), "--trial", named,
                             "--pick", "most-accurate", check=False)
    assert refused.returncode == 2 and "give one" in refused.stderr
    refused = cli_in_process("promote", str(exp), "--to", str(tmp_path / "runs" / "x"), "--trial", "nosuch", check=False)
    assert refused.returncode == 2 and "no trial 'nosuch'" in refused.stderr
    cli_in_process("promote", str(exp), "--to", str(tmp_path / "runs" / "named"), "--trial", named)
    named_search = json.loads((tmp_path / "runs" / "named" / "run.json").read_text())["search"]
    assert named_search["trial"] == named and named_search["pick"] == f"trial {named}"
    named_dir = next(d for d in exp.iterdir() if d.is_dir() and named in d.name)
    assert sha256(tmp_path / "runs" / "named" / "best" / "model.pt") == sha256(
        sorted(named_dir.glob("checkpoint_*"))[-1] / "model.pt")
    refused = cli_in_process("promote", str(exp), "--to", str(run), "--trial", named, check=False)  # a run is there
    assert refused.returncode == 2 and "holds a run already" in refused.stderr
    assert sha256(run / "best" / "model.pt") == sha256(last_checkpoint / "model.pt")  # untouched

    # the most accurate point, retrained with settings over its config, recorded with the search
    refused = cli_in_process("promote", str(exp), "--to", str(tmp_path / "runs" / "x"), "--pick", "most-accurate",
                             "--set", "max_train_images=8", check=False)
    assert refused.returncode == 2 and "add --retrain" in refused.stderr
    cli_in_process("promote", str(exp), "--to", str(tmp_path / "runs" / "accurate"), "--pick", "most-accurate",
                   "--retrain", "--epochs", "1", "--set", "max_train_images=8")
    retrained = json.loads((tmp_path / "runs" / "accurate" / "run.json").read_text())
    most_accurate = front.sort_values(["val_score_mae", "int8_ms", "trial_id"]).iloc[0]["trial_id"]
    assert retrained["config"]["max_train_images"] == 8 and retrained["config"]["tuning_subset"] is False
    assert retrained["search"]["trial"] == most_accurate and retrained["search"]["overrides"] == {"max_train_images": 8}
    assert json.loads((tmp_path / "runs" / "accurate" / "best" / "meta.json").read_text())["search"] == retrained["search"]

    made, calibrated = tmp_path / "made", tmp_path / "calibrated"
    cli_in_process("bundle", "make", "--lung", str(phantom_bundle.parent / "lung"), "--disease", str(run),
                   "--out", str(made))
    cli_in_process("calibrate", str(made), "--out", str(calibrated), "--manifest", m, "--what", "cls,zone")
    assert sha256(calibrated / "disease.pt") == sha256(last_checkpoint / "model.pt")
    served_meta = read_bundle_meta(str(calibrated))
    assert served_meta.model_card["stages"]["disease"]["search"] == search  # the card, whole
    # the hash the serving loader checks disease.pt against before it loads it, and bundle_hash covers
    assert served_meta.files["disease.pt"] == sha256(last_checkpoint / "model.pt")

    config, port = shipped_cpu_config(tmp_path, calibrated)
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "cxrtune.cli", "serve", "--bundle", str(calibrated),
                             "--config", str(config)], preexec_fn=ctrl_c_reaches_it,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, proc, Path(log.name))
        text = Path(log.name).read_text()
        key = next(line for line in text.splitlines() if line.startswith("API key for this run")).rsplit(" ", 1)[1]
        models = requests.get(f"{base}/v1/models", headers={"X-API-Key": key}, timeout=10).json()
        card = models["model_card"]["stages"]["disease"]["search"]
        assert card["trial"] == picked and card["pick"] == "fastest:accuracy<=best+6"
        for what in ("sampler", "seed", "split_hash", "space_definition", "objectives", "constraints"):
            assert card[what] == search[what], what  # how the point was found, shown to clients
        assert "space" not in card and "manifest" not in card  # paths are not shown to clients
        image = sorted((phantom_dir / "images").iterdir())[1]
        record = requests.post(f"{base}/v1/score", data=image.read_bytes(), headers={"X-API-Key": key},
                               timeout=60).json()
        assert record["models"]["bundle_hash"] == bundle_hash(str(calibrated))  # the bundle whose disease.pt is the trial's
        assert record["status"] in ("scored", "partial", "unscored") and not math.isnan(record["threshold"])
    finally:
        stop_with_ctrl_c(proc)
