"""Inference speed of the scorer's networks in the standard (NCHW) and channels_last layouts.

The scorer runs channels_last on every device; this measures why on the machine at hand (and
checks that both layouts give the same output). Random weights: speed does not depend on them.

    python bench/memory_format.py [--batch 8] [--repeats 5] [--threads N]

Prints one JSON object: milliseconds per image, the median of ``repeats`` timed forward passes
after two warm-ups, per network and layout, alternating the layouts twice.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

NETWORKS = [  # (name, model settings, input size): the CPU accuracy bundle's and the CLI defaults'
    ("unet-r18-light-128-disease", {"arch": "Unet", "encoder": "resnet18", "classification": True,
                                    "decoder": {"decoder_channels": [128, 64, 32, 16, 16]}}, 128),
    ("unet-r18-light-256", {"arch": "Unet", "encoder": "resnet18",
                            "decoder": {"decoder_channels": [128, 64, 32, 16, 16]}}, 256),
    ("fpn-r18-256", {"arch": "FPN", "encoder": "resnet18"}, 256),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import numpy as np
    import torch

    from cxrtune.model.models import ModelConfig, build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    formats = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
    results = {}
    for name, settings, size in NETWORKS:
        model = build_model(ModelConfig(in_channels=1, encoder_weights=None, **settings)).eval()
        x = torch.rand(args.batch, 1, size, size)
        times: dict[str, list[float]] = {f: [] for f in formats}
        outputs = {}
        for fmt in list(formats) * 2:
            model = model.to(memory_format=formats[fmt])
            xx = x.contiguous(memory_format=formats[fmt])
            runs = []
            with torch.inference_mode():
                for i in range(args.repeats + 2):
                    t = time.perf_counter()
                    y = model(xx)
                    if i >= 2:
                        runs.append(time.perf_counter() - t)
            times[fmt].append(1000 * float(np.median(runs)) / args.batch)
            outputs[fmt] = (y[0] if isinstance(y, tuple) else y).float()
        nchw, cl = min(times["nchw"]), min(times["channels_last"])
        results[name] = {"size": size, "ms_per_image": {f: [round(v, 2) for v in t] for f, t in times.items()},
                         "speedup": round(nchw / cl, 2),
                         "max_abs_output_difference": float((outputs["nchw"] - outputs["channels_last"]).abs().max())}
    print(json.dumps({"benchmark": "memory_format", "device": f"cpu ({os.cpu_count()} cores)",
                      "machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "batch": args.batch, "networks": results}, indent=2))


if __name__ == "__main__":
    main()
