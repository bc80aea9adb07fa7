"""``skillgraft localize`` and ``skillgraft evaluate``: find a graft mask for a fine-tuned checkpoint; score a patch.

``localize`` reads a checkpoint written by ``skillgraft finetune --out DIR`` (or any safetensors checkpoint of the
base), learns or picks a mask, writes the patch with ``save_patch`` and a JSON report beside it.
``evaluate`` scores a patch against its checkpoint on a task's test examples.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path
from typing import Any

from app.cli.common import ProgressBar, add_base_options, add_data_options, print_json, task_data_from
from app.core.files import atomic_write
from app.grafting.base import BaseModel, EligibleRule, load_base
from app.grafting.checkpoint import Checkpoint, load_checkpoint, resolve_head, split_for_base
from app.grafting.data import TaskData
from app.grafting.evaluate import Evaluator, mask_breakdown, mask_counts
from app.grafting.heads import Example, HeadSpec
from app.grafting.localize import METHODS, LocalizeConfig
from app.grafting.patch import load_patch, save_patch, validate_for_base
from app.grafting.pipeline import graft, split_for_evaluation


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("localize", help="find a sparse graft mask for a fine-tuned checkpoint")
    add_base_options(parser)
    add_data_options(parser)
    parser.add_argument("--checkpoint", required=True, help="fine-tuned checkpoint folder, .safetensors or .zip")
    parser.add_argument("--task", help="task name stored in the patch (default: the dataset or checkpoint name)")
    group = parser.add_argument_group("localization (defaults: LocalizeConfig's, shared with jobs and benchmarks)")
    defaults = LocalizeConfig()
    group.add_argument("--method", choices=METHODS, default=defaults.method)
    group.add_argument(
        "--sparsity", type=float, default=defaults.sparsity, help="k = sparsity·|E| (γ_base, or the mask size)"
    )
    group.add_argument(
        "--eligible", default=defaults.eligible, help="eligible set: layers[,bias-only][,no-layernorm][,from-layer=N]"
    )
    group.add_argument("--steps", type=int, default=defaults.steps)
    group.add_argument("--bias", type=float, default=defaults.bias, help="b in σ(S − b)")
    group.add_argument(
        "--max-step",
        type=float,
        default=defaults.max_step,
        help="scale-free step: |ΔS| of the --step-rank-th largest entry (0: plain step with --lr)",
    )
    group.add_argument("--lr", type=float, default=defaults.lr, help="η of the plain gradient step (--max-step 0)")
    group.add_argument("--step-rank", type=int, default=None, help="rank of |∂S| that sets the step (default: k)")
    group.add_argument("--examples-per-step", type=int, default=defaults.examples_per_step)
    group.add_argument("--micro-batch", type=int, default=defaults.micro_batch)
    group.add_argument(
        "--budget", type=float, default=None, help="hard cap on the mask size: entries (>= 1) or a fraction of |E|"
    )
    group.add_argument("--l1", type=float, default=defaults.l1, help="L1 penalty on the soft mask size Σγ(S)")
    group.add_argument("--score-every", type=int, default=defaults.score_every, help="score every N steps")
    group.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--out", required=True, help="patch file to write (.safetensors)")
    parser.add_argument("--report", help="JSON report path (default: the patch path with .json)")
    parser.add_argument(
        "--no-evaluate", action="store_true", help="skip scoring the patch (test set, else a held-out share)"
    )
    parser.add_argument("--eval-limit", type=int, default=None, help="score on a seeded sample of N examples")
    parser.set_defaults(run=run_localize)

    ev = commands.add_parser("evaluate", help="score a patch against its checkpoint on test data")
    add_base_options(ev)
    add_data_options(ev)
    ev.add_argument("--patch", required=True)
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--limit", type=int, default=None, help="score on a seeded sample of N test examples")
    ev.add_argument("--out", help="report JSON path (default: print)")
    ev.set_defaults(run=run_evaluate)


def _load(args: argparse.Namespace) -> tuple[BaseModel, Checkpoint, HeadSpec, TaskData]:
    base = load_base(args.base_model, args.device)
    checkpoint = split_for_base(load_checkpoint(args.checkpoint), base)
    spec = resolve_head(checkpoint, base.model_type)
    data = task_data_from(args)
    if tuple(data.labels) != tuple(spec.labels) and len(data.labels) != spec.num_labels:
        raise ValueError(f"the data has labels {list(data.labels)}, the checkpoint {list(spec.labels)}")
    return base, checkpoint, spec, data


def _limit(examples: list[Example], limit: int | None) -> list[Example]:
    """A seeded sample of ``limit`` examples (test files can be sorted by label: never just the first N)."""
    if not limit or limit >= len(examples):
        return list(examples)
    return random.Random(0).sample(examples, limit)


def _budget(value: float | None, eligible: int) -> int | None:
    if value is None:
        return None
    return int(value) if value >= 1 else math.floor(value * eligible)


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, default=str)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def run_localize(args: argparse.Namespace) -> int:
    base, checkpoint, spec, data = _load(args)
    rule = EligibleRule.parse(args.eligible)
    eligible = sum(base.parameters[n].numel() for n in rule.select(base.parameters))
    config = LocalizeConfig(
        method=args.method,
        sparsity=args.sparsity,
        eligible=str(rule),
        steps=args.steps,
        bias=args.bias,
        lr=args.lr,
        max_step=args.max_step or None,
        step_rank=args.step_rank,
        examples_per_step=args.examples_per_step,
        micro_batch=args.micro_batch,
        budget=_budget(args.budget, eligible),
        l1=args.l1,
        score_every=args.score_every,
        max_length=args.max_length,
        seed=args.seed,
    )
    splits = split_for_evaluation(data.train, data.dev, data.test, args.seed)
    splits.evaluation = _limit(splits.evaluation, args.eval_limit)
    task = args.task or args.dataset or Path(args.checkpoint).stem
    bar = ProgressBar(f"localize ({args.method})")
    try:
        outcome = graft(base, checkpoint, spec, splits, config, task=task, progress=bar, evaluate=not args.no_evaluate)
    finally:
        bar.close()
    result = outcome.localized
    report: dict[str, Any] = {
        "task": task,
        "checkpoint": str(args.checkpoint),
        "checkpoint_sha256": checkpoint.sha256,
        "finetune": checkpoint.skillgraft.get("training") or {},
        **result.summary(),
        "mask": mask_breakdown(mask_counts(result.mask)),
        "history": result.history,
    }
    if outcome.report:
        report["evaluation"] = outcome.report
    out = save_patch(outcome.patch, args.out)
    report["patch"] = str(out)
    report_path = Path(args.report) if args.report else out.with_suffix(".json")
    _write_json(report_path, report)
    evaluation = report.get("evaluation") or {}
    print_json(
        {key: report[key] for key in ("patch", "method", "mask_size", "sparsity", "best_step")}
        | {
            "report": str(report_path),
            "evaluated_on": evaluation.get("evaluated_on"),
            "evaluation_examples": evaluation.get("examples"),
            **{k: v for k, v in evaluation.items() if k.startswith(("acc_", "relative"))},
        }
    )
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    base, checkpoint, spec, data = _load(args)
    patch = validate_for_base(load_patch(args.patch), base)
    if patch.spec != spec:
        raise ValueError("the patch's head spec differs from the checkpoint's: not made from this checkpoint")
    test = _limit(data.test, args.limit)
    evaluator = Evaluator(base, spec, checkpoint.body, test, checkpoint.head, head_seed=checkpoint.head_seed)
    report = {"patch": str(args.patch), "checkpoint": str(args.checkpoint), **evaluator.report(patch)}
    if args.out:
        _write_json(Path(args.out), report)
    print_json(report)
    return 0
