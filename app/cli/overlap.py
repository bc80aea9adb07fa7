"""``skillgraft overlap``: pairwise mask overlap of several tasks as JSON, and a heatmap PNG.

Tasks are named as in the store (``--store-dir``) or given as patch files (``path/to/patch.safetensors``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from app.cli.common import add_base_options, print_json
from app.core.errors import TaskNotFound
from app.core.files import atomic_write
from app.core.object_store import open_task_store
from app.core.store import LocalTaskStore
from app.grafting.base import BaseModel, load_base
from app.grafting.overlap import overlap_report
from app.grafting.patch import GraftPatch, load_patch, validate_for_base


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("overlap", help="pairwise mask overlap of tasks (JSON matrix + heatmap PNG)")
    add_base_options(parser)
    add_task_source_options(parser)
    parser.add_argument("--tasks", required=True, help="comma-separated store task names or patch files")
    parser.add_argument("--out", default="overlap.json", help="JSON report path")
    parser.add_argument("--png", default=None, help="heatmap path (default: the JSON path with .png; '' for none)")
    parser.add_argument("--metric", default="containment", choices=["containment", "jaccard", "sign_agreement"])
    parser.set_defaults(run=run)


def add_task_source_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store-dir", default=None, help="task store folder (default: SKILLGRAFT_STORE_DIR)")


def resolve_patches(items: str, store_dir: str | None, base: BaseModel) -> dict[str, GraftPatch]:
    """Patches by task name from comma-separated store names or patch files, validated against ``base``."""
    from app.config import get_settings

    store = LocalTaskStore(store_dir) if store_dir else open_task_store(get_settings())
    patches: dict[str, GraftPatch] = {}
    for item in (part.strip() for part in items.split(",") if part.strip()):
        path = Path(item)
        if item.endswith(".safetensors") and path.is_file():
            patch = load_patch(path)
            name = patch.task if patch.task not in patches else path.stem
        else:
            stored = store.stat(item)
            if stored is None:
                raise TaskNotFound(f"task {item!r} not found")
            patch, name = load_patch(store.fetch(stored)), item
        validate_for_base(patch, base)
        patch.task = name
        patches[name] = patch
    if not patches:
        raise ValueError("name at least one task")
    return patches


def run(args: argparse.Namespace) -> int:
    base = load_base(args.base_model, args.device)
    report = overlap_report(resolve_patches(args.tasks, args.store_dir, base), base.parameters)
    out = Path(args.out)
    atomic_write(out, lambda tmp: tmp.write_text(json.dumps(report, indent=2, sort_keys=True)))
    png = out.with_suffix(".png") if args.png is None else (Path(args.png) if args.png else None)
    if png is not None:
        from app.plots import overlap_heatmap

        overlap_heatmap([(f"mask overlap ({len(report['tasks'])} tasks)", report)], png, args.metric)
    print_json(
        {
            "report": str(out),
            "png": str(png) if png else None,
            "tasks": report["tasks"],
            args.metric: report[args.metric],
        }
    )
    return 0
