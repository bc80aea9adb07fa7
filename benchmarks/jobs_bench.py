"""Job system cost: wall time by phase of a 64-shot localization job through a real uvicorn server (in-process
runner), against calling ``localize`` (+ evaluate + write) directly in this process, on the same checkpoint.

    python benchmarks/jobs_bench.py [--k 64] [--steps 10] [--sparsity 1e-2] [--dataset sst2]

Prints a table and writes benchmarks/results/jobs_bench.json. Target: job overhead over direct <= 10%.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.grafting.base import load_base  # noqa: E402
from app.grafting.checkpoint import Checkpoint, save_checkpoint  # noqa: E402
from app.grafting.data import resolve_task_data, write_user_data  # noqa: E402
from app.grafting.finetune import FinetuneConfig, finetune  # noqa: E402
from app.grafting.localize import LocalizeConfig  # noqa: E402
from app.grafting.patch import save_patch  # noqa: E402
from app.grafting.pipeline import graft, split_for_evaluation  # noqa: E402
from tests.utils.processes import Processes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", default="all-minilm-l6-v2", help="packaged base (the README's figures: MiniLM)")
    parser.add_argument("--dataset", default="sst2")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sparsity", type=float, default=1e-2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/jobs_bench.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    base = load_base(args.base)
    data = resolve_task_data(dataset=args.dataset, k=args.k, seed=0)
    spec = data.head_spec("prompt", family=base.family)
    tuned = finetune(base, spec, data.train, data.dev, FinetuneConfig(epochs=args.epochs, seed=0))
    work = Path(tempfile.mkdtemp(prefix="jobs-bench-"))
    save_checkpoint(work / "ckpt", base, tuned.body, spec, training=tuned.training_record())
    train_file = write_user_data(work / "train.jsonl", data.train, data.labels)
    dev_file = write_user_data(work / "dev.jsonl", data.dev, data.labels)
    # the job's own settings: LocalizeConfig's defaults with the spec's sparsity and steps
    config = LocalizeConfig(method="learned", sparsity=args.sparsity, steps=args.steps, seed=0)

    procs = Processes({"SKILLGRAFT_STORE_DIR": str(work / "store"), "SKILLGRAFT_BASE_MODEL": args.base}, work)
    try:
        url = procs.server(timeout=180)
        # direct: what the job does, minus the job system: the same pipeline with the same settings and splits
        started = time.perf_counter()
        splits = split_for_evaluation(data.train, data.dev, seed=0)
        checkpoint = Checkpoint(body=tuned.body, head={})
        outcome = graft(base, checkpoint, spec, splits, config, task="direct")
        localize_s = outcome.localized.timings.get("total", time.perf_counter() - started)
        save_patch(outcome.patch, work / "direct.safetensors")
        direct_s = time.perf_counter() - started

        job_spec = {
            "task": "bench",
            "mode": "prompt",
            "template": spec.template,
            "label_words": list(spec.label_words or ()),
            "sparsity": args.sparsity,
            "steps": args.steps,
            "seed": 0,
        }
        started = time.perf_counter()
        with (
            (work / "ckpt/model.safetensors").open("rb") as ckpt,
            train_file.open("rb") as tr,
            dev_file.open("rb") as dv,
        ):
            response = httpx.post(
                url + "/v1/tasks",
                data={"spec": json.dumps(job_spec)},
                timeout=600,
                files={
                    "checkpoint": ("model.safetensors", ckpt),
                    "train": ("train.jsonl", tr),
                    "dev": ("dev.jsonl", dv),
                },
            )
        response.raise_for_status()
        upload_s = time.perf_counter() - started
        job = response.json()
        while job["state"] not in ("succeeded", "failed", "cancelled"):
            time.sleep(0.05)
            job = httpx.get(url + job["url"], timeout=30).json()
        job_s = time.perf_counter() - started
        if job["state"] != "succeeded":
            raise SystemExit(f"job {job['state']}: {job['error']}")
    finally:
        procs.stop_all()

    phases = {"upload+validate (HTTP)": upload_s, **{k: v for k, v in job["timings"].items() if k != "done"}}
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "dataset": args.dataset,
        "k": args.k,
        "steps": args.steps,
        "sparsity": args.sparsity,
        "direct_localize_s": localize_s,
        "direct_total_s": direct_s,
        "job_total_s": job_s,
        "overhead_vs_direct_total": job_s / direct_s - 1,
        "overhead_vs_localize_only": job_s / localize_s - 1,
        "job_phases_s": phases,
        # both evaluated by the pipeline on the same split (held out, or the labelled selection set)
        "graft_accuracy_job": job["result"]["metrics"].get("acc_graft"),
        "graft_accuracy_direct": outcome.report.get("acc_graft"),
        "evaluated_on": outcome.report.get("evaluated_on"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{args.dataset} k={args.k}, {args.steps} steps, sparsity {args.sparsity} ({result['machine']})\n")
    print("| phase | seconds |\n|---|---:|")
    for name, seconds in phases.items():
        print(f"| job: {name} | {seconds:.2f} |")
    print(f"| job total (upload → succeeded) | {job_s:.2f} |")
    print(f"| direct: localize | {localize_s:.2f} |")
    print(f"| direct: localize + evaluate + write | {direct_s:.2f} |")
    print(
        f"\noverhead vs direct (same work): {result['overhead_vs_direct_total']:+.1%}"
        f"   vs localize alone: {result['overhead_vs_localize_only']:+.1%}"
    )


if __name__ == "__main__":
    main()
