"""The HTTP path against the engine it fronts: requests/s, inputs/s and latency through a real uvicorn.

    python benchmarks/http_bench.py [--base all-minilm-l6-v2] [--clients 1 8 32] [--tasks 100] [--requests 256]

For each client count: (a) the engine alone, in this process, on the same traffic (closed loop, ``clients``
single-input requests outstanding, tasks drawn uniformly from ``--tasks`` synthetic patches), and (b) the same
loop of ``POST /v1/classify`` requests through ``skillgraft serve`` (a real uvicorn subprocess on loopback).
Both run torch on one thread (``OMP_NUM_THREADS=1`` for the server), so the ratio http/engine says what the
protocol layer costs. Engine and HTTP runs alternate (``--rounds``); the medians are reported. On Linux the
server's threads' CPU time is read from /proc around each HTTP run: the event loop's (main thread) CPU per request
and its share of the run, which bounds the ratio where the inference thread cannot run without the GIL meanwhile.
Writes benchmarks/results/http_bench_<base>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.engine import kernel  # noqa: E402
from app.engine.engine import Engine, EngineConfig  # noqa: E402
from app.engine.registry import TaskRegistry  # noqa: E402
from app.engine.weights import BaseWeights  # noqa: E402
from app.grafting.base import load_base  # noqa: E402
from app.grafting.heads import Example  # noqa: E402
from app.grafting.packaged_bases import PACKAGED_BASES  # noqa: E402
from benchmarks.serve_bench import stream, texts, write_store  # noqa: E402


def serving_setup(
    base_name: str, n_tasks: int, max_batch_wait_ms: float, prefix: str
) -> tuple[Path, TaskRegistry, dict[str, str]]:
    """A temporary folder with a store of ``n_tasks`` synthetic patches, the registry the engine-alone runs read
    it through, and the environment a ``skillgraft serve`` needs to serve that store on one torch thread."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    store_dir = root / "store"
    base = load_base(base_name)
    registry = TaskRegistry(write_store(base, store_dir, n_tasks), base, BaseWeights.of(base.encoder), 1 << 32, 128)
    # the engine-alone runs and the server both take the mixed path's compiled kernel, or neither does
    fused = kernel.build() is not None
    env = {
        "SKILLGRAFT_STORE_DIR": str(store_dir),
        "SKILLGRAFT_BASE_MODEL": base_name,
        "SKILLGRAFT_MAX_BATCH_WAIT_MS": str(max_batch_wait_ms),
        "SKILLGRAFT_MIXED_KERNEL": "true" if fused else "false",
        "OMP_NUM_THREADS": "1",
    }
    return root, registry, env


def traffic(n_tasks: int, n_requests: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pool = texts(64, seed=2)
    return [(f"task{rng.randrange(n_tasks):04d}", rng.choice(pool)) for _ in range(n_requests)]


def engine_run(
    registry: TaskRegistry, load: list[tuple[str, str]], clients: int, config: EngineConfig
) -> dict[str, float]:
    engine = Engine(registry.base, config, registry.weights)
    try:
        rows = []
        for name, text in load:
            task = registry.get(name)
            rows.append((task, task.tokenization.encode(Example(text, -1))))
        stream(engine, rows[:clients], clients)  # warm-up
        # a batch's busy time is added just after it has answered its rows: let the last one's land
        time.sleep(0.2)
        stats = engine.stats
        before = (stats.rows, stats.batches, stats.busy_seconds)
        cpu_before = time.process_time()
        inputs_per_s, _ = stream(engine, rows, clients)
        # this process's CPU over the run, against the server's threads' share in an HTTP run
        cpu_share = (time.process_time() - cpu_before) * inputs_per_s / len(rows)
        time.sleep(0.2)
        rows_per_batch = (stats.rows - before[0]) / max(1, stats.batches - before[1])
        busy_fraction = (stats.busy_seconds - before[2]) * inputs_per_s / len(rows)
    finally:
        engine.close()
    return {
        "inputs_per_s": inputs_per_s,
        "requests_per_s": inputs_per_s,
        "rows_per_batch": rows_per_batch,
        "busy_fraction": busy_fraction,
        "cpu_share": cpu_share,
    }


def thread_cpu_seconds(pid: int) -> tuple[float, float] | None:
    """CPU seconds (user + system) of a process's main thread, which runs the server's event loop, and of all its
    other threads together (the inference thread, worker threads), from /proc; None where there is no /proc."""
    tasks = Path(f"/proc/{pid}/task")
    if not tasks.is_dir():
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    main_thread = other_threads = 0.0
    for task in tasks.iterdir():
        with contextlib.suppress(OSError):
            stat = (task / "stat").read_text()
            # fields after the parenthesised name: utime and stime are the 12th and 13th
            fields = stat[stat.rindex(")") + 2 :].split()
            seconds = (int(fields[11]) + int(fields[12])) / ticks
            if int(task.name) == pid:
                main_thread += seconds
            else:
                other_threads += seconds
    return main_thread, other_threads


def server_engine_counters(url: str) -> dict[str, float]:
    """Rows, batches and busy seconds the server's engine has run so far, from its Prometheus metrics."""
    import httpx

    samples = {"rows": "skillgraft_batch_size_sum{", "batches": "skillgraft_batch_size_count{"}
    totals = dict.fromkeys([*samples, "busy_seconds"], 0.0)
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        value = line.rsplit(" ", 1)[-1]
        for kind, prefix in samples.items():
            if line.startswith(prefix):
                totals[kind] += float(value)
        if line.startswith("skillgraft_engine_busy_seconds_total "):
            totals["busy_seconds"] = float(value)
    return totals


async def http_run(url: str, load: list[tuple[str, str]], clients: int, generator: str = "raw") -> dict[str, float]:
    """``clients`` closed-loop clients over keep-alive connections, each sending its next request as soon as the
    previous answer arrived. The load generator's own CPU time is recorded: it shares this machine's cores with
    the server, so a heavy client (httpx spends ~3 ms of CPU per request) starves the server and, by answering
    late, breaks up the engine's batches."""
    latencies: list[float] = []
    queue = list(reversed(load))
    post = _raw_poster if generator == "raw" else _httpx_poster
    cpu_start = time.process_time()
    async with post(url, clients) as send:

        async def client(connection: int) -> None:
            while queue:
                task, text = queue.pop()
                start = time.perf_counter()
                await send(connection, {"task": task, "inputs": [text]})
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "requests_per_s": len(latencies) / elapsed,
        "inputs_per_s": len(latencies) / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1e3,
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1e3,
        "client_cpu_ms_per_request": (time.process_time() - cpu_start) / len(latencies) * 1e3,
    }


