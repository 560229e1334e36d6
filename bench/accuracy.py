"""Accuracy on real data (GPU): train both stages on COVID-QU-Ex Train, evaluate on its Val.

    python bench/accuracy.py [--data ../shared/data] [--out /tmp/acc] [--quick]

* imports COVID-QU-Ex; the official Train part is split by patient into train (90 %) and
  validation (10 %, for early stopping and the zone threshold); the official Val part is the test set;
* trains Stage I (lungs) and Stage II (opacity + normal/disease) from scratch (no pretrained
  weights), bundles them, calibrates T on train+validation, evaluates on the test set;
* scores JSRT's lungs with the Stage I model trained on COVID-QU-Ex only.

Targets (issue 3): lung Dice >= 0.97, COVID-19 infection Dice >= 0.78 over non-empty references,
normal-vs-disease F1 >= 0.93, opacity false-positive rate on Normal images <= 5 %, both stages
trained in <= 15 minutes on one H100. ``--quick`` runs a tiny CPU version to check the script; ``--override`` changes both
stages' configs (a CPU sanity run on a subset, another architecture).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LUNG = {"task": "lung", "model": {"arch": "Unet", "encoder": "resnet34", "in_channels": 1},
        "size": 256, "batch_size": 32, "epochs": 20, "optimizer": "adamw", "lr": 2e-3, "lr_schedule": "cosine",
        "seg_loss": "dice", "patience": 5, "min_delta": 0.001, "num_workers": 12}
DISEASE = {"task": "disease", "model": {"arch": "Unet", "encoder": "resnet34", "in_channels": 1},
           "size": 256, "batch_size": 32, "epochs": 30, "optimizer": "adamw", "lr": 2e-3, "lr_schedule": "cosine",
           "seg_loss": "dice_focal", "cls_loss": "bce", "dlw_alpha": 0.05, "patience": 8, "min_delta": 0.001,
           "num_workers": 12}
QUICK = {"size": 64, "batch_size": 8, "epochs": 1, "num_workers": 0, "max_train_images": 64, "max_val_images": 32}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("CXRTUNE_SHARED_DATA", "../shared/data"))
    ap.add_argument("--out", default="/tmp/cxrtune-accuracy")
    ap.add_argument("--quick", action="store_true", help="tiny CPU run that checks the script")
    ap.add_argument("--lung-epochs", type=int)
    ap.add_argument("--disease-epochs", type=int)
    ap.add_argument("--override", type=json.loads, default={},
                    help='JSON merged into both stages\' configs, e.g. \'{"size": 128, "max_train_images": 1000}\'')
    args = ap.parse_args()

    import pandas as pd
    import torch

    from cxrtune import manifest
    from cxrtune.evaluation import calibrate, evaluate
    from cxrtune.importers import run_import
    from cxrtune.scorer import load_bundle, make_bundle, update_bundle
    from cxrtune.splits import assign_splits
    from cxrtune.train import TrainConfig, train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    run_import("covid-qu-ex", str(data / "covid-qu-ex"), str(out / "cqe.parquet"), progress=False)
    df = manifest.load_manifest(str(out / "cqe.parquet"))
    official_val = df["split"] == "val"
    train_part = assign_splits(df[~official_val], val=0.1, test=0.0, seed=0)
    test_part = df[official_val].assign(split="test")
    df = pd.concat([train_part, test_part], ignore_index=True)
    if args.quick:
        df = pd.concat([g.sample(min(60, len(g)), random_state=0) for _, g in df.groupby("split")], ignore_index=True)
    manifest.save_manifest(df, str(out / "cqe-split.parquet"))

    lung_cfg, disease_cfg = dict(LUNG), dict(DISEASE)
    if args.quick:
        lung_cfg.update(QUICK)
        disease_cfg.update(QUICK)
    lung_cfg.update(args.override)
    disease_cfg.update(args.override)
    if args.lung_epochs:
        lung_cfg["epochs"] = args.lung_epochs
    if args.disease_epochs:
        disease_cfg["epochs"] = args.disease_epochs
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    lung = train(TrainConfig.from_dict(lung_cfg), df, str(out / "lung"))
    t1 = time.perf_counter()
    disease = train(TrainConfig.from_dict(disease_cfg), df, str(out / "disease"))
    t2 = time.perf_counter()
    make_bundle(str(out / "lung"), str(out / "disease"), str(out / "bundle"))
    scorer = load_bundle(str(out / "bundle"), batch_size=32)
    cal = calibrate(scorer, df, split="train,val", limit=64 if args.quick else 1500, progress=False)
    update_bundle(str(out / "bundle"), zone_threshold=cal["threshold"])
    scorer.zone_threshold = cal["threshold"]
    test = evaluate(scorer, df, str(out / "eval"), split="test", progress=False)
    t3 = time.perf_counter()

    covid = df[(df.split == "test") & (df.label == "covid")]
    covid_eval = evaluate(scorer, covid, str(out / "eval-covid"), split="test", progress=False)
    normal = df[(df.split == "test") & (df.label == "normal")]
    normal_eval = evaluate(scorer, normal, str(out / "eval-normal"), split="test", progress=False)

    jsrt = {}
    if (data / "jsrt").exists():
        run_import("jsrt", str(data / "jsrt"), str(out / "jsrt.parquet"), progress=False)
        jdf = manifest.load_manifest(str(out / "jsrt.parquet")).assign(split="test")
        if args.quick:
            jdf = jdf.head(8)
        jsrt = evaluate(scorer, jdf, str(out / "eval-jsrt"), split="test", progress=False)["lung"]

    result = {
        "benchmark": "accuracy", "device": device, "quick": args.quick,
        "train_minutes": {"lung": round((t1 - t0) / 60, 2), "disease": round((t2 - t1) / 60, 2),
                          "both": round((t2 - t0) / 60, 2)},
        "epochs": {"lung": lung["epochs"], "disease": disease["epochs"]},
        "configs": {"lung": lung_cfg, "disease": disease_cfg},
        "test_images": int((df.split == "test").sum()),
        "lung_dice": test["lung"]["dice"],
        "covid_infection_dice": covid_eval["opacity"]["dice"],
        "covid_infection_iou": covid_eval["opacity"]["iou"],
        "normal_vs_disease": test["classification"],
        "opacity_fp_rate_on_normal": normal_eval["opacity"].get("fp_rate_empty"),
        "zone_threshold": cal["threshold"], "calibration_mae": cal["mae"],
        "score_vs_mask_reference": test.get("score"),
        "jsrt_lung_dice": jsrt.get("dice"),
        "evaluate_minutes": round((t3 - t2) / 60, 2),
    }
    targets = {"lung_dice": 0.97, "covid_infection_dice": 0.78}
    result["targets_met"] = {
        "lung_dice>=0.97": (result["lung_dice"] or 0) >= targets["lung_dice"],
        "covid_infection_dice>=0.78": (result["covid_infection_dice"] or 0) >= targets["covid_infection_dice"],
        "f1>=0.93": result["normal_vs_disease"]["f1"] >= 0.93,
        "fp_rate_normal<=0.05": (result["opacity_fp_rate_on_normal"] if result["opacity_fp_rate_on_normal"] is not None else 1) <= 0.05,
        "train<=15min": result["train_minutes"]["both"] <= 15,
    }
    from cxrtune.metrics import json_safe

    print(json.dumps(json_safe(result), indent=2))


if __name__ == "__main__":
    main()
