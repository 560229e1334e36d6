"""Served throughput under two or more environments of the ingress, interleaved (issue 21, item 10).

    python bench/ingress_env_ab.py --images ../shared/data/brixia-dev/images \
        --arm old='{"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "1048576"}' --arm shipped [--rounds 4]

Why: glibc's settings for the ingress (``runtime_env`` in serve/config*.yaml) trade the RSS that
hostile uploads leave in it (bench/hostile.py) against served throughput, and only an interleaved
comparison on one machine shows a difference of a few percent. Every arm serves the CPU accuracy
pair's shapes (U-Net / ResNet-18, Stage I at 256 px, Stage II at 224 px; random weights, which do
not change the speed) as int8 ONNX, batch 4, one thread per stage, through
``bench/serve_cpu.py``'s ``served()``: concurrency 4 for ``--duration`` s after a warm-up, then
half that rate. ``--arm NAME=JSON`` gives the ingress's environment variables; ``--arm shipped``
(no value) is the shipped CPU config's. The arms run in rounds, the order reversed every other
round (A B, B A, ...; with two arms and an even number of rounds each goes first equally often)
so that drift in the machine favours none. Prints one JSON object: the environment each arm ran with, its runs,
each round's ratio of every arm to the first, and their medians.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ACCURACY_PAIR = ({"arch": "Unet", "encoder": "resnet18", "size": 256}, {"arch": "Unet", "encoder": "resnet18", "size": 224})


def parse_arm(text: str) -> tuple[str, dict[str, str] | None]:
    """``NAME=JSON`` (an object of environment variables) -> (name, variables); ``NAME`` -> (name,
    None: the shipped config's)."""
    name, sep, env = text.partition("=")
    if not name or (sep and not env):
        raise ValueError(f"--arm {text!r}: NAME or NAME=JSON")
    if not sep:
        return name, None
    variables = json.loads(env)
    if not isinstance(variables, dict):
        raise ValueError(f"--arm {text!r}: the JSON must be an object of environment variables")
    return name, {str(k): str(v) for k, v in variables.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", nargs="+", required=True, help="real CXR PNG files or folders")
    ap.add_argument("--arm", action="append", required=True, help="NAME=JSON of env vars, or NAME for the shipped ones")
    ap.add_argument("--rounds", type=int, default=4, help="rounds, each serving every arm once")
    ap.add_argument("--duration", type=float, default=30, help="seconds per load level")
    ap.add_argument("--out", default="/tmp/cxrtune-ingress-env-ab")
    args = ap.parse_args()
    from json_stdout import reserve_stdout  # bench/, beside this script

    json_out = reserve_stdout()  # Ray prints to stdout: keep it for the JSON
    try:
        arms = [parse_arm(a) for a in args.arm]
    except ValueError as exc:  # json.JSONDecodeError is one
        ap.error(str(exc))
    if len(arms) < 2 or len({name for name, _ in arms}) < len(arms):
        ap.error("give two or more --arm, each named once")

    from serve_cpu import served
    from serve_gpu import TRAIN_DIR, lung_examples, random_bundle
    from serve_load import collect, shipped_ingress_options

    from cxrtune.scoring.onnx_export import export_bundle, quantize_bundle

    out = Path(args.out)
    payloads = collect(args.images)
    plain = random_bundle(out, ACCURACY_PAIR, lung_examples(TRAIN_DIR))
    onnx, int8 = out / "onnx", out / "int8"
    for path in (onnx, int8):
        shutil.rmtree(path, ignore_errors=True)
    export_bundle(str(plain), str(onnx))
    quantize_bundle(str(onnx), str(int8), payloads[:8])

    runs: dict[str, list[dict]] = {name: [] for name, _ in arms}
    for i in range(args.rounds):
        for name, env in (arms if i % 2 == 0 else arms[::-1]):
            r = served(int8, payloads, [4], args.duration, 1, "onnx-int8", ingress_env=env)
            runs[name].append({"round": i, "images_per_s": r["peak"]["images_per_s"], "errors": r["peak"]["errors"],
                               "half_load_p50_ms": r["half_peak_load"]["latency_ms"]["p50"],
                               "half_load_p99_ms": r["half_peak_load"]["latency_ms"]["p99"]})
            print(json.dumps({"arm": name, **runs[name][-1]}), file=sys.stderr, flush=True)
    first = arms[0][0]
    ratios = {name: [round(b["images_per_s"] / a["images_per_s"], 3) for a, b in zip(runs[first], runs[name])
                     if a["images_per_s"] > 0]
              for name, _ in arms[1:]}
    used = {name: shipped_ingress_options(env).get("runtime_env", {}).get("env_vars", {}) for name, env in arms}
    print(json.dumps({"benchmark": "ingress_env_ab", "images": len(payloads), "ingress_env_vars": used, "runs": runs,
                      "errors": sum(r["errors"] for arm in runs.values() for r in arm), f"ratio_to_{first}": ratios,
                      f"median_ratio_to_{first}": {name: statistics.median(r) if r else None for name, r in ratios.items()}},
                     indent=1), file=json_out, flush=True)
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
