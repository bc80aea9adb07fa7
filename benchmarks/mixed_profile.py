"""Where a mixed batch's time goes: plain forward vs mixed forward, split into plan build, hooks and dense work.

    python benchmarks/mixed_profile.py [--bases smollm2-135m-instruct all-minilm-l6-v2] [--reps 5]

For each base: one batch of ``--batch`` rows over ``--batch`` distinct synthetic tasks (sparsity 1e-4, the
patches of benchmarks/serve_bench.py), run interleaved ``--reps`` times as (a) the plain base forward, (b) the
mixed forward (plan build + forward with the delta hooks), (c) the same mixed forward with a CPU timer around
every hook (by module type) and around the norm hooks' x̂ computation. Times are process CPU time with torch on
one thread: on a shared machine they are far steadier than wall time. Prints a table (min and median) and writes
benchmarks/results/mixed_profile.json. Also states the registry's bytes per cached task and per patch entry.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.engine import kernel  # noqa: E402
from app.engine.mixed import DeltaHooks, DeltaTargets, Target, build_plan  # noqa: E402
from app.engine.registry import TaskRegistry  # noqa: E402
from app.engine.weights import BaseWeights  # noqa: E402
from app.grafting.base import load_base  # noqa: E402
from app.grafting.heads import Example, encoder_hidden  # noqa: E402
from app.grafting.packaged_bases import DEFAULT_BASE, PACKAGED_BASES  # noqa: E402
from benchmarks.serve_bench import texts, write_store  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "mixed_profile.json"


class TimedHooks(DeltaHooks):
    """The engine's hooks with a process-CPU timer around each hook call (keyed by module type) and around the
    norm x̂ computation; the timers add a little overhead, so the untimed mixed forward is measured apart."""

    def __init__(self, targets: DeltaTargets) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        super().__init__(targets)

    def _hook(self, slots: list[Target], module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> Any:
        if self.plan is None:
            return None
        kind = "linear" if isinstance(module, nn.Linear) else "norm"
        start = time.process_time()
        result = super()._hook(slots, module, inputs, output)
        self.seconds[f"hook_{kind}"] += time.process_time() - start
        self.calls[f"hook_{kind}"] += 1
        return result

    def timed_xhat(self, compute: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def timed(*args: Any) -> torch.Tensor:
            start = time.process_time()
            out = compute(*args)
            self.seconds["norm_xhat"] += time.process_time() - start
            return out

        return timed


def cpu_seconds(work: Callable[[], Any]) -> float:
    start = time.process_time()
    work()
    return time.process_time() - start


def summary(samples: list[float]) -> dict[str, float]:
    return {"min_ms": min(samples) * 1e3, "median_ms": statistics.median(samples) * 1e3}


def profile_base(base_name: str, batch: int, reps: int) -> dict[str, Any]:
    base = load_base(base_name)
    base.encoder.eval()
    weights = BaseWeights.of(base.encoder)
    targets = DeltaTargets.of(base.encoder, weights)
    with tempfile.TemporaryDirectory(prefix="mixed-profile-") as root:
        store = write_store(base, Path(root), batch)
        registry = TaskRegistry(store, base, weights, 1 << 32, 128)
        tasks = [registry.get(f"task{i:04d}") for i in range(batch)]
        cache = registry.cache_info()
    entries = sum(task.num_entries for task in tasks)
    row_entries = [task.mixed_entries() for task in tasks]
    tokenization = tasks[0].tokenization
    collated = tokenization.collate(tokenization.encode_many([Example(t, -1) for t in texts(batch, seed=4)]))
    device = next(base.encoder.parameters()).device
    collated = collated.to(device)
    positions = int(collated.input_ids.shape[1])

    plain_hooks = DeltaHooks(targets)
    timed_hooks = TimedHooks(targets)
    # Where the x̂ of norm weight entries is computed: a hooks method if the engine has one, else the targets'
    # normalisers (the full normalisation pass).
    if hasattr(DeltaHooks, "_normalised"):
        timed_hooks._normalised = timed_hooks.timed_xhat(timed_hooks._normalised)  # type: ignore[method-assign]
    else:
        for target in targets.targets:
            if target.normalise is not None:
                object.__setattr__(target, "normalise", timed_hooks.timed_xhat(target.normalise))
    linear_entries = sum(1 for t in targets.targets if isinstance(t.module, nn.Linear))
    samples: dict[str, list[float]] = defaultdict(list)
    try:
        with torch.inference_mode():
            encoder_hidden(base.encoder, collated)  # warm-up

            def mixed(hooks: DeltaHooks) -> float:
                start = time.process_time()
                hooks.plan = build_plan(row_entries, targets, device, positions)
                planned = time.process_time()
                try:
                    encoder_hidden(base.encoder, collated)
                finally:
                    hooks.plan = None
                samples["plan"].append(planned - start)
                return time.process_time() - start

            for _ in range(reps):
                samples["plain"].append(cpu_seconds(lambda: encoder_hidden(base.encoder, collated)))
                samples["mixed"].append(mixed(plain_hooks))
                timed_hooks.seconds.clear()
                total = mixed(timed_hooks)
                samples["mixed_timed"].append(total)
                for key in ("hook_linear", "hook_norm", "norm_xhat"):
                    samples[key].append(timed_hooks.seconds.get(key, 0.0))
                hooks_s = timed_hooks.seconds["hook_linear"] + timed_hooks.seconds["hook_norm"]
                samples["dense"].append(total - samples["plan"][-1] - hooks_s)
    finally:
        plain_hooks.close()
        timed_hooks.close()
    stats = {name: summary(values) for name, values in samples.items()}
    plain, mixed_ms = stats["plain"]["median_ms"], stats["mixed"]["median_ms"]
    paired = [p / m for p, m in zip(samples["plain"], samples["mixed"], strict=True)]
    return {
        "base": base_name,
        "rows": batch,
        "tasks": batch,
        "positions": int(collated.input_ids.shape[1]),
        "entries_per_batch": entries,
        "patchable_slots": len(targets),
        "linear_slots": linear_entries,
        "timings": stats,
        "mixed_over_plain_throughput_median": plain / mixed_ms,
        "mixed_over_plain_throughput_paired_median": statistics.median(paired),
        "cache_bytes": cache["bytes"],
        "cached_tasks": cache["tasks"],
        "bytes_per_task": cache["bytes"] / max(1, cache["tasks"]),
        "bytes_per_entry": cache["bytes"] / max(1, sum(t.num_entries for t in tasks)),
    }


def print_table(results: list[dict[str, Any]]) -> None:
    keys = ("plain", "mixed", "plan", "hook_linear", "hook_norm", "norm_xhat", "dense")
    print(f"{'base':<24}" + "".join(f"{k:>16}" for k in keys) + f"{'plain/mixed':>13}")
    for r in results:
        t = r["timings"]
        cells = "".join(f"{t[k]['min_ms']:7.1f}/{t[k]['median_ms']:7.1f} " for k in keys)
        print(f"{r['base']:<24}{cells}{r['mixed_over_plain_throughput_paired_median']:>12.3f}")
    print("(ms of process CPU time, min/median; plain/mixed = throughput ratio, paired median)")
    for r in results:
        print(
            f"{r['base']}: {r['entries_per_batch']} entries/batch over {r['positions']} positions; "
            f"{r['bytes_per_task']:.0f} B/task, {r['bytes_per_entry']:.2f} B/entry cached"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bases", nargs="+", default=[DEFAULT_BASE, "all-minilm-l6-v2"], choices=PACKAGED_BASES)
    parser.add_argument("--batch", type=int, default=32, help="rows, each of its own task")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--linear-delta",
        choices=["fused", "torch"],
        default="fused",
        help="Linear-weight deltas by the compiled kernel (app.engine.kernel, built first) or by torch operators",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.linear_delta == "torch":
        kernel.compiled = lambda: None  # type: ignore[assignment]
    elif kernel.build() is None:
        raise SystemExit(f"the kernel could not be built ({kernel.failure()}); use --linear-delta torch")
    results = [profile_base(name, args.batch, args.reps) for name in args.bases]
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "measured_at": datetime.now(UTC).isoformat(),
        "threads": args.threads,
        "linear_delta": args.linear_delta,
        "results": results,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
