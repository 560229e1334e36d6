"""ROI Hide-and-Seek on real CXRs (issue 12): COVID-QU-Ex, normal vs COVID-19 vs other pneumonia.

    python bench/hide_and_seek.py [--data ../shared/data] [--train 1000] [--test 300] [--size 128]

Trains the recipe (``--config``, default: ResNet-18 from scratch at 128 px, 6 epochs, random
under-sampling: a CPU-sized version of configs/hide_and_seek_resnet50.yaml) on ``--train`` images
of the official Train part (stratified by label, reference lung masks) and tests it on ``--test``
images of the official Val part, once per representation, with HCS on ``--heatmaps`` test images.
Prints one JSON object (accuracy, per-class sensitivity/PPV, HCS per representation, the verdict,
minutes) and writes heatmap PNGs under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CPU_RECIPE = {"classifier": {"backbone": "resnet18", "in_channels": 1, "weights": None},
              "size": 128, "batch_size": 32, "epochs": 6, "lr": 0.001, "balancing": "undersample", "seed": 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("CXRTUNE_SHARED_DATA", "../shared/data"))
    ap.add_argument("--out", default="/tmp/cxrtune-hide-and-seek")
    ap.add_argument("--config", help="recipe YAML (default: the CPU recipe above)")
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--heatmaps", type=int, default=32)
    args = ap.parse_args()

    import pandas as pd
    import torch
    from realdata import covid_qu_ex, stratified  # bench/, beside this script

    from cxrtune.audit.hide_and_seek import hide_and_seek, write_heatmaps
    from cxrtune.jsonsafe import json_safe
    from cxrtune.model.classify import ClassifyConfig

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df = covid_qu_ex(args.data, out)

    train = stratified(df[df["split"] == "train"], args.train).assign(split="train")
    test = stratified(df[df["split"] == "val"], args.test).assign(split="test")
    sub = pd.concat([train, test], ignore_index=True)
    cfg = ClassifyConfig.from_yaml(args.config) if args.config else ClassifyConfig.from_dict(CPU_RECIPE)
    t = time.perf_counter()
    result = hide_and_seek(cfg, sub, heatmap_images=args.heatmaps)
    minutes = (time.perf_counter() - t) / 60
    write_heatmaps(result.pop("heatmaps"), str(out))
    summary = {"benchmark": "hide_and_seek", "device": f"cpu ({os.cpu_count()} cores)", "torch": torch.__version__,
               "images": {"train": len(train), "test": len(test),
                          "train_by_label": train["label"].value_counts().to_dict(),
                          "test_by_label": test["label"].value_counts().to_dict()},
               "minutes": round(minutes, 1), **result}
    (out / "hide_and_seek.json").write_text(json.dumps(json_safe(summary), indent=2))
    print(json.dumps(json_safe(summary), indent=2))


if __name__ == "__main__":
    main()
