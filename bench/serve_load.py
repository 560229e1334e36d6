"""Load test for the cxrtune HTTP endpoint: N concurrent clients for T seconds.

    python bench/serve_load.py --url http://127.0.0.1:8000 --images DIR_OR_FILES... \
        --concurrency 16 --duration 30 [--api-key KEY] [--rate R]

Each client loops: POST one image (round-robin over the inputs) to /v1/score, wait for the answer.
``--rate`` caps the total request rate (open-loop pacing) to measure latency at a given load.
Prints one JSON object: requests, ok, errors by status, throughput, latency p50/p95/p99 (ms).
Only addresses on this machine should be targeted from a test or benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from pathlib import Path

import numpy as np


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (benchmarks stay on this machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shipped_ingress_options(env_vars: dict[str, str] | None = None) -> dict:
    """The ingress's ``ray_actor_options`` in the shipped CPU Serve config (its CPUs and glibc
    settings), so that a bench serves through the ingress users deploy, not a copy that drifts;
    ``env_vars`` replaces its environment variables (bench/ingress_env_ab.py compares them)."""
    from cxrtune.resources import shipped
    from cxrtune.serving.deploy import load_config

    options = load_config(str(shipped("serve", "config.cpu.yaml")))[2]["Ingress"]["ray_actor_options"]
    if env_vars is None:
        return options
    return {**options, "runtime_env": {**options.get("runtime_env", {}), "env_vars": dict(env_vars)}}


def collect(paths: list[str]) -> list[bytes]:
    files = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files += sorted(f for f in path.rglob("*") if f.suffix.lower() in {".png", ".jpg", ".jpeg", ".dcm"})
        else:
            files.append(path)
    if not files:
        sys.exit("no input images")
    return [f.read_bytes() for f in files]


async def run_load(url: str, payloads: list[bytes], concurrency: int, duration: float,
                   api_key: str | None = None, rate: float | None = None, timeout: float = 60) -> dict:
    import aiohttp

    latencies, statuses = [], {}
    headers = {"Content-Type": "application/octet-stream"}
    if api_key:
        headers["X-API-Key"] = api_key
    end = time.perf_counter() + duration
    counter = {"i": 0}
    interval = concurrency / rate if rate else 0.0

    async def client(session: aiohttp.ClientSession, k: int) -> None:
        next_t = time.perf_counter() + (interval * k / max(concurrency, 1))
        while time.perf_counter() < end:
            if interval:
                delay = next_t - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_t += interval
            body = payloads[counter["i"] % len(payloads)]
            counter["i"] += 1
            t = time.perf_counter()
            try:
                async with session.post(f"{url}/v1/score", data=body, headers=headers) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                status = type(exc).__name__
            latencies.append((time.perf_counter() - t, status))
            statuses[status] = statuses.get(status, 0) + 1

    t0 = time.perf_counter()
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        await asyncio.gather(*(client(session, k) for k in range(concurrency)))
    wall = time.perf_counter() - t0
    ok = [lat for lat, s in latencies if s == 200]
    ms = np.array(ok) * 1000 if ok else np.array([np.nan])
    return {
        "url": url, "concurrency": concurrency, "duration_s": round(wall, 2), "rate_cap": rate,
        "requests": len(latencies), "ok": len(ok), "errors": len(latencies) - len(ok),
        "status_counts": {str(k): v for k, v in statuses.items()},
        "throughput_images_per_s": round(len(ok) / wall, 2),
        "latency_ms": {"p50": round(float(np.percentile(ms, 50)), 1), "p95": round(float(np.percentile(ms, 95)), 1),
                       "p99": round(float(np.percentile(ms, 99)), 1), "mean": round(float(ms.mean()), 1)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--images", nargs="+", required=True)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--duration", type=float, default=20)
    ap.add_argument("--rate", type=float, help="total requests per second (open loop); default: closed loop")
    ap.add_argument("--api-key")
    args = ap.parse_args()
    result = asyncio.run(run_load(args.url.rstrip("/"), collect(args.images), args.concurrency, args.duration,
                                  args.api_key, args.rate))
    print(json.dumps({"benchmark": "serve_load", **result}, indent=2))


if __name__ == "__main__":
    main()
