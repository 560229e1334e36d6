"""Sweep benchmark (GPU): TPE + ASHA against random search without early stopping, same budget.

    python bench/sweep.py [--data ../shared/data] [--stage disease] [--budget-minutes 12]
                          [--gpus-per-trial 0.25] [--target 0.75] [--quick]

For the chosen stage it prepares COVID-QU-Ex (official Train split by patient into train/val,
the tuning subset marked: 10 % for lungs, 50 % for disease as in seed 004), then runs two sweeps
of the shipped search space for the same wall-clock budget on fractional GPUs:
(1) Optuna TPE + ASHA + per-trial patience, (2) random sampling, no scheduler, no stopper.
Reports trials per hour, mean GPU utilisation (nvidia-smi), the best validation metric against
trials and wall time, and the wall time each needed to reach ``--target`` (Stage II: COVID-19
infection Dice 0.75 = val_dice). Prints one JSON object.
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
    """Best-so-far metric against elapsed wall time: one point each time it improves."""
    from ray.tune import ExperimentAnalysis

    from cxrtune import storage

    fs, path = storage.pyarrow_filesystem(exp_uri)
    analysis = ExperimentAnalysis(path, storage_filesystem=fs)
    events = []
    for df in analysis.trial_dataframes.values():
        if metric in df and "timestamp" in df:
            events += list(zip(df["timestamp"], df[metric]))
    events.sort()
    if not events:
        return []
    start = events[0][0]
    best, points = None, []
    sign = 1 if mode == "max" else -1
    for ts, value in events:
        if best is None or sign * value > sign * best:
            best = value
            points.append({"elapsed_s": round(ts - start, 1), "best": round(float(best), 4)})
    return points


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("CXRTUNE_SHARED_DATA", "../shared/data"))
    ap.add_argument("--out", default="/tmp/cxrtune-sweep")
    ap.add_argument("--stage", choices=["lung", "disease"], default="disease")
    ap.add_argument("--budget-minutes", type=float, default=12)
    ap.add_argument("--gpus-per-trial", type=float, default=0.25)
    ap.add_argument("--cpus-per-trial", type=float, default=3)
    ap.add_argument("--max-epochs", type=int, default=16)
    ap.add_argument("--target", type=float, help="metric to reach (default 0.95 lung Dice, 0.75 infection Dice)")
    ap.add_argument("--quick", action="store_true", help="tiny CPU run that checks the script")
    args = ap.parse_args()

    import pandas as pd

    from cxrtune import manifest
    from cxrtune.importers import run_import
    from cxrtune.metrics import json_safe
    from cxrtune.search_space import load_space
    from cxrtune.splits import assign_splits
    from cxrtune.tuning import TuneOptions, run_tune

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
                                "results": results}), indent=2))


if __name__ == "__main__":
    main()
