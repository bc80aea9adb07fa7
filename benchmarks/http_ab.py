"""The HTTP path of several code revisions side by side: which one is faster, measured in one run.

    python benchmarks/http_ab.py --revisions b136c8d HEAD [--base all-minilm-l6-v2] [--clients 32] [--rounds 8]
    python benchmarks/http_ab.py --revisions HEAD HEAD+SKILLGRAFT_ENGINE_PROCESS=true

A revision may carry settings for its server after ``+`` (``REV+KEY=VALUE+KEY=VALUE``), to compare settings of
one revision the same way.

On a noisy machine two separate ``http_bench`` runs of the same code differ by up to ±10%, more than most changes
to the HTTP layer are worth. Here each revision is checked out into a temporary git worktree and served by its own
``skillgraft serve`` (one torch thread, same store, same settings, all started before the first round); every
round runs the engine alone on that round's traffic, then each server in turn (the order rotates per round), so
every revision meets the same conditions. Reported per revision: the median HTTP/engine ratio over the rounds,
and per round the ratio of each revision's HTTP inputs/s to the first revision's. Writes
benchmarks/results/http_ab_<base>_<clients>clients.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.engine.engine import EngineConfig  # noqa: E402
from app.grafting.packaged_bases import PACKAGED_BASES  # noqa: E402
from benchmarks.http_bench import engine_run, http_run, server_engine_counters, serving_setup, traffic  # noqa: E402


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def start_server(tree: Path, env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    import httpx

    from tests.utils.processes import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--log-level", "warning"],
        cwd=tree,
        env={**os.environ, **env, "PYTHONPATH": str(tree)},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server of {tree} exited:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"server of {tree} not ready after 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--revisions", nargs="+", required=True, help="git revisions; the first is the reference")
    parser.add_argument("--base", default="all-minilm-l6-v2", choices=sorted(PACKAGED_BASES))
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--requests", type=int, default=384, help="single-input requests per run")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--max-batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/http_ab_<base>_<clients>clients.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import httpx

    root, registry, env = serving_setup(args.base, args.tasks, args.max_batch_wait_ms, "http-ab-")
    # (commit, server settings, label) per --revisions entry
    variants: list[tuple[str, dict[str, str], str]] = []
    for spec in args.revisions:
        revision, *pairs = spec.split("+")
        commit = git("rev-parse", "--short", revision)
        variants.append((commit, dict(pair.split("=", 1) for pair in pairs), "+".join([commit, *pairs])))
    commits = [label for _, _, label in variants]
    trees: list[Path] = []
    servers: list[tuple[subprocess.Popen[bytes], str]] = []
    try:
        for i, (commit, settings, _) in enumerate(variants):
            tree = root / f"tree-{i}"
            git("worktree", "add", "--detach", str(tree), commit)
            trees.append(tree)
            servers.append(start_server(tree, {**env, **settings}, root / f"server-{i}.log"))
        for _, url in servers:  # loading a patch is not serving latency
            with httpx.Client(base_url=url, timeout=300) as http:
                for i in range(args.tasks):
                    http.post("/v1/classify", json={"task": f"task{i:04d}", "inputs": ["warm"]}).raise_for_status()
        config = EngineConfig(max_batch_wait_ms=args.max_batch_wait_ms)
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            load = traffic(args.tasks, args.requests, seed=100 + r)
            engine = engine_run(registry, load, args.clients, config)["inputs_per_s"]
            record: dict[str, Any] = {"engine_inputs_per_s": engine, "http": {}}
            for k in [(r + i) % len(commits) for i in range(len(commits))]:
                url = servers[k][1]
                before = server_engine_counters(url)
                run = asyncio.run(http_run(url, load, args.clients))
                after = server_engine_counters(url)
                run["rows_per_batch"] = (after["rows"] - before["rows"]) / max(1, after["batches"] - before["batches"])
                run["over_engine"] = run["inputs_per_s"] / engine
                record["http"][commits[k]] = run
            rounds.append(record)
            print(
                f"round {r}: engine {engine:6.1f} inputs/s  "
                + "  ".join(
                    f"{c} {record['http'][c]['inputs_per_s']:6.1f} ({record['http'][c]['over_engine']:.3f})"
                    for c in commits
                ),
                flush=True,
            )
    finally:
        for proc, _ in servers:
            proc.terminate()
        for proc, _ in servers:
            proc.wait(timeout=30)
        for tree in trees:
            git("worktree", "remove", "--force", str(tree))
    summary = []
    print(f"\n| revision | HTTP / engine (median of {args.rounds}) | range | HTTP / {commits[0]}'s HTTP (median) |")
    print("|---|---|---|---|")
    for c in commits:
        ratios = [record["http"][c]["over_engine"] for record in rounds]
        versus = [record["http"][c]["inputs_per_s"] / record["http"][commits[0]]["inputs_per_s"] for record in rounds]
        row = {
            "revision": c,
            "http_over_engine": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
            "http_over_reference": statistics.median(versus),
            "rounds_faster_than_reference": sum(v > 1 for v in versus),
        }
        summary.append(row)
        print(
            f"| {c} | {row['http_over_engine']:.3f} | {row['min']:.3f}–{row['max']:.3f} | "
            f"{row['http_over_reference']:.3f} ({row['rounds_faster_than_reference']} of {args.rounds} rounds faster) |"
        )
    out = (
        Path(args.out)
        if args.out
        else REPO / "benchmarks" / "results" / f"http_ab_{args.base}_{args.clients}clients.json"
    )
    record_out = {
        "measured_at": datetime.now(UTC).isoformat(),
        "args": vars(args),
        "commits": commits,
        "summary": summary,
        "rounds": rounds,
    }
    out.write_text(json.dumps(record_out, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
