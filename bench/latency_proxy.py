"""Is the multi-objective sweep's cost axis a fair stand-in for served latency? (issue 23, item 3)

    python bench/latency_proxy.py [--space search_spaces/disease_cpu.yaml] [--configs 12] [--threads 1]
    python bench/latency_proxy.py --table search_spaces/disease_cpu.int8_ms.csv
    python bench/latency_proxy.py --table search_spaces/disease_cpu.int8_ms.csv --sizes 96 --append

A Stage II trial reports ``gmacs``: its network's multiply-accumulates per image at its input size
(:func:`cxrtune.model.models.model_gmacs`), exact and free of the noise of timing a network while
other trials share the CPU. This bench measures what that number stands for: for ``--configs``
configurations drawn from the space (every architecture, encoder and decoder preset it holds at
least once, input sizes spread over its range; random weights, speed does not depend on them),
the network is exported to ONNX, quantized to int8 exactly as ``cxrtune bundle export onnx-int8``
does (:func:`cxrtune.scoring.onnx_export.quantize_stage`) and timed through the served runtime
(:class:`cxrtune.scoring.onnx_runtime.OnnxStage`) at the CPU Serve config's batch size (4) and
``--threads`` intra-op threads (a CPU Stage2 replica has num_cpus 0.5: one thread). Rounds are
interleaved over the configurations, so a drift of the machine touches them all alike; each
configuration's latency is the median over rounds.

Target: Spearman's rank correlation of GMACs with int8 latency >= 0.9 over >= 8 configurations.
Prints one JSON object (each configuration's GMACs and ms per image, and the correlations).

``--table CSV`` measures every (architecture, encoder, decoder, size) of the space instead and
writes them as the latency table that ``cxrtune report --latency-table`` and ``promote
--latency-table`` read (:mod:`cxrtune.search.latency_table`): issue 23 item 3's lookup table
measured once. The configurations are timed in blocks of ``--block``, interleaved within a block,
each block also timing the space's first warm-start configuration (the hand-picked network) so
that a drift between blocks shows in ``reference_ms``. The table's ``batch`` and ``threads``
columns say how it was measured. ``--sizes`` measures the space's networks at other input sizes
(``bench/sweep.py --cpu --multi-objective`` trains at 96-128 px, below the space's 128-256), and
``--append`` adds the rows to an existing table measured at the same batch and threads (a network
already there is measured again and replaced).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def draw_configs(space, n: int, seed: int) -> list[dict]:
    """``n`` configurations (arch, encoder, decoder, size): every architecture and every
    (architecture, encoder) and (architecture, decoder) value at least once where ``n`` allows,
    sizes spread evenly over the space's range."""
    rng = random.Random(seed)
    by_name = {p.name: p for p in space.params}

    def choices(name: str, arch: str) -> list:
        p = by_name[name]
        return list(p.values.get(arch, p.values.get("default")) if p.given else p.values)

    sizes = sorted({point["size"] for point in space.network_points()})
    pairs = [(a, e) for a in by_name["arch"].values for e in choices("encoder", a)]
    rng.shuffle(pairs)
    out = []
    for i in range(n):
        arch, encoder = pairs[i % len(pairs)]
        decoders = choices("decoder", arch)
        out.append({"arch": arch, "encoder": encoder, "decoder": decoders[i % len(decoders)],
                    "size": sizes[(i * 3) % len(sizes)]})
    return out


def measure(space, points: list[dict], batch: int, threads: int, rounds: int) -> list[dict]:
    """Each point's GMACs and median int8 ms per image, rounds interleaved over the points."""
    import numpy as np
    import torch

    from cxrtune.model.models import build_model, model_gmacs
    from cxrtune.scoring.onnx_export import export_stage, quantize_stage
    from cxrtune.scoring.onnx_runtime import OnnxStage
    from cxrtune.search.latency_table import KEY_COLUMNS, network_key

    rows, sessions = [], []
    for point in points:
        cfg = space.train_config(point)
        model = build_model(cfg.model).eval()
        channels = cfg.model.in_channels
        gmacs = model_gmacs(model, cfg.size, channels)
        fp32 = export_stage(model, cfg.size, channels, classification=True)
        calibration = [np.random.rand(1, channels, cfg.size, cfg.size).astype(np.float32) for _ in range(4)]
        session = OnnxStage(quantize_stage(fp32, calibration), threads=threads)
        x = torch.rand(batch, channels, cfg.size, cfg.size)
        session(x)  # warm-up
        sessions.append((session, x))
        params_m = round(sum(p.numel() for p in model.parameters()) / 1e6, 3)
        rows.append({**dict(zip(KEY_COLUMNS, network_key(cfg, str(point)))), "gmacs": round(gmacs, 4), "params_m": params_m})
        print(f"{point}: {gmacs:.3f} GMAC", file=sys.stderr)
    times: list[list[float]] = [[] for _ in rows]
    for _ in range(rounds):
        for i, (session, x) in enumerate(sessions):
            t = time.perf_counter()
            session(x)
            times[i].append(1000 * (time.perf_counter() - t) / batch)
    for row, t in zip(rows, times):
        row["int8_ms_per_image"] = round(float(np.median(t)), 3)
    return rows


