"""The HTTP path against the engine it fronts: requests/s, inputs/s and latency through a real uvicorn.

    python benchmarks/http_bench.py [--base all-minilm-l6-v2] [--clients 1 8 32] [--tasks 100] [--requests 256]

For each client count: (a) the engine alone, in this process, on the same traffic (closed loop, ``clients``
single-input requests outstanding, tasks drawn uniformly from ``--tasks`` synthetic patches), and (b) the same
loop of ``POST /v1/classify`` requests through ``skillgraft serve`` (a real uvicorn subprocess on loopback).
Both run torch on one thread (``OMP_NUM_THREADS=1`` for the server), so the ratio http/engine says what the
protocol layer costs. Engine and HTTP runs alternate (``--rounds``); the medians are reported. Writes
benchmarks/results/http_bench_<base>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.engine.engine import Engine, EngineConfig  # noqa: E402
from app.engine.registry import TaskRegistry  # noqa: E402
from app.engine.weights import BaseWeights  # noqa: E402
from app.grafting.base import load_base  # noqa: E402
from app.grafting.heads import Example  # noqa: E402
from app.grafting.packaged_bases import PACKAGED_BASES  # noqa: E402
from benchmarks.serve_bench import stream, texts, write_store  # noqa: E402


def traffic(n_tasks: int, n_requests: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pool = texts(64, seed=2)
    return [(f"task{rng.randrange(n_tasks):04d}", rng.choice(pool)) for _ in range(n_requests)]


def engine_run(registry: TaskRegistry, load: list[tuple[str, str]], clients: int) -> dict[str, float]:
    engine = Engine(registry.base, EngineConfig(), registry.weights)
    try:
        rows = []
        for name, text in load:
            task = registry.get(name)
            rows.append((task, task.tokenization.encode(Example(text, -1))))
        stream(engine, rows[:clients], clients)  # warm-up
        inputs_per_s, _ = stream(engine, rows, clients)
    finally:
        engine.close()
    return {"inputs_per_s": inputs_per_s, "requests_per_s": inputs_per_s}


async def http_run(url: str, load: list[tuple[str, str]], clients: int) -> dict[str, float]:
    import httpx

    latencies: list[float] = []
    queue = list(reversed(load))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:

        async def client() -> None:
            while queue:
                task, text = queue.pop()
                start = time.perf_counter()
                response = await http.post("/v1/classify", json={"task": task, "inputs": [text]})
                latencies.append(time.perf_counter() - start)
                response.raise_for_status()

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "requests_per_s": len(latencies) / elapsed,
        "inputs_per_s": len(latencies) / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1e3,
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="all-minilm-l6-v2", choices=sorted(PACKAGED_BASES))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--requests", type=int, default=256, help="single-input requests per run")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import httpx

    from tests.utils.processes import Processes

    root = Path(tempfile.mkdtemp(prefix="http-bench-"))
    store_dir = root / "store"
    base = load_base(args.base)
    registry = TaskRegistry(write_store(base, store_dir, args.tasks), base, BaseWeights.of(base.encoder), 1 << 32, 128)
    env = {"SKILLGRAFT_STORE_DIR": str(store_dir), "SKILLGRAFT_BASE_MODEL": args.base, "OMP_NUM_THREADS": "1"}
    (root / "logs").mkdir()
    procs = Processes(env, root / "logs")
    results = []
    try:
        url = procs.server(timeout=300)
        # Warm the server's task cache: loading a patch is not serving latency.
        with httpx.Client(base_url=url, timeout=300) as http:
            for i in range(args.tasks):
                http.post("/v1/classify", json={"task": f"task{i:04d}", "inputs": ["warm"]}).raise_for_status()
        for clients in args.clients:
            load = traffic(args.tasks, args.requests, seed=clients)
            engine_runs, http_runs = [], []
            for _ in range(args.rounds):
                engine_runs.append(engine_run(registry, load, clients))
                http_runs.append(asyncio.run(http_run(url, load, clients)))
            row: dict[str, Any] = {"clients": clients, "engine_runs": engine_runs, "http_runs": http_runs}
            row["engine_inputs_per_s"] = statistics.median(r["inputs_per_s"] for r in engine_runs)
            row["http_inputs_per_s"] = statistics.median(r["inputs_per_s"] for r in http_runs)
            row["http_requests_per_s"] = statistics.median(r["requests_per_s"] for r in http_runs)
            row["p50_ms"] = statistics.median(r["p50_ms"] for r in http_runs)
            row["p99_ms"] = statistics.median(r["p99_ms"] for r in http_runs)
            row["http_over_engine"] = row["http_inputs_per_s"] / row["engine_inputs_per_s"]
            results.append(row)
            print(
                f"{clients:>3} clients: engine {row['engine_inputs_per_s']:7.1f} inputs/s  http "
                f"{row['http_inputs_per_s']:7.1f} inputs/s ({row['http_over_engine']:.3f})  p50 {row['p50_ms']:.1f} ms"
                f"  p99 {row['p99_ms']:.1f} ms",
                flush=True,
            )
    finally:
        procs.stop_all()
    out = REPO / "benchmarks" / "results" / f"http_bench_{args.base}.json"
    record = {"measured_at": datetime.now(UTC).isoformat(), "args": vars(args), "results": results}
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
