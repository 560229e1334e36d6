"""Training speed on the CPU in float32 and with bf16 autocast (the trainer's ``cpu_amp``).

bench/accuracy.py --cpu turns ``cpu_amp`` on where the CPU computes bf16 natively (AVX-512 BF16
or AMX); this measures what that buys on the machine at hand. One optimiser step of the CPU
accuracy bench's Stage II network (U-Net/ResNet-18, light decoder, classification head;
channels_last, AdamW, segmentation + classification BCE), random weights and data.

    python bench/train_precision.py [--sizes 128,192] [--batch 16] [--steps 8]

Prints one JSON object: milliseconds per image, the median of ``steps`` timed steps after two
warm-ups, per input size and precision, the precisions alternated twice.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="128,192")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F

    from cxrtune.model.models import ModelConfig, build_model
    from cxrtune.model.train import native_cpu_bf16

    torch.manual_seed(0)
    results = {}
    for size in (int(s) for s in args.sizes.split(",")):
        model = build_model(ModelConfig(arch="Unet", encoder="resnet18", in_channels=1, classification=True,
                                        decoder={"decoder_channels": [128, 64, 32, 16, 16]}))
        model = model.to(memory_format=torch.channels_last).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.rand(args.batch, 1, size, size).contiguous(memory_format=torch.channels_last)
        mask = (torch.rand(args.batch, 1, size, size) > 0.5).float()
        label = (torch.rand(args.batch) > 0.5).float()
        times: dict[str, list[float]] = {"float32": [], "bf16": []}
        for precision in list(times) * 2:
            runs = []
            for i in range(args.steps + 2):
                t = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    seg, cls = model(x)
                loss = (F.binary_cross_entropy_with_logits(seg.float(), mask)
                        + F.binary_cross_entropy_with_logits(cls.float().squeeze(1), label))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if i >= 2:
                    runs.append(time.perf_counter() - t)
            times[precision].append(round(1000 * float(np.median(runs)) / args.batch, 2))
        results[str(size)] = {"ms_per_image": times, "speedup": round(min(times["float32"]) / min(times["bf16"]), 2)}
    print(json.dumps({"benchmark": "train_precision", "device": f"cpu ({os.cpu_count()} cores)",
                      "machine": platform.machine(), "native_cpu_bf16": native_cpu_bf16(),
                      "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": args.batch,
                      "sizes": results}, indent=2))


if __name__ == "__main__":
    main()
