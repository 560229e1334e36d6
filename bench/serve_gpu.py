"""End-to-end HTTP benchmark of the scorer (GPU), against the seed-style reference.

    python bench/serve_gpu.py --images ../shared/data/covid-qu-ex/Val/COVID-19/images [--quick]

* builds a bundle with seed 004's chosen pair and random weights (speed does not depend on them):
  DeepLabV3+ / EfficientNet-B1 at 512 and MA-Net / RegNetX-064 at 544, 3-channel input; Stage I's
  head is fitted to 16 COVID-QU-Ex Train lung masks (``--lung-examples``), so that the images pass
  the plausibility check and Stage II runs;
* deploys it with Ray Serve (batched stages on fractional GPUs) on 127.0.0.1, drives it with
  bench/serve_load.py at rising concurrency to find the peak throughput, then at half the peak
  rate to read p50/p95/p99 latency;
* in the same run, the seed-style reference: one image at a time, FP32, preprocessing with PIL
  and torchvision transforms, both stages and the zone post-processing in one Python loop.

Targets (issue 5): >= 300 images/s end to end; p99 <= 250 ms at half of peak load.
``--quick`` uses tiny models on the CPU to check the script. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SEED_PAIR = ({"arch": "DeepLabV3Plus", "encoder": "efficientnet-b1", "size": 512},
             {"arch": "MAnet", "encoder": "tu-regnetx_064", "size": 544})
QUICK_PAIR = ({"arch": "FPN", "encoder": "resnet18", "size": 128}, {"arch": "FPN", "encoder": "resnet18", "size": 128})
# the default --lung-examples: COVID-QU-Ex's Train part in the shared data
SHARED_DATA = Path(os.environ.get("CXRTUNE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TRAIN_DIR = SHARED_DATA / "covid-qu-ex" / "Train"


def lung_examples(train_dir: Path, per_class: int = 8) -> list[tuple[Path, Path]]:
    """COVID-QU-Ex Train images with their lung masks (``CLASS/images/X.png`` beside
    ``CLASS/lung masks/X.png``): the first ``per_class`` of Normal and of COVID-19."""
    pairs = [(f, f.parent.parent / "lung masks" / f.name)
             for cls in ("Normal", "COVID-19") for f in sorted((train_dir / cls / "images").glob("*.png"))[:per_class]]
    pairs = [(image, mask) for image, mask in pairs if mask.is_file()]
    if not pairs:
        raise SystemExit(f"--lung-examples: no COVID-QU-Ex images with lung masks under {train_dir} "
                         "(CLASS/images/X.png and CLASS/lung masks/X.png): give the Train folder")
    return pairs


def fit_lung_head(model, size: int, examples: list[tuple[Path, Path]]) -> None:
    """Fit a random Stage I's segmentation head to real lung masks: a per-pixel logistic
    regression (scikit-learn) on its random decoder's features, over the head's k x k taps (3 x 3
    for U-Net, 1 x 1 for DeepLabV3+ and FPN). Random features keep enough of the image for
    lung-like masks, so the plausibility check lets the images through and Stage II runs, as with
    trained weights; a head that marks every pixel as lung is refused, and Stage II's time would
    go unmeasured. Written by hand: speed does not depend on the weights, and no library fits one
    layer of an SMP model this way."""
    import cv2
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    from cxrtune.preprocessing import Preprocessing, load_scan, resize_image

    pre = Preprocessing(size=size, in_channels=3)
    head = model.segmentation_head[0]
    k = head.weight.shape[2]  # the head's k x k neighbourhoods of the decoder's features, as it sees them
    rng, features, labels = np.random.default_rng(0), [], []
    model.eval()
    with torch.no_grad():
        for image, mask in examples:
            truth = cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE)
            if truth is None:
                raise SystemExit(f"--lung-examples: {mask} is not a readable mask")
            x = pre.to_tensor(resize_image(load_scan(image.read_bytes()).image, size))[None]
            f = model.decoder(model.encoder(x))
            columns = torch.nn.functional.unfold(f, k, padding=k // 2)[0].T.numpy()  # pixel x (channel, ky, kx)
            rows = rng.choice(len(columns), min(len(columns), 200_000 // len(examples)), replace=False)
            features.append(columns[rows])
            labels.append((cv2.resize(truth, f.shape[:1:-1], interpolation=cv2.INTER_NEAREST) > 127).ravel()[rows])
    x, y = np.concatenate(features), np.concatenate(labels)
    mean, sd = x.mean(0), x.std(0) + 1e-12  # random decoders' features can be ~1e-4
    # only the channels within 5x of the widest: int8 exports quantize the features per tensor,
    # and a weak channel, rounded to a level or two, would carry a large weight of noise
    channel_sd = sd.reshape(-1, k * k).max(1)
    keep = np.repeat(channel_sd >= channel_sd.max() / 5, k * k)
    fit = LogisticRegression(max_iter=1000, class_weight="balanced").fit(((x - mean) / sd)[:, keep], y)
    weight = np.zeros_like(sd)
    weight[keep] = fit.coef_[0] / sd[keep]
    with torch.no_grad():
        head.weight[0] = torch.from_numpy(weight.reshape(head.weight.shape[1:])).float()
        head.bias[0] = float(fit.intercept_[0] - weight @ mean)


def random_bundle(out: Path, pair, examples: list[tuple[Path, Path]] | None = None) -> Path:
    """A bundle of two runs with random weights (seeded), made by ``make_bundle`` like any other.
    With ``examples`` (:func:`lung_examples`), Stage I's head is fitted to them
    (:func:`fit_lung_head`), so that images are scored (:func:`scored_share` says how many);
    without, it marks every pixel as lung, and every image is refused as not a frontal CXR before
    Stage II (enough where Stage II's time is not measured)."""
    import torch

    from cxrtune.model.artifacts import CheckpointMeta, make_bundle, write_checkpoint_meta
    from cxrtune.model.models import ModelConfig, build_model
    from cxrtune.model.train import TrainConfig
    from cxrtune.preprocessing import Preprocessing

    torch.manual_seed(0)
    runs = {}
    for task, spec in (("lung", pair[0]), ("disease", pair[1])):
        model_cfg = ModelConfig(arch=spec["arch"], encoder=spec["encoder"], in_channels=3,
                                classification=task == "disease")
        best = out / "runs" / task / "best"
        best.mkdir(parents=True, exist_ok=True)
        model = build_model(model_cfg)
        if task == "lung" and examples:
            fit_lung_head(model, spec["size"], examples)
        elif task == "lung":  # random weights may find no lungs (422): every pixel is lung
            torch.nn.init.constant_(model.segmentation_head[0].bias, 10.0)
        torch.save(model.state_dict(), best / "model.pt")
        write_checkpoint_meta(str(best), CheckpointMeta(
            config=TrainConfig(task=task, model=model_cfg, size=spec["size"]).to_dict(),
            preprocessing=Preprocessing(size=spec["size"], in_channels=3).to_dict()))
        runs[task] = str(out / "runs" / task)
    shutil.rmtree(out / "bundle", ignore_errors=True)  # this bench's own bundle from an earlier run: bundles are immutable
    make_bundle(runs["lung"], runs["disease"], str(out / "bundle"), zone_threshold=0.3, name="seed004-random")
    return out / "bundle"


def scored_share(bundle: Path, payloads: list[bytes], device: str, runtime: str) -> dict:
    """How many of ``payloads`` the bundle scores (cxrtune's scoring policy in-process): an
    unscored image skips Stage II, so a speed measured on it would leave Stage II out."""
    from cxrtune.preprocessing import load_scan
    from cxrtune.scoring.scorer import load_bundle

    scorer = load_bundle(str(bundle), device=device, runtime=runtime)
    records = [record for record, _ in scorer.score_scans([load_scan(p) for p in payloads])]
    return {"images": len(records), "scored": sum(r["status"] == "scored" for r in records), "runtime": scorer.runtime}


def reference(bundle: Path, files: list[Path], device: str, n: int) -> dict:
    """Seed-style inference: one image at a time, FP32, PIL + torchvision preprocessing."""
    import numpy as np
    import torch
    import torchvision.transforms as T
    from PIL import Image

    from cxrtune import zones
    from cxrtune.preprocessing import extract_roi
    from cxrtune.scoring.scorer import load_bundle

    scorer = load_bundle(str(bundle), device=device, batch_size=1, runtime="torch")
    lung_m, dis_m = scorer.lung.model.float().eval(), scorer.disease.model.float().eval()
    # the seed's code: the standard layout on every device (the scorer runs channels_last)
    lung_m, dis_m = lung_m.to(memory_format=torch.contiguous_format), dis_m.to(memory_format=torch.contiguous_format)
    def pre(size):
        return T.Compose([T.Resize((size, size)), T.ToTensor(),
                          T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    t_lung, t_dis = pre(scorer.lung.pre.size), pre(scorer.disease.pre.size)

    def one(path: Path) -> int:
        img = Image.open(path).convert("RGB")
        with torch.no_grad():
            p = torch.sigmoid(lung_m(t_lung(img)[None].to(device)))[0, 0].cpu().numpy()
        grey = np.asarray(img.convert("L"), np.float32) / 255
        lung = np.asarray(Image.fromarray((p * 255).astype(np.uint8)).resize(img.size)) >= 128
        roi, _, box = extract_roi(grey, lung)
        roi_img = Image.fromarray((roi * 255).astype(np.uint8)).convert("RGB")
        with torch.no_grad():
            seg, cls = dis_m(t_dis(roi_img)[None].to(device))
        prob = torch.sigmoid(seg)[0, 0].cpu().numpy() * float(torch.sigmoid(cls)[0, 0] >= 0.5)
        opacity = np.zeros_like(lung)
        if box is not None:
            y0, y1, x0, x1 = box
            opacity[y0:y1, x0:x1] = np.asarray(Image.fromarray((prob * 255).astype(np.uint8)).resize((x1 - x0, y1 - y0))) >= 128
        return zones.score_masks(lung, opacity & lung, 0.3)["score"]

    for f in files[:3]:
        one(f)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(n):
        one(files[i % len(files)])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    return {"images": n, "images_per_s": round(n / wall, 2), "ms_per_image": round(1000 * wall / n, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", nargs="+", required=True, help="real CXR PNG files or folders")
    ap.add_argument("--out", default="/tmp/cxrtune-serve-bench")
    ap.add_argument("--duration", type=float, default=20)
    ap.add_argument("--concurrency", default="16,32,64,128,256")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--stage-replicas", type=int, default=2, help="replicas per stage (GPU fraction = 1 / (2 x this))")
    ap.add_argument("--ingress-replicas", type=int, default=6)
    ap.add_argument("--reference-images", type=int, default=200)
    ap.add_argument("--lung-examples", default=str(TRAIN_DIR),
                    help="COVID-QU-Ex Train (images and lung masks) that random Stage I's head is fitted to")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    from json_stdout import reserve_stdout  # bench/, beside this script

    json_out = reserve_stdout()  # Ray prints to stdout: keep it for the JSON

    import ray
    import torch
    from ray import serve
    from serve_load import collect, free_port, run_load

    from cxrtune.cluster import start_ray
    from cxrtune.jsonsafe import json_safe
    from cxrtune.serving.app import application as build_app

    gpu = torch.cuda.is_available() and not args.quick
    device = "cuda" if gpu else "cpu"
    bundle = random_bundle(Path(args.out), QUICK_PAIR if args.quick else SEED_PAIR, lung_examples(Path(args.lung_examples)))
    payloads = collect(args.images)
    files = [f for p in args.images for f in (sorted(Path(p).rglob("*.png")) if Path(p).is_dir() else [Path(p)])]

    start_ray(include_dashboard=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    frac = 1.0 / (2 * args.stage_replicas) if gpu else 0
    cpus = 1 if not args.quick else 0.5  # quick mode fits a 2-core machine
    stage = {"num_replicas": args.stage_replicas, "max_ongoing_requests": 4 * args.batch_size,
             "max_queued_requests": 4096, "ray_actor_options": {"num_cpus": cpus, "num_gpus": frac}}
    deployments = {"Stage1": stage, "Stage2": stage,
                   "Ingress": {"num_replicas": args.ingress_replicas, "max_ongoing_requests": 512,
                               "max_queued_requests": 4096, "ray_actor_options": {"num_cpus": cpus}}}
    settings = {"bundle": str(bundle), "max_batch_size": args.batch_size, "batch_wait_timeout_s": 0.005,
                "work_size": 1024, "device": device,
                "auth": "none"}  # a throughput measure on 127.0.0.1: no key on purpose
    serve.run(build_app(settings, deployments), name="cxrtune", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    asyncio.run(run_load(url, payloads, 4, 5))  # warm-up: compile kernels, fill caches
    sweep = []
    for c in [int(x) for x in args.concurrency.split(",")]:
        r = asyncio.run(run_load(url, payloads, c, args.duration))
        sweep.append(r)
        print(json.dumps({"concurrency": c, "images_per_s": r["throughput_images_per_s"], "p99": r["latency_ms"]["p99"],
                          "errors": r["errors"]}), file=sys.stderr)
    peak = max(sweep, key=lambda r: r["throughput_images_per_s"])
    half = asyncio.run(run_load(url, payloads, peak["concurrency"], args.duration,
                                rate=peak["throughput_images_per_s"] / 2))
    serve.shutdown()
    ray.shutdown()
    ref = reference(bundle, files, device, 20 if args.quick else args.reference_images)
    result = {
        "benchmark": "serve_gpu", "device": torch.cuda.get_device_name(0) if gpu else "cpu", "quick": args.quick,
        "models": {"lung": SEED_PAIR[0], "disease": SEED_PAIR[1]} if not args.quick else "tiny",
        "images": len(payloads), "batch_size": args.batch_size, "stage_replicas": args.stage_replicas,
        "scored": scored_share(bundle, payloads[:16], device, "torch"),  # Stage II ran on these
        "peak": {"concurrency": peak["concurrency"], "images_per_s": peak["throughput_images_per_s"],
                 "latency_ms": peak["latency_ms"], "errors": peak["errors"]},
        "half_peak_load": {"rate": half["rate_cap"], "images_per_s": half["throughput_images_per_s"],
                           "latency_ms": half["latency_ms"], "errors": half["errors"]},
        "reference_seed_style": ref,
        "speedup_vs_reference": round(peak["throughput_images_per_s"] / ref["images_per_s"], 1),
        "targets_met": {">=300 img/s": peak["throughput_images_per_s"] >= 300,
                        "p99<=250ms at half peak": half["latency_ms"]["p99"] <= 250},
        "sweep": [{"concurrency": r["concurrency"], "images_per_s": r["throughput_images_per_s"],
                   "p50": r["latency_ms"]["p50"], "p99": r["latency_ms"]["p99"], "errors": r["errors"]} for r in sweep],
    }
    print(json.dumps(json_safe(result), indent=2), file=json_out, flush=True)


if __name__ == "__main__":
    main()
