"""Sweep benchmark: TPE + ASHA against random search without early stopping, same budget.

    python bench/sweep.py --cpu [--seeds 0 1] [--budget-minutes 8]      # this 2-core machine
    python bench/sweep.py [--data ../shared/data] [--stage disease] [--budget-minutes 12]
                          [--gpus-per-trial 0.25] [--target 0.75] [--quick]   # a GPU

For the chosen stage it prepares COVID-QU-Ex (official Train split by patient into train/val,
the tuning subset marked: 10 % for lungs, 50 % for disease as in seed 004), then runs two sweeps
of the shipped search space for the same wall-clock budget on fractional GPUs:
(1) Optuna TPE + ASHA + per-trial patience, (2) random sampling, no scheduler, no stopper.
Reports trials per hour, mean GPU utilisation (nvidia-smi), the best validation metric against
trials and wall time, and the wall time each needed to reach ``--target`` (Stage II: COVID-19
infection Dice 0.75 = val_dice). Prints one JSON object.

``--cpu`` (issue 11, item 8): Stage I on real COVID-QU-Ex lungs at 96 px, a tuning subset of about
600 images (16 % of the official Train part by patient; 15 % of it validates), one CPU per trial
and two at once, the shipped lung space cut to CPU-sized networks (encoders ResNet-18,
EfficientNet-B0 and MobileNetV2; no UNet++, DeepLabV3 or MA-Net) with batch 8 and 6 epochs per
trial. TPE + ASHA is the service as configured for a small budget: start-up trials sized to the
budget (``startup_trials``: 3 of at most 12 trials), the space's warm start (seed 004's
DeepLabV3+; its EfficientNet-B1 is not in the cut space), ASHA
rungs at 1, 2 and 4 epochs, patience 3 and trials at Dice < 0.05 after epoch 1 cut at once
(``--cut-below``). Random search: the same space and budget, no warm start, no early stopping.
Each method runs once per seed (``--seeds``). The Dice target (``--target``, 0.88 by default) is
fixed before the runs. Writes ``curves.png`` (best-so-far against wall time, one band per method:
min-max over seeds, the line the median) beside the JSON. ``--ablate`` adds three methods that
each take one ingredient away from TPE + ASHA (its warm start; its cuts; TPE's model, i.e. random
sampling with the same cuts and warm start) and reports each method's speed-up over random search per seed and
its median and spread over seeds (issue 23, item 7: run with ``--seeds 0 1 2 3 4``).

``--cpu --multi-objective`` (issue 23, item 7): Stage II with two objectives, score MAE (each trial
at its own operating point through ``--lung-bundle``, the CPU accuracy bench's Stage I) and served
cost: the network's int8 ms per image in ``--latency-table`` (the shipped table, which holds the
space's networks at 96 px too: ``bench/latency_proxy.py --sizes 96 --append``), or its GMACs with
``--latency-table ''`` (the runs before 2026-12-07), constraint FP rate on Normal <= ``--fp-limit``,
on 600 rows of COVID-QU-Ex's training part (20 % validating), ``search_spaces/disease_cpu.yaml`` at
96-128 px and 4 epochs, 16 trials two at a time in 25 minutes (``--num-samples 24 --budget-minutes
40``: the 24-trial budget): TPE + ASHA (rungs at 2 and 4 epochs, with the space's warm start)
against random search without stopping, per seed (``--seeds``); ``--searches gp_asha`` (or
``tpe_asha gp_asha``) compares Optuna's Gaussian-process sampler (``--sampler gp``) with the same
warm start and cuts, and ``--searches tpe_encoder_starts`` TPE without ASHA whose start-up trials
are the warm start and one partial start per other encoder (so that the cheap encoders are tried
before TPE models), and ``--searches tpe_half_startup`` TPE without ASHA whose random start-up is
half the trials (``tpe_half_startup_beats_constant``: also constrained to beat the constant score's
MAE). Judged by the hypervolume of the feasible, complete trials in (score MAE, cost) against wall
time. Reference point: the MAE of the best constant score on the same validation rows (a trial adds
volume only by beating it) and 1.05 x the costliest feasible trial of the comparison. Target, per
search: its final hypervolume >= random's in every seed, or its time to random's final hypervolume
<= 0.5 x random's; a seed where neither method has a feasible trial better than the constant is not
comparable and fails the target. Volumes over int8 ms cannot be set beside the GMACs ones of the runs
before 2026-12-07 (reanalyse those with ``--latency-table ''``; a run swept over the other cost is
refused).

Why these settings (first run at size, 2026-12-04, docs/BENCHMARKS.md): with the clinical limit
(FP rate 0.10) every trained 4-epoch trial was infeasible (0.40-0.80 at its maximum-F1 T_cls) and
only all-zero scorers met it; after one epoch nearly every trial scores all zeros (MAE 2.72), so
ASHA's first rung at 1 epoch ranked ties; and the fixed reference MAE 3.0 let an all-zero scorer
add volume. ``--fp-limit`` is 0.5 by default at this scale (it still excludes most trained
trials); ``--fp-limit 0.1`` repeats the clinical limit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
ROOT = Path(__file__).resolve().parent.parent


class GpuSampler(threading.Thread):
    """Samples GPU utilisation with nvidia-smi every ``period`` seconds."""

    def __init__(self, period: float = 2.0):
        super().__init__(daemon=True)
        self.period, self.samples, self.stop_event = period, [], threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                util = [float(line.split(",")[0]) for line in out.strip().splitlines() if line.strip()]
                if util:
                    self.samples.append(sum(util) / len(util))
            except (OSError, subprocess.SubprocessError, ValueError):
                pass
            self.stop_event.wait(self.period)

    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def curve(exp_uri: str, metric: str, mode: str) -> list[dict]:
    """Best-so-far metric against wall time since the sweep was started (``created`` in its
    ``cxrtune.json``, set just before Ray starts: start-up counts against both methods alike): one
    point each time it improves (``best`` unrounded)."""
    from ray.tune import ExperimentAnalysis

    from cxrtune import storage
    from cxrtune.search.tuning import load_options

    start = load_options(exp_uri).created
    fs, path = storage.pyarrow_filesystem(exp_uri)
    analysis = ExperimentAnalysis(path, storage_filesystem=fs)
    events = []
    for df in analysis.trial_dataframes.values():
        if metric in df and "timestamp" in df:
            events += list(zip(df["timestamp"], df[metric]))
    events.sort()
    best, points = None, []
    sign = 1 if mode == "max" else -1
    for ts, value in events:
        if best is None or sign * value > sign * best:
            best = value
            points.append({"elapsed_s": round(ts - start, 1), "best": float(best)})
    return points


def trial_counts(exp: Path, epochs: int) -> dict:
    """Trials started, run to their last epoch, and ended before it (by ASHA, a stopper or the budget)."""
    import pandas as pd

    lengths = []
    for trial in exp.glob("run_trial_*"):
        progress = trial / "progress.csv"
        lengths.append(len(pd.read_csv(progress)) if progress.exists() and progress.stat().st_size else 0)
    return {"started": len(lengths), "full_length": sum(n >= epochs for n in lengths),
            "ended_early": sum(0 < n < epochs for n in lengths), "no_result": sum(n == 0 for n in lengths)}


CPU_ENCODERS = ["resnet18", "efficientnet-b0", "mobilenet_v2"]  # the lightest of the shipped encoders
CPU_DROP_ARCHS = {"UnetPlusPlus", "DeepLabV3", "MAnet"}  # the slowest decoders on a CPU


def cpu_space(shipped: dict, size: int, epochs: int) -> dict:
    """The shipped lung space cut to what a 2-core CPU trains in minutes: its lightest encoders,
    the faster decoders, one input size. Its warm start is kept where the cut space allows it
    (seed 004's DeepLabV3+, whose EfficientNet-B1 is cut: the encoder is then sampled)."""
    space = json.loads(json.dumps(shipped))
    space["fixed"].update(size=size, epochs=epochs, batch_size=8, tuning_subset=True)
    params = space["parameters"]
    params.pop("size")
    enc = {k: [e for e in v if e in CPU_ENCODERS] for k, v in params["encoder"]["values"].items()}
    archs = [a for a in params["arch"]["values"] if a not in CPU_DROP_ARCHS and enc.get(a, enc["default"])]
    params["arch"]["values"] = archs
    params["encoder"]["values"] = {k: v for k, v in enc.items() if k == "default" or k in archs}
    warm = []
    for w in space.get("warm_start", []):
        point = {k: v for k, v in w.items() if k != "size"}
        if point.get("arch") not in archs:
            continue
        if point.get("encoder") not in enc.get(point["arch"], enc["default"]):
            point.pop("encoder", None)
        warm.append(point)
    space["warm_start"] = warm
    return space


# The Stage I CPU comparison's methods. The ablations (``--ablate``) take one ingredient of
# tpe_asha away each, to say where its speed-up comes from: the warm start, the cuts (ASHA, the
# patience stopper and the hopeless-trial cut) or TPE's model (random sampling with the same cuts
# and the same warm start).
CPU_METHODS = {
    "tpe_asha": {"sampler": "tpe", "scheduler": "asha", "patience": 3, "cut_below": 0.05, "warm_start": True},
    "tpe_asha_no_warm_start": {"sampler": "tpe", "scheduler": "asha", "patience": 3, "cut_below": 0.05,
                               "warm_start": False},
    "tpe_no_cuts": {"sampler": "tpe", "scheduler": "none", "patience": 0, "cut_below": None, "warm_start": True},
    "random_with_cuts": {"sampler": "random", "scheduler": "asha", "patience": 3, "cut_below": 0.05,
                         "warm_start": True},
    "random_no_stopping": {"sampler": "random", "scheduler": "none", "patience": 0, "cut_below": None,
                           "warm_start": False},
}
ABLATIONS = ("tpe_asha_no_warm_start", "tpe_no_cuts", "random_with_cuts")


def bands_plot(results: dict, target: float, budget_s: float, path: Path) -> None:
    """Best-so-far Dice against wall time: per method the median over seeds and a min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.linspace(0, budget_s, 200)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (label, runs), color in zip(results.items(), ("tab:blue", "tab:green", "tab:purple", "tab:red", "tab:orange")):
        curves = []
        for run in runs:
            y = np.full(grid.shape, np.nan)
            for p in run["curve"]:
                y[grid >= p["elapsed_s"]] = p["best"]
            curves.append(y)
        c = np.array(curves)
        lo, hi, med = (np.nanmin(c, 0), np.nanmax(c, 0), np.nanmedian(c, 0)) if np.isfinite(c).any() else (c[0],) * 3
        ax.fill_between(grid, lo, hi, color=color, alpha=0.25, lw=0)
        ax.plot(grid, med, color=color, label=f"{label} ({len(runs)} seeds)")
    ax.axhline(target, color="k", ls="--", lw=1, label=f"target Dice {target}")
    ax.set(xlabel="wall time (s)", ylabel="best validation Dice so far", ylim=(max(0.0, target - 0.3), 1.0),
           title="Stage I sweep on a 2-core CPU: TPE + ASHA vs random search")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_cpu(args, json_out) -> None:
    """Issue 11, item 8: the speed-up of the service's search over random search on this CPU."""

    import numpy as np

    from cxrtune.data import manifest
    from cxrtune.data.importers import run_import
    from cxrtune.data.splits import assign_splits
    from cxrtune.jsonsafe import json_safe
    from cxrtune.search.search_space import load_space
    from cxrtune.search.tuning import TuneOptions, run_tune, startup_trials

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_import("covid-qu-ex", str(Path(args.data) / "covid-qu-ex"), str(out / "cqe.parquet"), progress=False)
    df = manifest.load_manifest(str(out / "cqe.parquet"))
    df = df[df["split"] == "train"]  # the official Val part stays out of tuning entirely
    df = assign_splits(df, val=0.15, test=0.0, seed=0, tuning_fraction=args.tuning_fraction)
    manifest.save_manifest(df, str(out / "tuning.parquet"))
    subset = df[df["tuning"]]
    space = cpu_space(load_space(str(ROOT / "search_spaces" / "lung_segmentation.yaml")).to_dict(),
                      args.size, args.max_epochs)
    budget = args.budget_minutes * 60
    methods = {m: CPU_METHODS[m] for m in ("tpe_asha", *(ABLATIONS if args.ablate else ()), "random_no_stopping")}
    results: dict = {m: [] for m in methods}
    for k, seed in enumerate(args.seeds):
        order = list(methods) if k % 2 == 0 else list(methods)[::-1]  # no method always runs first
        for label in order:
            m = methods[label]
            name = f"cpu-{label}-seed{seed}"
            exp = out / "exps" / name
            if not args.reanalyse and label in (args.run_only or methods):
                import shutil

                shutil.rmtree(exp, ignore_errors=True)  # a fresh experiment, never an old study's
                run_space = dict(space) if m["warm_start"] else {**space, "warm_start": []}
                opts = TuneOptions(space=run_space, space_source="lung_segmentation.yaml (CPU cut)",
                                   manifest=str(out / "tuning.parquet"), name=name, storage=str(out / "exps"),
                                   num_samples=args.num_samples, scheduler=m["scheduler"], grace=1, reduction_factor=2,
                                   patience=m["patience"], cut_below=m["cut_below"], cpus_per_trial=1, num_cpus=2,
                                   max_concurrent=2, time_budget_s=budget, sampler=m["sampler"], seed=seed,
                                   objective="dice")
                t0 = time.time()
                run_tune(opts)
                (exp / "bench_wall_s.txt").write_text(f"{time.time() - t0:.1f}")
                (exp / "bench_load.txt").write_text(" ".join(f"{x:.2f}" for x in os.getloadavg()))
                import ray

                ray.shutdown()  # a fresh instance per run: no run inherits another's warm workers
            summary = json.loads((exp / "summary.json").read_text())
            points = curve(str(exp), "val_dice", "max")
            reach = next((p["elapsed_s"] for p in points if p["best"] >= args.target), None)
            wall = exp / "bench_wall_s.txt"
            best = max((p["best"] for p in points), default=None)
            run = {"seed": seed, "trials": trial_counts(exp, args.max_epochs), "trials_with_results": summary["trials"],
                   "wall_s": float(wall.read_text()) if wall.exists() else None,
                   "best_val_dice": round(best, 4) if best is not None else None,
                   "seconds_to_target": reach, "best_config": summary.get("best_config"),
                   "curve": [{**p, "best": round(p["best"], 4)} for p in points]}
            results[label].append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "curve"} | {"method": label}), file=sys.stderr,
                  flush=True)
    bands_plot(results, args.target, budget, out / "curves.png")

    per_seed = []
    for k, rnd in enumerate(results["random_no_stopping"]):
        t_rnd = rnd["seconds_to_target"]
        row: dict = {"seed": rnd["seed"], "random_s": t_rnd, "random_reached": t_rnd is not None}
        for label in methods:
            if label != "random_no_stopping":
                t = results[label][k]["seconds_to_target"]
                # a random run that never reached the target counts as the budget: the ratio is then a bound
                row[f"{label}_s"] = t
                row[f"{label}_speedup"] = round((t_rnd if t_rnd is not None else budget) / t, 2) if t else None
        per_seed.append(row)
    spread = {}
    for label in methods:
        if label != "random_no_stopping":
            ups = [p[f"{label}_speedup"] for p in per_seed]
            got = sorted(u for u in ups if u is not None)
            spread[label] = {"median_speedup": (float(np.median(got)) if len(got) == len(ups) else None),
                             "min": got[0] if got else None, "max": got[-1] if got else None,
                             "reached_target": f"{len(got)}/{len(ups)}"}
    tpe_all = all(r["seconds_to_target"] is not None for r in results["tpe_asha"])
    met = tpe_all and all(p["tpe_asha_speedup"] is not None and p["tpe_asha_speedup"] >= 2 for p in per_seed)
    summary = {
        "benchmark": "sweep", "mode": "cpu", "device": f"cpu ({os.cpu_count()} cores)", "stage": "lung",
        "metric": "val_dice", "target": args.target, "budget_minutes": args.budget_minutes, "seeds": args.seeds,
        "setup": {"size": args.size, "epochs_per_trial": args.max_epochs, "tuning_images": int(len(subset)),
                  "train_images": int((subset["split"] == "train").sum()),
                  "val_images": int((subset["split"] == "val").sum()), "trials_at_once": 2,
                  "max_trials": args.num_samples, "tpe_startup_trials": startup_trials(args.num_samples),
                  "space": space},
        "methods": {m: CPU_METHODS[m] for m in methods}, "results": results, "per_seed": per_seed,
        "speedup_over_random_by_method": spread,
        "targets_met": {"tpe_asha reaches the target in at most half random's time, every seed": met},
        "plot": str(out / "curves.png"),
    }
    print(json.dumps(json_safe(summary), indent=2), file=json_out, flush=True)


