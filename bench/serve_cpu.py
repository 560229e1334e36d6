"""The scorer on a CPU (issue 10, item 9): seed 004's pair, seed style against cxrtune's paths.

    python bench/serve_cpu.py --images ../shared/data/covid-qu-ex/Val/COVID-19/images [--quick]

One run measures, on real CXRs, with seed 004's pair (DeepLabV3+/EfficientNet-B1 @512 and
MA-Net/RegNetX-064 @544, random weights: speed does not depend on them):

* the seed-style reference: one image at a time, FP32 PyTorch, PIL + torchvision preprocessing
  (``bench/serve_gpu.py``'s ``reference``, the same function the GPU bench uses);
* cxrtune's library path (the scoring policy, ``load_bundle`` + ``score_scans``) with torch, with
  ONNX Runtime (``cxrtune bundle export onnx``) and with its int8 export (``bundle export onnx-int8``),
  one image at a time;
* cxrtune served over HTTP with the FP32 and then the int8 ONNX export (Ray Serve: one ingress and
  one replica per stage, ``--threads``
  network threads per stage replica, idle threads sleeping so the two stages share the cores) at
  rising concurrency to find the peak, then at half the peak rate for p50/p99 latency;
* the FLOP bound: the networks' FLOPs per image (torch's FlopCounterMode) over a measured FP32
  matmul rate on this machine, i.e. the images/s no implementation could beat;
* the bytes moved between the ingress and the stages per request, before (float32 working image
  to each stage, full-size masks back) and now (uint8 at the smaller of the image and each
  network's input size, uint8 probability maps back at that size), for the bench's images and for
  a full-size radiograph (``--full-size``; default: pydicom-data's RG1_UNCR.dcm, a 1955 x 1841
  CR chest PA).

* with ``--parity-bundle`` (trained weights), int8 against FP32 on real images (``int8_parity``).

Target: served throughput >= 1.4x the seed-style reference. Prints one JSON object.
``--quick`` uses tiny models to check the script.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pickle
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def matmul_gflops(seconds: float = 3.0) -> float:
    """FP32 GEMM rate of this machine with all its threads (GFLOP/s)."""
    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        a @ b
        n += 1
    return 2 * 1024 ** 3 * n / (time.perf_counter() - t) / 1e9


def network_gflops(scorer) -> dict:
    """FLOPs of one forward pass of each network at its input size (GFLOP, multiply-add = 2)."""
    from cxrtune.model.models import model_gmacs

    out = {}
    for stage in ("lung", "disease"):
        m = scorer.lung if stage == "lung" else scorer.disease
        out[stage] = 2 * model_gmacs(m.model, m.pre.size, m.pre.in_channels)
    return out


def library_path(bundle: Path, data: list[bytes], runtime: str, n: int) -> dict:
    """cxrtune's scoring policy in-process, one image at a time (decode to record)."""
    from cxrtune.preprocessing import load_scan
    from cxrtune.scoring.scorer import load_bundle

    scorer = load_bundle(str(bundle), device="cpu", batch_size=1, runtime=runtime)
    for d in data[:2]:
        scorer.score_scans([load_scan(d)])
    scored = 0
    t = time.perf_counter()
    for i in range(n):
        scored += scorer.score_scans([load_scan(data[i % len(data)])])[0][0]["status"] == "scored"
    wall = time.perf_counter() - t
    return {"runtime": scorer.runtime, "images": n, "images_per_s": round(n / wall, 3),
            "ms_per_image": round(1000 * wall / n, 1), "scored": scored}  # unscored images skip Stage II


