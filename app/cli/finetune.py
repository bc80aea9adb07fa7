"""``skillgraft finetune``: fine-tune the base on a task and write a standard safetensors checkpoint."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from app.cli.common import (
    ProgressBar,
    add_base_options,
    add_data_options,
    add_head_options,
    print_json,
    task_data_from,
)
from app.cli.overlap import add_task_source_options, resolve_patches
from app.grafting.base import load_base
from app.grafting.checkpoint import save_checkpoint
from app.grafting.data import write_user_data
from app.grafting.finetune import FinetuneConfig, finetune
from app.grafting.heads import default_classifier_kind
from app.grafting.patch import GraftPatch, grafted
from app.grafting.stitch import member_patch, stitch


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("finetune", help="fine-tune the base on a task (embeddings frozen)")
    add_base_options(parser)
    add_data_options(parser)
    add_head_options(parser)
    group = parser.add_argument_group("training")
    group.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    group.add_argument(
        "--lr", type=float, default=None, help="learning rate (default: 2e-2 on an encoder, 1e-2 on a decoder)"
    )
    group.add_argument("--epochs", type=int, default=10)
    group.add_argument("--batch-size", type=int, default=8)
    group.add_argument("--weight-decay", type=float, default=0.0)
    group.add_argument("--l1", type=float, default=0.0, help="ℓ1 pull towards the base: λ·Σ|θ − θ_pre|")
    group.add_argument("--max-length", type=int, default=128)
    group = parser.add_argument_group("continual skills")
    group.add_argument(
        "--protect",
        help="comma-separated tasks (store names or patch files): start from their stitched grafts and freeze "
        "the union of their masks, so the new task cannot overwrite them",
    )
    add_task_source_options(group)
    parser.add_argument("--out", required=True, help="output checkpoint folder")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    base = load_base(args.base_model, args.device)
    data = task_data_from(args)
    words = args.label_words.split(",") if args.label_words else None
    kind = args.classifier_kind or default_classifier_kind(base.model_type)
    spec = data.head_spec(args.mode, args.template, words, kind, family=base.family)
    config = FinetuneConfig(
        optimizer=args.optimizer,
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        l1=args.l1,
        seed=args.seed,
        max_length=args.max_length,
    )
    bar = ProgressBar("finetune")
    start: GraftPatch | None = None
    masks = None
    protected: dict[str, object] = {}
    if args.protect:
        patches = resolve_patches(args.protect, args.store_dir, base)
        stitched = stitch(base.parameters, list(patches.values()))
        start = member_patch(stitched, next(iter(patches.values())), "start")
        masks = stitched.masks({name: p.shape for name, p in base.parameters.items()})
        protected = {"protect": list(patches), "protected_entries": stitched.size}
    try:
        # the earlier skills are written into the base for the copy fine-tuning starts from, then restored
        with grafted(base.parameters, start) if start is not None else contextlib.nullcontext():
            result = finetune(base, spec, data.train, data.dev, config, progress=bar, protect=masks)
    finally:
        bar.close()
    record = {**result.training_record(), "dataset": args.dataset, "k": args.k, **protected}
    save_checkpoint(args.out, base, result.body, spec, result.head, training=record)
    # the examples it was trained and chosen on, so `skillgraft submit --train/--dev` can hand the same to a server
    write_user_data(Path(args.out) / "train.jsonl", data.train, spec.labels)
    write_user_data(Path(args.out) / "dev.jsonl", data.dev, spec.labels)
    print_json({"checkpoint": args.out, **result.metrics, **protected})
    return 0