def write_table(space, reference: dict, args) -> None:
    """Every configuration of the space, in blocks with ``reference`` (a network point) timed in each."""
    import pandas as pd

    from cxrtune.search.latency_table import KEY_COLUMNS, TABLE_COLUMNS, load_latency_table

    appended = args.append and Path(args.table).exists()
    if appended:  # checked whole, as a sweep will read it, before minutes of measuring
        existing = load_latency_table(args.table)
        if (existing.batch, existing.threads) != (args.batch, args.threads):
            sys.exit(f"{args.table} was measured at batch {existing.batch}, {existing.threads} thread(s): "
                     "write a new table")
    points = space.network_points()
    rows, reference_ms, reference_key = [], [], {}
    started = time.time()
    for start in range(0, len(points), args.block):
        block = measure(space, [reference, *points[start:start + args.block]], args.batch, args.threads, args.rounds)
        reference_ms.append(block[0]["int8_ms_per_image"])
        reference_key = {k: block[0][k] for k in KEY_COLUMNS}
        rows.extend(block[1:])
    table = pd.DataFrame(rows).assign(batch=args.batch, threads=args.threads)[list(TABLE_COLUMNS)]
    measured = len(table)
    if appended:
        old = pd.read_csv(args.table)
        replaced = old.set_index(list(KEY_COLUMNS)).index.isin(table.set_index(list(KEY_COLUMNS)).index)
        table = pd.concat([old[~replaced], table], ignore_index=True)
    Path(args.table).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.table, index=False)
    print(json.dumps({
        "bench": "latency_proxy", "mode": "table", "date": time.strftime("%Y-%m-%d"), "space": args.space,
        "sizes": args.sizes or "the space's", "appended": appended,
        "runtime": f"onnxruntime int8 (QDQ), batch {args.batch}, {args.threads} thread(s)", "rounds": args.rounds,
        "table": args.table, "measured": measured, "n": len(table), "minutes": round((time.time() - started) / 60, 2),
        "reference": reference_key, "reference_ms": reference_ms,
        "int8_ms_range": [float(table["int8_ms_per_image"].min()), float(table["int8_ms_per_image"].max())],
    }, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default=str(Path(__file__).resolve().parent.parent / "search_spaces" / "disease_cpu.yaml"))
    ap.add_argument("--configs", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4, help="the served batch size (serve/config.cpu.yaml)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of a Stage2 replica")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table", help="measure every configuration of the space and write this latency table (CSV)")
    ap.add_argument("--block", type=int, default=40, help="--table: configurations interleaved at once")
    ap.add_argument("--sizes", type=int, nargs="+", help="measure at these input sizes instead of the space's")
    ap.add_argument("--append", action="store_true", help="--table: add the rows to the table's existing ones")
    args = ap.parse_args()
    if args.append and not args.table:
        ap.error("--append adds to a --table")
    if args.table and args.sizes and Path(args.table).exists() and not args.append:
        ap.error(f"{args.table} exists: --sizes adds rows to it with --append (or write a new table)")

    import torch
    from scipy.stats import pearsonr, spearmanr

    from cxrtune.search.latency_table import KEY_COLUMNS
    from cxrtune.search.search_space import load_space

    torch.manual_seed(args.seed)
    space = load_space(args.space)
    # the first warm start (the hand-picked network, at its own size) times every block of a table,
    # else the space's first network
    reference = ({k: v for k, v in space.warm_start[0].items() if k in KEY_COLUMNS}
                 if space.warm_start else space.network_points()[0])
    if args.sizes:
        space = space.at_sizes(args.sizes)
    if args.table:
        write_table(space, reference, args)
        return
    rows = measure(space, draw_configs(space, args.configs, args.seed), args.batch, args.threads, args.rounds)
    gmacs = [r["gmacs"] for r in rows]
    ms = [r["int8_ms_per_image"] for r in rows]
    rho = float(spearmanr(gmacs, ms).statistic)
    print(json.dumps({
        "bench": "latency_proxy", "date": time.strftime("%Y-%m-%d"), "space": args.space,
        "runtime": f"onnxruntime int8 (QDQ), batch {args.batch}, {args.threads} thread(s)",
        "configs": rows, "n": len(rows), "spearman_gmacs_latency": round(rho, 4),
        "pearson_gmacs_latency": round(float(pearsonr(gmacs, ms).statistic), 4),
        "targets": {"n>=8": len(rows) >= 8, "spearman>=0.9": rho >= 0.9},
    }, indent=2))


if __name__ == "__main__":
    main()