def int8_parity(src: Path, out: Path, calibration: list[str], evaluation: list[str]) -> dict:
    """The int8 export against the FP32 one on a bundle with trained weights (parity means nothing
    with random ones): calibrated on ``calibration`` images, compared on ``evaluation`` images
    (Dice of the lung masks and of the unrefined opacity masks, p(disease), score)."""

    import numpy as np

    from cxrtune.model.metrics import agreement_dice
    from cxrtune.preprocessing import load_scan
    from cxrtune.scoring.onnx_export import quantize_bundle
    from cxrtune.scoring.scorer import load_bundle

    bundle = out / "parity-bundle"
    shutil.rmtree(bundle, ignore_errors=True)  # this bench's own output from an earlier run
    step = max(1, len(calibration) // 32)
    used = quantize_bundle(str(src), str(bundle), [Path(f).read_bytes() for f in calibration[::step][:32]])
    scans = [load_scan(Path(f).read_bytes()) for f in evaluation]
    fp32, int8 = (load_bundle(str(bundle), device="cpu", runtime=r) for r in ("onnx", "onnx-int8"))
    a, b = fp32.score_scans(scans), int8.score_scans(scans)

    images, lungs = [s.image for s in scans], [d.lung for _, d in a]
    raw_a = fp32.with_thresholds(cls=0.0).opacity_masks(images, lungs)
    raw_b = int8.with_thresholds(cls=0.0).opacity_masks(images, lungs)
    scored = [(ra["score"], rb["score"]) for (ra, _), (rb, _) in zip(a, b) if ra["score"] is not None and rb["score"] is not None]
    return {"bundle": str(src), "calibration_images": used["calibration_images"], "images": len(scans),
            "lung_dice_mean": round(float(np.mean([agreement_dice(da.lung, db.lung) for (_, da), (_, db) in zip(a, b)])), 4),
            "opacity_dice_mean_unrefined": round(float(np.mean([agreement_dice(ma, mb) for (ma, _), (mb, _) in zip(raw_a, raw_b)
                                                                if ma.any() or mb.any()])), 4),
            "p_disease_abs_diff_max": round(max((abs(pa - pb) for (_, pa), (_, pb) in zip(raw_a, raw_b)), default=0.0), 4),
            "same_status": sum(ra["status"] == rb["status"] for (ra, _), (rb, _) in zip(a, b)),
            "same_score": sum(x == y for x, y in scored), "scored_by_both": len(scored),
            "score_abs_diff_max": max((abs(x - y) for x, y in scored), default=None)}


def payload_bytes(bundle: Path, data: bytes) -> dict:
    """Pickled bytes between the ingress and the stages for one image: before (the float32
    working image and full-size masks) and now (the lean inputs and outputs actually sent)."""
    import numpy as np

    from cxrtune.preprocessing import load_scan
    from cxrtune.scoring.scorer import disease_input, load_bundle, stage_input

    scorer = load_bundle(str(bundle), device="cpu", batch_size=1, runtime="torch")
    image = load_scan(data).image
    lung = scorer.lung_masks([image])[0]
    def size(obj):
        return len(pickle.dumps(obj, protocol=5))
    before = (size(image) + size(lung)  # Stage I: image in, bool mask out
              + size((image, lung)) + size((np.zeros_like(lung), 0.5)))  # Stage II: image + lungs in, mask + p out
    digest = "0" * 16
    x1 = stage_input(image, scorer.lung.pre)
    p1 = scorer.forward("lung", [x1])[0]
    x2, _ = disease_input(image, lung, scorer.disease.pre)
    p2 = scorer.forward("disease", [x2])[0]
    after = (size((str(bundle), digest, x1)) + size((digest, p1))
             + size((str(bundle), digest, x2)) + size((digest, p2)))
    return {"working_image": list(image.shape), "before": before, "after": after,
            "ratio": round(before / after, 1)}


def served(bundle: Path, payloads: list[bytes], concurrency: list[int], duration: float, threads: int,
           runtime: str, ingress_env: dict[str, str] | None = None) -> dict:
    """The app served on 127.0.0.1 with the CPU shapes (one replica per stage, batch 4), loaded at
    each concurrency, then at half the peak's rate. ``ingress_env``: the ingress's environment
    variables in place of the shipped config's."""
    import ray
    from ray import serve
    from serve_load import free_port, run_load, shipped_ingress_options

    from cxrtune.cluster import start_ray
    from cxrtune.serving.app import application as build_app

    if not ray.is_initialized():
        start_ray(num_cpus=2, include_dashboard=False)
        served.port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": served.port})
    port = served.port
    stage = {"num_replicas": 1, "max_ongoing_requests": 16, "max_queued_requests": 256,
             "ray_actor_options": {"num_cpus": 0.5}}
    deployments = {"Stage1": stage, "Stage2": stage,
                   "Ingress": {"num_replicas": 1, "max_ongoing_requests": 64, "max_queued_requests": 256,
                               "ray_actor_options": shipped_ingress_options(ingress_env)}}
    settings = {"bundle": str(bundle), "max_batch_size": 4, "batch_wait_timeout_s": 0.02, "device": "cpu",
                "runtime": runtime, "threads": threads,
                "auth": "none"}  # a throughput measure on 127.0.0.1: no key on purpose
    serve.run(build_app(settings, deployments), name="cxrtune", route_prefix="/")  # replaces the last run's app
    url = f"http://127.0.0.1:{port}"
    asyncio.run(run_load(url, payloads, 2, min(10.0, duration), timeout=300))  # warm-up
    sweep = []
    for c in concurrency:
        r = asyncio.run(run_load(url, payloads, c, duration, timeout=300))
        sweep.append(r)
        print(json.dumps({"concurrency": c, "images_per_s": r["throughput_images_per_s"],
                          "p99": r["latency_ms"]["p99"], "errors": r["errors"]}), file=sys.stderr)
    peak = max(sweep, key=lambda r: r["throughput_images_per_s"])
    half = asyncio.run(run_load(url, payloads, peak["concurrency"], duration,
                                rate=peak["throughput_images_per_s"] / 2, timeout=300))
    import requests

    runtime = requests.get(f"{url}/v1/models", timeout=30).json()
    return {"peak": {"concurrency": peak["concurrency"], "images_per_s": peak["throughput_images_per_s"],
                     "latency_ms": peak["latency_ms"], "errors": peak["errors"]},
            "half_peak_load": {"rate": half["rate_cap"], "images_per_s": half["throughput_images_per_s"],
                               "latency_ms": half["latency_ms"], "errors": half["errors"]},
            "sweep": [{"concurrency": r["concurrency"], "images_per_s": r["throughput_images_per_s"],
                       "p50": r["latency_ms"]["p50"], "p99": r["latency_ms"]["p99"], "errors": r["errors"]}
                      for r in sweep],
            "bundle": runtime.get("bundle"), "stages": runtime.get("stages"), "threads_per_stage": threads}


def main() -> None:
    from serve_gpu import QUICK_PAIR, SEED_PAIR, TRAIN_DIR, lung_examples, random_bundle, reference

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", nargs="+", required=True, help="real CXR PNG files or folders")
    ap.add_argument("--out", default="/tmp/cxrtune-serve-cpu")
    ap.add_argument("--n", type=int, default=12, help="images per in-process measurement")
    ap.add_argument("--duration", type=float, default=45, help="seconds per load level")
    ap.add_argument("--concurrency", default="1,2,4")
    ap.add_argument("--threads", type=int, default=2, help="network threads per stage replica")
    ap.add_argument("--full-size", help="a full-size radiograph for the bytes-per-request measure "
                                        "(default: pydicom-data's RG1_UNCR.dcm)")
    ap.add_argument("--parity-bundle", help="a bundle with trained weights for the int8 parity check")
    ap.add_argument("--calibration", help="int8 parity: folder of images to calibrate on (not the --parity-eval ones)")
    ap.add_argument("--parity-eval", help="int8 parity: folder of images to compare on")
    ap.add_argument("--parity-n", type=int, default=60)
    ap.add_argument("--lung-examples", default=str(TRAIN_DIR),
                    help="COVID-QU-Ex Train (images and lung masks) that random Stage I's head is fitted to")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    from json_stdout import reserve_stdout  # bench/, beside this script

    json_out = reserve_stdout()  # Ray prints to stdout: keep it for the JSON
    if args.parity_bundle and not (args.calibration and args.parity_eval):
        ap.error("--parity-bundle needs --calibration and --parity-eval (folders of PNGs, not the same images)")

    import os

    import torch
    from serve_load import collect

    from cxrtune.jsonsafe import json_safe
    from cxrtune.scoring.onnx_export import export_bundle
    from cxrtune.scoring.scorer import load_bundle

    pair = QUICK_PAIR if args.quick else SEED_PAIR
    n = 3 if args.quick else args.n
    bundle = random_bundle(Path(args.out), pair, lung_examples(Path(args.lung_examples)))
    payloads = collect(args.images)
    files = [f for p in args.images for f in (sorted(Path(p).rglob("*.png")) if Path(p).is_dir() else [Path(p)])]

    gflops = network_gflops(load_bundle(str(bundle), device="cpu", runtime="torch"))
    rate = matmul_gflops(1.0 if args.quick else 3.0)
    ref = reference(bundle, files, "cpu", n)
    print(json.dumps({"reference_seed_style": ref}), file=sys.stderr, flush=True)
    lib_torch = library_path(bundle, payloads, "torch", n)
    print(json.dumps({"library_torch": lib_torch}), file=sys.stderr, flush=True)
    t = time.perf_counter()
    plain, bundle = bundle, bundle.with_name(bundle.name + "-onnx")
    shutil.rmtree(bundle, ignore_errors=True)
    export_bundle(str(plain), str(bundle))  # bundles are immutable: the export is a new one
    export_s = time.perf_counter() - t
    lib_onnx = library_path(bundle, payloads, "onnx", n)
    from cxrtune.scoring.onnx_export import quantize_bundle

    t = time.perf_counter()
    fp32, bundle = bundle, bundle.with_name(bundle.name + "-int8")
    shutil.rmtree(bundle, ignore_errors=True)
    quantize_bundle(str(fp32), str(bundle), payloads[:8])  # speed does not depend on the calibration of random weights
    int8_s = time.perf_counter() - t
    lib_int8 = library_path(bundle, payloads, "onnx-int8", n)
    print(json.dumps({"library_onnx_int8": lib_int8}), file=sys.stderr, flush=True)
    moved = {"bench_images": payload_bytes(bundle, payloads[0])}
    try:
        if not args.full_size:
            from pydicom.data import get_testdata_file

            args.full_size = get_testdata_file("RG1_UNCR.dcm")
        moved["full_size"] = payload_bytes(bundle, Path(args.full_size).read_bytes())
    except Exception as exc:  # noqa: BLE001 - a measure that cannot be taken must not cost the run
        moved["full_size"] = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps({"library_onnx": lib_onnx, "bytes_per_request": moved}), file=sys.stderr, flush=True)
    parity = None
    if args.parity_bundle:
        def pngs(folder: str) -> list[str]:  # COVID-QU-Ex keeps masks beside the images: images/ only
            found = sorted(Path(folder).rglob("*.png"))
            return [str(f) for f in (f for f in found if f.parent.name == "images")] or [str(f) for f in found]

        evaluation = pngs(args.parity_eval)
        try:  # a measure that fails must not cost the served numbers
            parity = int8_parity(Path(args.parity_bundle), Path(args.out), pngs(args.calibration),
                                 evaluation[::max(1, len(evaluation) // args.parity_n)][:args.parity_n])
        except Exception as exc:  # noqa: BLE001
            parity = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps({"int8_parity": parity}), file=sys.stderr, flush=True)
    levels = [int(c) for c in args.concurrency.split(",")]
    duration = 8.0 if args.quick else args.duration
    http = served(bundle, payloads, levels, duration, args.threads, "onnx")
    print(json.dumps({"served_onnx": http["peak"]}), file=sys.stderr, flush=True)
    try:
        http_int8 = served(bundle, payloads, levels, duration, args.threads, "onnx-int8")
        ratio_int8 = http_int8["peak"]["images_per_s"] / ref["images_per_s"]
    except Exception as exc:  # noqa: BLE001 - keep the FP32 numbers
        http_int8, ratio_int8 = {"error": f"{type(exc).__name__}: {exc}"}, float("nan")
    bound = rate / (gflops["lung"] + gflops["disease"])
    ratio = http["peak"]["images_per_s"] / ref["images_per_s"]
    result = {
        "benchmark": "serve_cpu", "device": f"cpu ({os.cpu_count()} cores)", "torch": torch.__version__,
        "quick": args.quick, "models": {"lung": pair[0], "disease": pair[1]}, "images": len(payloads),
        "reference_seed_style": ref,
        "library_torch": lib_torch, "library_onnx": lib_onnx, "onnx_export_s": round(export_s, 1),
        "library_onnx_int8": lib_int8, "int8_export_s": round(int8_s, 1), "int8_parity": parity,
        "served": http, "served_int8": http_int8,
        "flop_bound": {"gflop_per_image": {k: round(v, 2) for k, v in gflops.items()},
                       "matmul_gflops": round(rate, 1), "images_per_s": round(bound, 3),
                       "served_share_of_bound": round(http["peak"]["images_per_s"] / bound, 2)},
        "bytes_per_request": moved,
        "ratios_to_reference": {"library_torch": round(lib_torch["images_per_s"] / ref["images_per_s"], 2),
                                "library_onnx": round(lib_onnx["images_per_s"] / ref["images_per_s"], 2),
                                "library_onnx_int8": round(lib_int8["images_per_s"] / ref["images_per_s"], 2),
                                "served": round(ratio, 2), "served_int8": round(ratio_int8, 2)},
        "targets_met": {"served (FP32 ONNX) >= 1.4x seed style": ratio >= 1.4,
                        "served (int8 ONNX) >= 1.4x seed style": ratio_int8 >= 1.4},
    }
    print(json.dumps(json_safe(result), indent=2), file=json_out, flush=True)
    import ray
    from ray import serve

    serve.shutdown()  # after the result is out: a crash while shutting down loses nothing
    ray.shutdown()


if __name__ == "__main__":
    main()
