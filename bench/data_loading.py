"""Data-loading throughput: decode + augment + collate, images/s per CPU worker.

Measures three epochs over the same manifest: from local disk, from an S3 server on the first
epoch (every object fetched), and from S3 on a second epoch (served by the content cache). With
no --endpoint it starts moto's S3 server on 127.0.0.1; with --manifest it reads a real dataset
(e.g. one imported from ../shared/data/covid-qu-ex), else it generates phantoms.

    python bench/data_loading.py [--manifest M] [--n 256] [--size 256] [--workers 0,2]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def epoch(ds, workers: int, batch_size: int) -> float:
    from torch.utils.data import DataLoader

    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, shuffle=False,
                        persistent_workers=False)
    t = time.perf_counter()
    n = sum(len(b["index"]) for b in loader)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", help="manifest to read (default: generated phantoms)")
    ap.add_argument("--n", type=int, default=256, help="images (phantoms, or first N of --manifest)")
    ap.add_argument("--size", type=int, default=256, help="model input size")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", default="0,2", help="DataLoader worker counts to try")
    ap.add_argument("--endpoint", help="S3 endpoint to use instead of a local moto server (its bucket "
                                       "cxrtune-bench must exist: cxrtune creates no bucket)")
    args = ap.parse_args()

    import torch

    from cxrtune import storage
    from cxrtune.data import manifest
    from cxrtune.data.dataset import CXRDataset
    from cxrtune.data.phantom import write_phantoms
    from cxrtune.preprocessing import Preprocessing

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="cxrtune-bench-"))
    if args.manifest:
        df = manifest.load_manifest(args.manifest).head(args.n)
        source = args.manifest
    else:
        df = write_phantoms(work / "phantoms", args.n, size=args.size, seed=0)
        df = manifest.load_manifest(str(work / "phantoms" / "manifest.parquet"))
        source = f"phantoms ({args.n} at {args.size}px)"

    server = None
    if args.endpoint:
        os.environ["CXRTUNE_S3_ENDPOINT_URL"] = args.endpoint
    else:
        from moto.server import ThreadedMotoServer
        from serve_load import free_port

        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        os.environ.update(CXRTUNE_S3_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        from cxrtune import storage

        storage.s3_client().create_bucket(Bucket="cxrtune-bench")  # its own server: cxrtune creates no bucket
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    remote_uri = "s3://cxrtune-bench/manifest.parquet"
    manifest.push_manifest(df, "s3://cxrtune-bench/data", remote_uri, progress=False)
    remote = manifest.load_manifest(remote_uri)

    pre = Preprocessing(size=args.size, in_channels=3)
    results = {}
    for w in [int(x) for x in args.workers.split(",")]:
        local = CXRDataset(df, pre, augment=True)
        cache = storage.ContentCache(work / f"cache-{w}")
        s3 = CXRDataset(remote, pre, augment=True, cache=cache)
        local_rate = epoch(local, w, args.batch_size)
        first = epoch(s3, w, args.batch_size)
        storage.s3_stats.reset()
        cached = epoch(s3, w, args.batch_size)
        per = max(w, 1)
        results[f"workers_{w}"] = {
            "local_images_per_s": round(local_rate, 1),
            "local_images_per_s_per_worker": round(local_rate / per, 1),
            "s3_first_epoch_images_per_s": round(first, 1),
            "s3_cached_epoch_images_per_s": round(cached, 1),
            "s3_cached_epoch_images_per_s_per_worker": round(cached / per, 1),
            "s3_requests_in_cached_epoch_main_process": storage.s3_stats.requests,
        }
    if server:
        server.stop()
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"benchmark": "data_loading", "source": source, "images": len(df),
                      "size": args.size, "batch_size": args.batch_size, "augment": "seed 004",
                      "cpu_count": os.cpu_count(), "machine": platform.machine(),
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