MO_COST_REF = 1.05  # the hypervolume's reference cost: 5 % above the costliest feasible trial of the comparison
MO_GRACE = 2  # ASHA's first rung: after 1 epoch nearly every Stage II still scores all zeros


def hypervolume_curve(exp: Path, start: float, constraint: float, cost: str) -> list[dict]:
    """The feasible, complete trials (FP rate on Normal <= ``constraint``, trained to the last
    epoch) as (score MAE, ``cost``) points in the order they completed, with the wall time of each:
    what the hypervolume curve of :func:`run_cpu_mo` grows from. Read from each trial's own result
    file; a run whose trials did not report ``cost`` (a GMACs sweep read over a latency table) is
    an error that says so."""
    events = []
    for f in exp.glob("*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        last = rows[-1] if rows else {}
        if last.get("training_iteration") == MO_EPOCHS and last.get("val_fp_rate_normal", 1) <= constraint:
            if cost not in last:
                sys.exit(f"{f}: its trial reported no {cost} (a run with another cost: see --latency-table)")
            events.append((last["timestamp"] - start, last["val_score_mae"], last[cost]))
    return [{"elapsed_s": round(t, 1), "mae": m, "cost": c} for t, m, c in sorted(events)]


def hypervolume(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Optuna's own hypervolume (WFG; private module, the one Optuna's hypervolume plots use)."""
    import numpy as np
    from optuna._hypervolume import compute_hypervolume

    inside = [p for p in points if p[0] < ref[0] and p[1] < ref[1]]
    return float(compute_hypervolume(np.array(inside), np.array(ref))) if inside else 0.0


MO_EPOCHS = 4
# the multi-objective searches compared with random search without stopping (--searches): the
# service's TPE and its Gaussian-process sampler, each with the space's warm start and ASHA, and
# TPE whose start-up spans the cost axis: besides the warm start, one partial start per other encoder
# (the rest drawn at random), no ASHA (its 2-epoch rung cut the eventual best Stage II, and with 16
# trials at most the cuts buy no extra trials), and TPE without ASHA whose random start-up is half the
# trials (the warm start included; Optuna counts finished trials, so with two at a time one more is
# drawn at random) instead of the service's quarter: with the same seed its random draws are random
# search's first ones, so the two runs differ only in what TPE draws afterwards;
# and the same with a second constraint, score MAE <= the constant score's: a trial that learnt
# nothing (all zeros, MAE 2.7) of a cheap network is otherwise on the front of the raw objectives,
# and TPE's good set, at one or two trials of sixteen, can be that trial alone
MO_METHODS = {"tpe_asha": {"sampler": "tpe", "scheduler": "asha", "warm": True},
              "gp_asha": {"sampler": "gp", "scheduler": "asha", "warm": True},
              "tpe_encoder_starts": {"sampler": "tpe", "scheduler": "none", "warm": True, "encoder_starts": True},
              "tpe_half_startup": {"sampler": "tpe", "scheduler": "none", "warm": True, "half_startup": True},
              "tpe_half_startup_beats_constant": {"sampler": "tpe", "scheduler": "none", "warm": True,
                                                  "half_startup": True, "beats_constant": True},
              "random_no_stopping": {"sampler": "random", "scheduler": "none", "warm": False}}


def constant_score_mae(val) -> dict:
    """The best constant score's MAE on the validation rows against their mask-derived reference
    (what the trials' objective compares with): the median minimises it. A Stage II that does no
    better than this has learnt nothing a constant does not know."""
    import numpy as np

    from cxrtune import storage
    from cxrtune.scoring.scorer import reference_zones

    cache = storage.ContentCache()
    scores = [sum(z) for z in (reference_zones(row, cache=cache, reference="masks") for _, row in val.iterrows())
              if z is not None]
    errors = {c: float(np.mean(np.abs(np.array(scores) - c))) for c in range(7)}
    best = min(errors, key=errors.get)
    return {"score": best, "mae": round(errors[best], 4), "all_zero_mae": round(errors[0], 4), "n": len(scores)}


def run_cpu_mo(args, json_out) -> None:
    """Issue 23, item 7: the multi-objective Stage II searches (``--searches``: TPE + ASHA, GP +
    ASHA, with the space's warm start) against random search without stopping, on 600
    COVID-QU-Ex rows at <= 128 px, 4 epochs, ``--num-samples`` trials (16 by default), two at once,
    judged by the hypervolume of feasible trials against wall time."""
    import shutil

    import ray

    from cxrtune.data import manifest
    from cxrtune.data.importers import run_import
    from cxrtune.data.splits import assign_splits
    from cxrtune.errors import CxrtuneError
    from cxrtune.jsonsafe import json_safe
    from cxrtune.search.latency_table import load_latency_table
    from cxrtune.search.search_space import load_space, parse_space
    from cxrtune.search.tuning import TuneOptions, cost_metric_for, load_options, run_tune

    methods = {m: MO_METHODS[m] for m in (*args.searches, "random_no_stopping")}
    if set(args.run_only or ()) - set(methods):
        sys.exit(f"--run-only {' '.join(args.run_only)}: not among the compared methods {', '.join(methods)} "
                 "(add the search to --searches)")
    space = load_space(str(ROOT / "search_spaces" / "disease_cpu.yaml")).to_dict()
    space["fixed"].update(epochs=MO_EPOCHS, tuning_subset=False, batch_size=16)
    space["parameters"]["size"] = {"type": "int", "low": 64 if args.quick and not args.latency_table else 96,
                                   "high": 128, "step": 32}
    space["warm_start"] = [{**w, "size": 128} for w in space.get("warm_start", [])]
    if args.latency_table and not args.reanalyse:  # before any earlier run is replaced
        try:
            load_latency_table(args.latency_table).check_covers(parse_space(space, "the comparison's space"))
        except CxrtuneError as exc:
            sys.exit(f"{exc} (a space's networks at other sizes: bench/latency_proxy.py --table "
                     f"{args.latency_table} --sizes S ... --append)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_import("covid-qu-ex", str(Path(args.data) / "covid-qu-ex"), str(out / "cqe.parquet"), progress=False)
    df = manifest.load_manifest(str(out / "cqe.parquet"))
    df = df[df["split"] == "train"]  # the official Val part stays out of tuning entirely
    rows = 48 if args.quick else 600
    df = assign_splits(df.groupby("label").sample(frac=rows / len(df), random_state=0), val=0.2, test=0.0, seed=0)
    manifest.save_manifest(df, str(out / "mo.parquet"))
    budget = args.budget_minutes * 60
    constraint = 1.0 if args.quick else args.fp_limit
    cost = cost_metric_for(args.latency_table)  # what each run's TuneOptions.cost_metric will be
    baseline = constant_score_mae(df[df["split"] == "val"])
    warm_encoders = {w.get("encoder") for w in space.get("warm_start", [])}
    # tpe_encoder_starts: one partial start per encoder the warm start does not use
    encoder_starts = [{"encoder": e} for e in space["parameters"]["encoder"]["values"] if e not in warm_encoders]
    runs: dict = {m: [] for m in methods}
    for k, seed in enumerate(args.seeds):
        for label in (list(methods) if k % 2 == 0 else list(methods)[::-1]):
            m, name = methods[label], f"mo-{label}-seed{seed}"
            exp = out / "exps" / name
            if not args.reanalyse and label in (args.run_only or methods):
                shutil.rmtree(exp, ignore_errors=True)
                opts = TuneOptions(space=space if m["warm"] else {**space, "warm_start": []},
                                   warm_start=encoder_starts if m.get("encoder_starts") else [],
                                   space_source="disease_cpu.yaml (<=128 px, 4 epochs)", manifest=str(out / "mo.parquet"),
                                   name=name, storage=str(out / "exps"), num_samples=args.num_samples,
                                   scheduler=m["scheduler"], grace=MO_GRACE, reduction_factor=2, max_epochs=MO_EPOCHS,
                                   cpus_per_trial=1, num_cpus=2, max_concurrent=2, time_budget_s=budget,
                                   sampler=m["sampler"], seed=seed, multi_objective=True, lung_bundle=args.lung_bundle,
                                   latency_table=args.latency_table,
                                   startup_trials=max(1, args.num_samples // 2) if m.get("half_startup") else None,
                                   reference="masks", constraints=[f"val_fp_rate_normal<={constraint}", *(
                                       [f"val_score_mae<={baseline['mae']}"] if m.get("beats_constant") else [])])
                run_tune(opts)
                ray.shutdown()
            recorded = load_options(str(exp))
            if recorded.cost_metric != cost:
                sys.exit(f"{exp} swept over {recorded.latency_table or 'GMACs'}, not this comparison's "
                         f"{cost}: set --latency-table as its runs were")
            run_with = {k: getattr(recorded, k) for k in ("constraints", "sampler", "scheduler", "grace",
                                                          "startup_trials", "latency_table")}
            runs[label].append({"seed": seed, "run_with": {**run_with, "extra_warm_start": recorded.warm_start},
                                "front_events": hypervolume_curve(exp, recorded.created, constraint, cost)})
    costs = [e["cost"] for rs in runs.values() for r in rs for e in r["front_events"]]
    ref = (baseline["mae"], MO_COST_REF * max(costs)) if costs else (baseline["mae"], 1.0)
    for rs in runs.values():
        for r in rs:
            seen: list = []
            r["hypervolume_curve"] = []
            for e in r["front_events"]:
                seen.append((e["mae"], e["cost"]))
                r["hypervolume_curve"].append({"elapsed_s": e["elapsed_s"], "hv": round(hypervolume(seen, ref), 5)})
            r["final_hypervolume"] = r["hypervolume_curve"][-1]["hv"] if seen else 0.0
    def time_to(run: dict, hv: float) -> float | None:
        """When ``run``'s hypervolume first reached ``hv`` (never, for a volume of 0)."""
        return next((p["elapsed_s"] for p in run["hypervolume_curve"] if p["hv"] >= hv and hv > 0), None)

    per_seed = []
    for k, rnd in enumerate(runs["random_no_stopping"]):
        final = rnd["final_hypervolume"]
        rnd_time = time_to(rnd, final)
        row: dict = {"seed": rnd["seed"], "random_hv": final, "random_time_to_its_final_s": rnd_time}
        for label in args.searches:
            run = runs[label][k]
            reach = time_to(run, final)
            row[label] = {"hv": run["final_hypervolume"], "time_to_random_final_s": reach,
                          "time_ratio": round(reach / rnd_time, 3) if reach is not None and rnd_time else None,
                          # no feasible trial better than the constant on either side: 0 >= 0 says nothing
                          "comparable": run["final_hypervolume"] > 0 or final > 0}
        per_seed.append(row)
    met = {label: all(p[label]["comparable"] and (p[label]["hv"] >= p["random_hv"] or (
        p[label]["time_ratio"] is not None and p[label]["time_ratio"] <= 0.5)) for p in per_seed)
        for label in args.searches}
    summary = {"benchmark": "sweep", "mode": "cpu-multi-objective", "device": f"cpu ({os.cpu_count()} cores)",
               "stage": "disease", "objectives": ["val_score_mae", cost], "latency_table": args.latency_table,
               "constraint": f"val_fp_rate_normal<={constraint}", "lung_bundle": args.lung_bundle,
               "rows": {"train": int((df["split"] == "train").sum()), "val": int((df["split"] == "val").sum())},
               "budget_minutes": args.budget_minutes, "trials": args.num_samples, "epochs": MO_EPOCHS,
               "constant_baseline": baseline,
               "hypervolume_reference": {"score_mae": ref[0], cost: round(ref[1], 4)},
               "runs": runs, "per_seed": per_seed,
               "methods": methods,
               "targets_met": {f"{label}: hypervolume >= random's, or its time to random's final <= 0.5x, each seed": ok
                               for label, ok in met.items()}}
    print(json.dumps(json_safe(summary), indent=2), file=json_out, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("CXRTUNE_SHARED_DATA", "../shared/data"))
    ap.add_argument("--out", default="/tmp/cxrtune-sweep")
    ap.add_argument("--stage", choices=["lung", "disease"], default="disease")
    ap.add_argument("--budget-minutes", type=float, help="per run (default 12; --cpu: 8)")
    ap.add_argument("--gpus-per-trial", type=float, default=0.25)
    ap.add_argument("--cpus-per-trial", type=float, default=3)
    ap.add_argument("--max-epochs", type=int, help="per trial (default 16; --cpu: 6)")
    ap.add_argument("--target", type=float,
                    help="metric to reach (default 0.95 lung Dice, 0.75 infection Dice; --cpu: 0.88 lung Dice)")
    ap.add_argument("--quick", action="store_true", help="tiny CPU run that checks the script")
    ap.add_argument("--cpu", action="store_true", help="the CPU benchmark (issue 11, item 8); see above")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="--cpu: one run per method and seed")
    ap.add_argument("--size", type=int, default=96, help="--cpu: input size")
    ap.add_argument("--tuning-fraction", type=float, default=0.16, help="--cpu: share of Train in the tuning subset")
    ap.add_argument("--num-samples", type=int,
                    help="--cpu: trials at most (sizes TPE's start-up; default 12; --multi-objective: 16)")
    ap.add_argument("--reanalyse", action="store_true", help="--cpu: no new runs; analyse the runs in --out")
    ap.add_argument("--ablate", action="store_true",
                    help="--cpu: also run tpe_asha without its warm start, without its cuts, and random search with them")
    ap.add_argument("--multi-objective", action="store_true",
                    help="--cpu: the Stage II multi-objective comparison (issue 23, item 7); needs --lung-bundle")
    ap.add_argument("--run-only", nargs="+", choices=sorted({*CPU_METHODS, *MO_METHODS}),
                    help="--cpu: run these methods anew, analyse the others' runs in --out (with "
                         "--multi-objective: tpe_asha, gp_asha and random_no_stopping)")
    ap.add_argument("--searches", nargs="+", choices=[m for m in MO_METHODS if m != "random_no_stopping"],
                    default=["tpe_asha"], help="--multi-objective: the searches each compared with random search")
    ap.add_argument("--fp-limit", type=float, default=0.5,
                    help="--multi-objective: the constraint on the FP rate on Normal (see above)")
    ap.add_argument("--latency-table", help="--multi-objective: the cost is int8 ms from this table ('': GMACs; "
                    "default: search_spaces/disease_cpu.int8_ms.csv, --quick: GMACs)")
    ap.add_argument("--lung-bundle", default="/tmp/cxrtune-accuracy-cpu/bundle-calibrated",
                    help="--multi-objective: the fixed Stage I (bench/accuracy.py --cpu's bundle)")
    args = ap.parse_args()
    from json_stdout import reserve_stdout  # bench/, beside this script

    json_out = reserve_stdout()  # Ray prints to stdout: keep it for the JSON
    if args.cpu and args.multi_objective:
        if args.latency_table is None:
            args.latency_table = "" if args.quick else str(ROOT / "search_spaces" / "disease_cpu.int8_ms.csv")
        args.budget_minutes = args.budget_minutes or (3 if args.quick else 25)
        args.num_samples = 3 if args.quick else args.num_samples or 16
        return run_cpu_mo(args, json_out)
    if args.cpu:
        args.target, args.num_samples = args.target or 0.88, args.num_samples or 12
        args.budget_minutes, args.max_epochs = args.budget_minutes or 8, args.max_epochs or 6
        return run_cpu(args, json_out)
    args.budget_minutes, args.max_epochs = args.budget_minutes or 12, args.max_epochs or 16

    import pandas as pd

    from cxrtune.data import manifest
    from cxrtune.data.importers import run_import
    from cxrtune.data.splits import assign_splits
    from cxrtune.jsonsafe import json_safe
    from cxrtune.search.search_space import load_space
    from cxrtune.search.tuning import TuneOptions, run_tune

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_import("covid-qu-ex", str(Path(args.data) / "covid-qu-ex"), str(out / "cqe.parquet"), progress=False)
    df = manifest.load_manifest(str(out / "cqe.parquet"))
    df = df[df["split"] == "train"]  # the official Val part stays out of tuning entirely
    df = assign_splits(df, val=0.1, test=0.0, seed=0, tuning_fraction=0.1 if args.stage == "lung" else 0.5)
    if args.quick:
        df = pd.concat([g.sample(min(24, len(g)), random_state=0) for _, g in df.groupby("split")])
    manifest.save_manifest(df, str(out / "tuning.parquet"))

    space = load_space(str(ROOT / "search_spaces" / f"{args.stage}_segmentation.yaml")).to_dict()
    if args.quick:
        space["fixed"].update(size=64, tuning_subset=False)
        space["parameters"] = {"arch": {"type": "choice", "values": ["FPN", "Linknet"]},
                               "encoder": {"type": "choice", "values": ["resnet18"]},
                               "lr": {"type": "log-float", "low": 1e-4, "high": 1e-2}}
    target = args.target or (0.95 if args.stage == "lung" else 0.75)
    budget = args.budget_minutes * 60
    metric = "val_dice"  # Stage II: infection Dice over non-empty references, after refinement
    gpus = 0 if args.quick else args.gpus_per_trial
    results = {}
    for label, sampler, scheduler, patience in (("tpe_asha", "tpe", "asha", 6), ("random_no_stopping", "random", "none", 0)):
        opts = TuneOptions(space=space, space_source=f"{args.stage}_segmentation.yaml", manifest=str(out / "tuning.parquet"),
                           name=f"{args.stage}-{label}", storage=str(out / "exps"), num_samples=1000,
                           scheduler=scheduler, max_epochs=2 if args.quick else args.max_epochs, grace=1 if args.quick else 4,
                           patience=patience, cpus_per_trial=1 if args.quick else args.cpus_per_trial, gpus_per_trial=gpus,
                           time_budget_s=budget, sampler=sampler, seed=0, objective="dice" if args.stage == "lung" else None)
        gpu = GpuSampler()
        gpu.start()
        t0 = time.time()
        summary = run_tune(opts)
        wall = time.time() - t0
        gpu.stop_event.set()
        points = curve(opts.experiment_uri, metric, "max")
        reach = next((p["elapsed_s"] for p in points if p["best"] >= target), None)
        results[label] = {"trials": summary["trials"], "trials_per_hour": round(summary["trials"] / wall * 3600, 1),
                          "stopped_early": summary["stopped_early"], "mean_gpu_util_percent": gpu.mean(),
                          "gpu_hours": summary["gpu_hours"], "wall_s": round(wall, 1),
                          f"best_{metric}": max((p["best"] for p in points), default=None),
                          "seconds_to_target": reach, "best_config": summary.get("best_config"), "curve": points}
    print(json.dumps(json_safe({"benchmark": "sweep", "stage": args.stage, "metric": metric, "target": target,
                                "budget_minutes": args.budget_minutes, "gpus_per_trial": gpus, "quick": args.quick,
                                "results": results}), indent=2), file=json_out, flush=True)


if __name__ == "__main__":
    main()
