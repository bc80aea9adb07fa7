"""``skillgraft submit``: upload a fine-tuned checkpoint and data to a server and follow the job to its end."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from app.cli.common import ProgressBar, print_json
from app.grafting.localize import METHODS, LocalizeConfig

FINISHED = ("succeeded", "failed", "cancelled")


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("submit", help="upload a checkpoint to a server and follow its localization job")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server address")
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, model.safetensors, or a .zip")
    parser.add_argument("--train", required=True, help="training data (JSONL/CSV: text, text_pair?, label)")
    parser.add_argument("--dev", help="optional dev data")
    parser.add_argument("--task", required=True, help="name of the new task")
    parser.add_argument("--mode", choices=["prompt", "classifier"], help="default: what the checkpoint declares")
    parser.add_argument("--template", help="prompt template with {text} and {mask}")
    parser.add_argument("--label-words", help="comma-separated label words (prompt mode)")
    defaults = LocalizeConfig()
    group = parser.add_argument_group("localization (defaults: the server's, shared with skillgraft localize)")
    group.add_argument("--sparsity", type=float, default=defaults.sparsity)
    group.add_argument("--steps", type=int, default=defaults.steps)
    group.add_argument("--method", choices=METHODS, default=defaults.method)
    group.add_argument("--max-step", type=float, default=defaults.max_step, help="scale-free step (0: plain step)")
    group.add_argument("--budget", type=int, default=None, help="hard cap on the mask size in entries")
    group.add_argument("--examples-per-step", type=int, default=defaults.examples_per_step)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replace", action="store_true", help="replace a task of the same name")
    parser.add_argument("--no-follow", action="store_true", help="print the job and return at once")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to follow the job")
    parser.set_defaults(run=run)


def _spec(args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "task": args.task,
        "sparsity": args.sparsity,
        "steps": args.steps,
        "method": args.method,
        "max_step": args.max_step or None,
        "budget": args.budget,
        "examples_per_step": args.examples_per_step,
        "seed": args.seed,
        "replace": args.replace,
    }
    if args.mode:
        spec["mode"] = args.mode
    if args.template:
        spec["template"] = args.template
    if args.label_words:
        spec["label_words"] = args.label_words.split(",")
    return spec


def _checkpoint_file(path: Path, scratch: Path) -> Path:
    """A folder is zipped (model.safetensors + config.json only); files go as they are."""
    if not path.is_dir():
        return path
    archive = scratch / "checkpoint.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in ("model.safetensors", "config.json"):
            if (path / name).is_file():
                zf.write(path / name, name)
    return archive


def run(args: argparse.Namespace) -> int:
    import httpx

    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = _checkpoint_file(Path(args.checkpoint), Path(scratch))
        parts = {"checkpoint": checkpoint, "train": Path(args.train)}
        if args.dev:
            parts["dev"] = Path(args.dev)
        with contextlib.ExitStack() as stack:
            files = {
                field: (path.name, stack.enter_context(path.open("rb")), "application/octet-stream")
                for field, path in parts.items()
            }
            response = httpx.post(
                args.url.rstrip("/") + "/v1/tasks", files=files, data={"spec": json.dumps(_spec(args))}, timeout=600
            )
    if response.status_code >= 400:
        error = response.json().get("error", {}) if "json" in response.headers.get("content-type", "") else {}
        print(f"skillgraft submit: {response.status_code} {error.get('message', response.text)}", file=sys.stderr)
        return 1
    job = response.json()
    if args.no_follow:
        print_json(job)
        return 0
    bar = ProgressBar(f"job {job['id'][:12]}")
    deadline = time.monotonic() + args.timeout
    try:
        while job["state"] not in FINISHED and time.monotonic() < deadline:
            time.sleep(0.5)
            job = httpx.get(args.url.rstrip("/") + job["url"], timeout=30).json()
            progress = job.get("progress") or {}
            bar({k: v for k, v in progress.items() if v is not None and k != "updated_at"})
    finally:
        bar.close()
    print_json(job)
    return 0 if job["state"] == "succeeded" else 1
