"""Startup cost of the real server, per packaged base: cold start, warm start and resident memory at rest.

    python benchmarks/startup_bench.py [--bases smollm2-135m-instruct all-minilm-l6-v2] [--cold 1] [--warm 3]

Each measurement is a fresh ``python -m app.cli serve --port <free port>`` process (the real server, uvicorn and
all), with ``SKILLGRAFT_BASE_MODEL`` set to the base, ``SKILLGRAFT_STORE_DIR`` to a new empty temporary store and
``SKILLGRAFT_BASE_CACHE`` to a temporary base cache:

* **cold**: the base cache is a new, empty folder, so a GGUF base (SmolLM2) is dequantized and converted to
  safetensors before it loads; timed from process start to the first ``GET /ready`` that answers 200;
* **warm**: the same, with the base cache the last cold start filled (the converted folder is present);
* **RSS at rest**: ``VmRSS`` (and the peak, ``VmHWM``) of the server process from ``/proc/<pid>/status``, read
  ``--settle`` seconds after ``/ready`` answered, with no request served.

A packaged transformers folder (all-MiniLM-L6-v2) needs no conversion, so its cold and warm starts differ only by
the operating system's file cache. "Cold" never means an empty OS page cache: dropping it would disturb the
other work on a shared machine. The load average (``os.getloadavg()``) is recorded around every start: absolute
times on a shared machine are noisy, compare the bases within one run.

Prints a table and writes benchmarks/results/startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.grafting.packaged_bases import PACKAGED_BASES  # noqa: E402 - light: no torch, no transformers
from benchmarks.provenance import source_state  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def status_kb(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def answers_200(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - loopback URL we built
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def start_once(base: str, base_cache: Path, kind: str, settle: float, timeout: float, log_dir: Path) -> dict[str, Any]:
    """One fresh server: seconds from spawn to /ready == 200, then RSS at rest; the process is stopped after."""
    store = Path(tempfile.mkdtemp(prefix="startup-bench-store-"))
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "SKILLGRAFT_BASE_MODEL": base,
        "SKILLGRAFT_STORE_DIR": str(store),
        "SKILLGRAFT_BASE_CACHE": str(base_cache),
    }
    env.pop("SKILLGRAFT_REDIS_URL", None)  # jobs in process: the start measured is the server's alone
    cache_before = folder_bytes(base_cache) if base_cache.exists() else 0
    log_path = log_dir / f"{base}-{kind}-{port}.log"
    load_before = os.getloadavg()
    url = f"http://127.0.0.1:{port}/ready"
    with log_path.open("wb") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--log-level", "warning"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            ready_s = None
            while time.perf_counter() - started < timeout:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{base} server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}"
                    )
                if answers_200(url):
                    ready_s = time.perf_counter() - started
                    break
                time.sleep(0.05)
            if ready_s is None:
                raise RuntimeError(f"{base} server not ready after {timeout:.0f}s (log: {log_path})")
            time.sleep(settle)
            rss_kb, hwm_kb = status_kb(proc.pid, "VmRSS"), status_kb(proc.pid, "VmHWM")
            threads = status_kb(proc.pid, "Threads")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    shutil.rmtree(store, ignore_errors=True)
    return {
        "kind": kind,
        "ready_s": ready_s,
        "rss_mb": rss_kb / 1024 if rss_kb is not None else None,
        "peak_rss_mb": hwm_kb / 1024 if hwm_kb is not None else None,
        "threads": threads,
        "base_cache_mb_before": cache_before / 2**20,
        "base_cache_mb_after": folder_bytes(base_cache) / 2**20 if base_cache.exists() else 0.0,
        "loadavg_1_5_15_before": list(load_before),
        "loadavg_1_5_15_after": list(os.getloadavg()),
    }


def bench_base(base: str, args: argparse.Namespace, scratch: Path, log_dir: Path) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    cache = scratch / f"{base}-cache-cold0"
    for i in range(args.cold):
        cache = scratch / f"{base}-cache-cold{i}"  # a new, empty base cache for every cold start
        cache.mkdir(parents=True)
        runs.append(start_once(base, cache, "cold", args.settle, args.timeout, log_dir))
        print(
            f"  {base} cold {i + 1}: ready in {runs[-1]['ready_s']:.2f} s, RSS {runs[-1]['rss_mb']:.0f} MB", flush=True
        )
    if not args.cold:  # no cold run to fill it: prime the warm cache with one unmeasured start
        cache.mkdir(parents=True, exist_ok=True)
        start_once(base, cache, "prime", 0, args.timeout, log_dir)
    for i in range(args.warm):
        runs.append(start_once(base, cache, "warm", args.settle, args.timeout, log_dir))
        print(
            f"  {base} warm {i + 1}: ready in {runs[-1]['ready_s']:.2f} s, RSS {runs[-1]['rss_mb']:.0f} MB", flush=True
        )

    def summary(kind: str, key: str) -> dict[str, float] | None:
        values = [r[key] for r in runs if r["kind"] == kind and r[key] is not None]
        if not values:
            return None
        return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}

    cold, warm = summary("cold", "ready_s"), summary("warm", "ready_s")
    return {
        "base": base,
        "display": PACKAGED_BASES[base].display,
        "source": "GGUF, converted into the base cache" if PACKAGED_BASES[base].gguf_file else "transformers folder",
        "cold_ready_s": cold,
        "warm_ready_s": warm,
        "cold_over_warm": cold["median"] / warm["median"] if cold and warm else None,
        "rss_mb_at_rest_warm": summary("warm", "rss_mb"),
        "peak_rss_mb_warm": summary("warm", "peak_rss_mb"),
        "rss_mb_at_rest_cold": summary("cold", "rss_mb"),
        "peak_rss_mb_cold": summary("cold", "peak_rss_mb"),
        "base_cache_mb": runs[-1]["base_cache_mb_after"],
        "runs": runs,
    }


def print_table(result: dict[str, Any]) -> None:
    def fmt(stat: dict[str, float] | None, digits: int = 2) -> str:
        if stat is None:
            return "–"
        if stat["n"] == 1:
            return f"{stat['median']:.{digits}f}"
        return f"{stat['median']:.{digits}f} ({stat['min']:.{digits}f}–{stat['max']:.{digits}f})"

    print(
        "\n| base | cold start to /ready, s | warm start to /ready, s (median, min–max) | cold/warm "
        "| RSS at rest, MB (warm) | peak RSS, MB (warm / cold) | base cache, MB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in result["bases"]:
        ratio = f"{row['cold_over_warm']:.2f}" if row["cold_over_warm"] else "–"
        peak_cold = fmt(row["peak_rss_mb_cold"], 0)
        print(
            f"| {row['display']} | {fmt(row['cold_ready_s'])} | {fmt(row['warm_ready_s'])} | {ratio} "
            f"| {fmt(row['rss_mb_at_rest_warm'], 0)} | {fmt(row['peak_rss_mb_warm'], 0)} / {peak_cold} "
            f"| {row['base_cache_mb']:.0f} |"
        )
    m = result["machine"]
    print(
        f"\nload average {'/'.join(f'{x:.2f}' for x in m['loadavg_1_5_15_start'])} at start, "
        f"{'/'.join(f'{x:.2f}' for x in m['loadavg_1_5_15_end'])} at end; {result['wall_s']:.0f} s in all"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bases", nargs="+", default=list(PACKAGED_BASES), choices=list(PACKAGED_BASES))
    parser.add_argument("--cold", type=int, default=1, help="cold starts per base (each with an empty base cache)")
    parser.add_argument("--warm", type=int, default=3, help="warm starts per base")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after /ready before RSS is read")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a start may take")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/startup.json"))
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (base caches, server logs)")
    args = parser.parse_args()

    started = time.perf_counter()
    load_start = os.getloadavg()
    scratch = Path(tempfile.mkdtemp(prefix="startup-bench-"))
    log_dir = scratch / "logs"
    log_dir.mkdir()
    print(f"scratch {scratch}", flush=True)
    try:
        bases = [bench_base(base, args, scratch, log_dir) for base in args.bases]
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": source_state(),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "note": "2-core CPU shared with other work while measured; cold = empty base cache, not empty OS "
            "page cache",
            "loadavg_1_5_15_start": list(load_start),
            "loadavg_1_5_15_end": list(os.getloadavg()),
        },
        "setup": {
            "command": "python -m app.cli serve --port <free port> --log-level warning",
            "env": "SKILLGRAFT_BASE_MODEL=<base>, SKILLGRAFT_STORE_DIR=<new temp dir>, SKILLGRAFT_BASE_CACHE=<temp "
            "dir: new and empty for cold, filled by the last cold start for warm>",
            "ready": "first GET /ready answering 200, polled every 50 ms, timed from spawn",
            "rss": f"VmRSS / VmHWM of the server process {args.settle} s after /ready, no request served",
            "cold_runs": args.cold,
            "warm_runs": args.warm,
        },
        "bases": bases,
        "wall_s": time.perf_counter() - started,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
