"""Seed 000's grading grid on real CXRs, CPU-sized (issue 12): COVID-QU-Ex, per-lung grades 0-3
derived from the lung and infection masks.

    python bench/grading.py [--data ../shared/data] [--train 600] [--val 200] [--size 64] [--sides right]

Runs the shipped ``search_spaces/opacity_classification.yaml`` through ``cxrtune tune --grid``
(the library's ``run_tune``, a local Ray instance) with its backbones, ROI schemes and balancing
unchanged and only the sizes cut for 2 cores (``--size``, ``--epochs``, from scratch: no ImageNet
weights here and no project encoder of these backbones), on ``--train`` images of the official
Train part and ``--val`` of the official Val part (stratified by label; Non-COVID images have no
infection mask, hence no grade, and are left out). Then the report's compact table (grid.md) and
patient-level ``--folds``-fold cross-validation of the ``--top`` recipes per side with a subgroup
table by label. Prints one JSON object; grid.md and cv.md go under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("CXRTUNE_SHARED_DATA", "../shared/data"))
    ap.add_argument("--out", default="/tmp/cxrtune-grading")
    ap.add_argument("--train", type=int, default=600)
    ap.add_argument("--val", type=int, default=200)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--sides", default="right", help="comma-separated lung sides for the grid")
    ap.add_argument("--top", type=int, default=3)
    ap.add_argument("--folds", type=int, default=5)
    args = ap.parse_args()

    import pandas as pd
    import torch
    import yaml
    from realdata import covid_qu_ex, stratified  # bench/, beside this script

    from cxrtune import storage
    from cxrtune.audit.grade_cv import cross_validate, cv_markdown
    from cxrtune.data import manifest
    from cxrtune.jsonsafe import json_safe
    from cxrtune.search.report import top_grade_recipes, write_report
    from cxrtune.search.tuning import TuneOptions, run_tune

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df = covid_qu_ex(args.data, out)
    graded = df[df["opacity_mask"] != ""]  # Non-COVID images have no infection mask: no grade

    sub = pd.concat([stratified(graded[graded["split"] == "train"], args.train),
                     stratified(graded[graded["split"] == "val"], args.val)], ignore_index=True)
    manifest.save_manifest(sub, str(out / "grading.parquet"))

    space = yaml.safe_load((ROOT / "search_spaces" / "opacity_classification.yaml").read_text())
    space["fixed"].update({"size": args.size, "epochs": args.epochs, "batch_size": 32})
    space["parameters"]["side"]["values"] = args.sides.split(",")
    name = f"grid-{int(time.time())}"
    opts = TuneOptions(space=space, space_source="opacity_classification (CPU-sized)", manifest=str(out / "grading.parquet"),
                       name=name, storage=str(out / "results"), grid=True, cpus_per_trial=2, num_cpus=2,
                       patience=0)
    t = time.perf_counter()
    summary = run_tune(opts)
    grid_minutes = (time.perf_counter() - t) / 60
    exp = storage.join(str(out / "results"), name)
    write_report(exp, str(out / "report"))
    grid_md = (out / "report" / "grid.md").read_text()

    t = time.perf_counter()
    results = []
    for cfg in top_grade_recipes(exp, args.top):
        r = cross_validate(cfg, sub, folds=args.folds, by=("label",))
        r.pop("oof")
        r.pop("heatmaps", None)
        results.append(r)
    cv_minutes = (time.perf_counter() - t) / 60
    cv_md = cv_markdown(results)
    (out / "cv.md").write_text(cv_md)
    trials = pd.read_csv(out / "report" / "trials.csv")
    print(json.dumps(json_safe({
        "benchmark": "grading_grid", "device": f"cpu ({os.cpu_count()} cores)", "torch": torch.__version__,
        "images": {"train": int((sub["split"] == "train").sum()), "val": int((sub["split"] == "val").sum()),
                   "by_label": sub["label"].value_counts().to_dict()},
        "size": args.size, "epochs": args.epochs, "sides": args.sides,
        "grid": {"trials": summary["trials"], "errored": summary["errored"], "minutes": round(grid_minutes, 1),
                 "best_metric": summary.get("best_metric"), "best_config": summary.get("best_config"),
                 "mean_trial_s_by_backbone": trials.groupby("param:backbone")["time_s"].mean().round(1).to_dict()},
        "grid_md": grid_md,
        "cv": {"folds": args.folds, "minutes": round(cv_minutes, 1),
               "recipes": [{"config": {k: r["config"][k] for k in ("side", "roi", "balancing")}
                            | {"backbone": r["config"]["classifier"]["backbone"]},
                            "images": r["images"], "summary": r["summary"], "hcs": r.get("hcs")} for r in results]},
        "cv_md": cv_md}), indent=2))


if __name__ == "__main__":
    main()