Sender = Callable[[int, dict[str, Any]], Awaitable[None]]


@contextlib.asynccontextmanager
async def _raw_poster(url: str, clients: int) -> AsyncIterator[Sender]:
    """HTTP/1.1 POSTs written and parsed by hand over one keep-alive socket per client: a load generator that
    costs tens of microseconds per request, like a client on another machine would cost this one."""
    host, port = url.removeprefix("http://").split(":")
    connections = [await asyncio.open_connection(host, int(port)) for _ in range(clients)]

    async def send(connection: int, body: dict[str, Any]) -> None:
        reader, writer = connections[connection]
        payload = json.dumps(body).encode()
        writer.write(
            b"POST /v1/classify HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
        )
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(
            int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        )
        answer = await reader.readexactly(length)
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {answer[:300]!r}")

    try:
        yield send
    finally:
        for _, writer in connections:
            writer.close()


@contextlib.asynccontextmanager
async def _httpx_poster(url: str, clients: int) -> AsyncIterator[Sender]:
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:

        async def send(connection: int, body: dict[str, Any]) -> None:
            (await http.post("/v1/classify", json=body)).raise_for_status()

        yield send


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="all-minilm-l6-v2", choices=sorted(PACKAGED_BASES))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--requests", type=int, default=256, help="single-input requests per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--load-generator",
        choices=["raw", "httpx"],
        default="raw",
        help="raw: hand-written HTTP/1.1 over keep-alive sockets (light); httpx: a typical Python client (heavy)",
    )
    parser.add_argument("--max-batch-wait-ms", type=float, default=5.0, help="the batcher's wait, engine and server")
    parser.add_argument(
        "--engine-process",
        action="store_true",
        help="the server runs its forward passes in a child process (SKILLGRAFT_ENGINE_PROCESS); the engine-alone "
        "runs stay in this process",
    )
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/http_bench_<base>[_engine_process].json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import httpx

    from tests.utils.processes import Processes

    root, registry, env = serving_setup(args.base, args.tasks, args.max_batch_wait_ms, "http-bench-")
    if args.engine_process:
        env["SKILLGRAFT_ENGINE_PROCESS"] = "true"
    config = EngineConfig(max_batch_wait_ms=args.max_batch_wait_ms)
    (root / "logs").mkdir()
    procs = Processes(env, root / "logs")
    results = []
    try:
        url = procs.server(timeout=300)
        server_pid = procs.procs[-1].pid
        # Warm the server's task cache: loading a patch is not serving latency.
        with httpx.Client(base_url=url, timeout=300) as http:
            for i in range(args.tasks):
                http.post("/v1/classify", json={"task": f"task{i:04d}", "inputs": ["warm"]}).raise_for_status()
        for clients in args.clients:
            load = traffic(args.tasks, args.requests, seed=clients)
            engine_runs, http_runs = [], []
            for _ in range(args.rounds):
                engine_runs.append(engine_run(registry, load, clients, config))
                before = server_engine_counters(url)
                cpu_before = thread_cpu_seconds(server_pid)
                run = asyncio.run(http_run(url, load, clients, args.load_generator))
                cpu_after = thread_cpu_seconds(server_pid)
                after = server_engine_counters(url)
                if cpu_before and cpu_after:
                    # The event loop's CPU share of the run: while it holds the GIL, the inference thread waits
                    # for it between operators (all the time on a base whose operators are short).
                    run["loop_cpu_ms_per_request"] = (cpu_after[0] - cpu_before[0]) / len(load) * 1e3
                    run["other_threads_cpu_ms_per_request"] = (cpu_after[1] - cpu_before[1]) / len(load) * 1e3
                    run["loop_cpu_share"] = run["loop_cpu_ms_per_request"] * run["requests_per_s"] / 1e3
                    run["other_threads_cpu_share"] = (
                        run["other_threads_cpu_ms_per_request"] * run["requests_per_s"] / 1e3
                    )
                run["rows_per_batch"] = (after["rows"] - before["rows"]) / max(1, after["batches"] - before["batches"])
                # the share of the run the server's inference thread spent in batches
                busy_seconds = after["busy_seconds"] - before["busy_seconds"]
                run["busy_fraction"] = busy_seconds * run["requests_per_s"] / len(load)
                http_runs.append(run)
            row: dict[str, Any] = {"clients": clients, "engine_runs": engine_runs, "http_runs": http_runs}
            row["engine_inputs_per_s"] = statistics.median(r["inputs_per_s"] for r in engine_runs)
            row["http_inputs_per_s"] = statistics.median(r["inputs_per_s"] for r in http_runs)
            row["http_requests_per_s"] = statistics.median(r["requests_per_s"] for r in http_runs)
            row["p50_ms"] = statistics.median(r["p50_ms"] for r in http_runs)
            row["p99_ms"] = statistics.median(r["p99_ms"] for r in http_runs)
            row["client_cpu_ms_per_request"] = statistics.median(r["client_cpu_ms_per_request"] for r in http_runs)
            row["engine_rows_per_batch"] = statistics.median(r["rows_per_batch"] for r in engine_runs)
            row["http_rows_per_batch"] = statistics.median(r["rows_per_batch"] for r in http_runs)
            row["engine_busy_fraction"] = statistics.median(r["busy_fraction"] for r in engine_runs)
            row["http_busy_fraction"] = statistics.median(r["busy_fraction"] for r in http_runs)
            row["http_over_engine"] = row["http_inputs_per_s"] / row["engine_inputs_per_s"]
            row["engine_cpu_share"] = statistics.median(r["cpu_share"] for r in engine_runs)
            for key in ("loop_cpu_ms_per_request", "loop_cpu_share", "other_threads_cpu_share"):
                if all(key in r for r in http_runs):
                    row[key] = statistics.median(r[key] for r in http_runs)
            results.append(row)
            print(
                f"{clients:>3} clients: engine {row['engine_inputs_per_s']:7.1f} inputs/s  http "
                f"{row['http_inputs_per_s']:7.1f} inputs/s ({row['http_over_engine']:.3f})  p50 {row['p50_ms']:.1f} ms"
                f"  p99 {row['p99_ms']:.1f} ms  rows/batch {row['engine_rows_per_batch']:.1f} vs "
                f"{row['http_rows_per_batch']:.1f}  engine busy {row['engine_busy_fraction']:.2f} vs "
                f"{row['http_busy_fraction']:.2f}  client {row['client_cpu_ms_per_request']:.2f} ms CPU/request"
                + (
                    f"  server loop {row['loop_cpu_ms_per_request']:.2f} ms CPU/request ({row['loop_cpu_share']:.2f}"
                    f" of the run, other threads {row['other_threads_cpu_share']:.2f}; engine alone's process "
                    f"{row['engine_cpu_share']:.2f})"
                    if "loop_cpu_share" in row
                    else ""
                ),
                flush=True,
            )
    finally:
        procs.stop_all()
    suffix = "_engine_process" if args.engine_process else ""
    out = args.out or REPO / "benchmarks" / "results" / f"http_bench_{args.base}{suffix}.json"
    record = {
        "measured_at": datetime.now(UTC).isoformat(),
        "args": vars(args),
        "mixed_kernel": env["SKILLGRAFT_MIXED_KERNEL"] == "true",
        "results": results,
    }
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
