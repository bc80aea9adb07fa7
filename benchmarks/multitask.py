"""Several skills in one base: mask overlap, stitching, and forgetting with and without ``--protect``.

1. Separate: per task an SGD prompt-mode fine-tune, a learned mask at one sparsity, the graft evaluated.
2. Multi-task: one model fine-tuned on all tasks at once (prompt mode, batches of the tasks shuffled together: the
   paper's setting), then a mask per task localized from that one model.
3. Overlap matrices of both mask sets (|γi ∩ γj| / |γj|, Jaccard, sign agreement), and whether the sentiment tasks
   overlap more among themselves than with TREC / AG News.
4. Stitching (Localize-and-Stitch): θ_pre + Σ γ'_i⊙δ_i per mask set, each task scored with its own head.
5. Forgetting: from the stitched model of ``--earlier`` tasks, fine-tune ``--new`` plainly and with the earlier
   masks protected; the earlier tasks' accuracy before and after.

Writes ``multitask.json``, ``multitask.md`` and ``overlap.png`` under ``--out``.

    python benchmarks/multitask.py                                    # defaults below
    python benchmarks/multitask.py --tasks sst2,trec --k 8 --epochs 2 --steps 2 --test-limit 50 --out /tmp/mt
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from app.grafting.base import BaseModel, EligibleRule, eligible_size, load_base
from app.grafting.data import TaskData, resolve_task_data
from app.grafting.evaluate import Evaluator, swapped_weights
from app.grafting.finetune import FinetuneConfig, finetune
from app.grafting.heads import Example, HeadSpec, TaskModel, Tokenization
from app.grafting.inference import accuracy, predict_logits
from app.grafting.localize import LocalizeConfig, localize
from app.grafting.overlap import mean_off_diagonal, overlap_report
from app.grafting.patch import GraftPatch, build_patch, grafted
from app.grafting.stitch import member_patch, stitch
from app.plots import overlap_heatmap

ALL_TASKS = ("sst2", "cr", "mr", "mpqa", "subj", "trec", "agnews")
SENTIMENT = ("sst2", "cr", "mr", "mpqa")
UNRELATED = ("trec", "agnews")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    csv = lambda text: [t.strip() for t in text.split(",") if t.strip()]  # noqa: E731
    parser.add_argument("--tasks", type=csv, default=list(ALL_TASKS))
    parser.add_argument("--k", type=int, default=32, help="training examples per class (LM-BFF k-shot)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--mt-epochs", type=int, default=0, help="epochs of the multi-task fine-tune (0: --epochs)")
    parser.add_argument("--lr", type=float, default=2e-2, help="SGD learning rate of every fine-tune")
    parser.add_argument("--sparsity", type=float, default=1e-2)
    parser.add_argument("--steps", type=int, default=4, help="learned-mask steps T")
    parser.add_argument(
        "--max-step",
        type=float,
        default=4.0,
        help="scale-free step: the k-th largest |ΔS| per step (larger ones clipped to it); with b = 10 an entry "
        "flips after ⌈10 / max-step⌉ steps in one direction, so T · max-step must exceed 10 for any mask to be learned",
    )
    parser.add_argument("--test-limit", type=int, default=400, help="seeded test subset per task (0: whole test set)")
    parser.add_argument("--earlier", type=csv, default=["sst2", "trec"], help="tasks learned first (forgetting)")
    parser.add_argument("--new", default="agnews", help="task learned afterwards (forgetting)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--base", default="all-minilm-l6-v2", help="packaged base (the README's figures: MiniLM)")
    parser.add_argument("--out", default="benchmarks/results/multitask")
    parser.add_argument("--data-dir", default=None)
    return parser.parse_args(argv)


def subset(examples: list[Example], limit: int, seed: int = 0) -> list[Example]:
    """A seeded sample (test files may be sorted by label, so never just the first N)."""
    if not limit or limit >= len(examples):
        return list(examples)
    return random.Random(seed).sample(examples, limit)


class Task:
    """One task's data, head, test subset and the cached test encoding."""

    def __init__(self, base: BaseModel, name: str, args: argparse.Namespace) -> None:
        self.name = name
        self.data: TaskData = resolve_task_data(name, k=args.k, seed=args.seed, data_dir=args.data_dir)
        self.spec: HeadSpec = self.data.head_spec("prompt", family=base.family)
        self.test = subset(self.data.test, args.test_limit, args.seed)
        self.tokenization = Tokenization(base.tokenizer, self.spec, family=base.family)
        self.encoded = self.tokenization.encode_many(self.test)
        self.labels = [e.label for e in self.test]

    def accuracy(self, base: BaseModel, body: Mapping[str, torch.Tensor] | None = None) -> float:
        """Test accuracy of this task's head on ``body`` (None: the base as it is now)."""
        model = TaskModel(base.encoder, self.spec, base.tokenizer)
        if body is None:
            return accuracy(predict_logits(model, self.tokenization, self.encoded, 128), self.labels)
        with swapped_weights(base.parameters, body):
            return accuracy(predict_logits(model, self.tokenization, self.encoded, 128), self.labels)


def localize_patch(
    base: BaseModel, task: Task, body: Mapping[str, torch.Tensor], args: argparse.Namespace, eligible: int
) -> GraftPatch:
    k = int(args.sparsity * eligible)
    # scale-free step whose k-th largest entry moves S by --max-step; the mask is capped at k entries
    config = LocalizeConfig(
        sparsity=args.sparsity, steps=args.steps, max_step=args.max_step, step_rank=max(1, k), budget=k, seed=args.seed
    )
    found = localize(base, body, task.spec, task.data.train, task.data.dev, config)
    return build_patch(
        base.parameters,
        body,
        found.mask,
        task=task.name,
        spec=task.spec,
        base_fingerprint=base.fingerprint,
        eligible_size=found.eligible_size,
        method="learned",
    )


def finetune_mixed(base: BaseModel, tasks: Sequence[Task], config: FinetuneConfig) -> dict[str, torch.Tensor]:
    """One encoder fine-tuned on every task at once: each batch comes from one task (each task keeps its own
    template and label words), and the batches of all tasks are shuffled together every epoch."""
    import copy

    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    encoder = copy.deepcopy(base.encoder)
    for name, param in encoder.named_parameters():
        param.requires_grad_(name.startswith("encoder.layer."))
    models = [TaskModel(encoder, t.spec, base.tokenizer) for t in tasks]
    encoded = [t.tokenization.encode_many(t.data.train) for t in tasks]
    labels = [torch.tensor([e.label for e in t.data.train]) for t in tasks]
    optimizer = torch.optim.SGD([p for p in encoder.parameters() if p.requires_grad], lr=config.lr)
    encoder.train()
    for _ in range(config.epochs):
        batches = []
        for i, rows in enumerate(encoded):
            order = list(range(len(rows)))
            rng.shuffle(order)
            batches += [(i, order[s : s + config.batch_size]) for s in range(0, len(order), config.batch_size)]
        rng.shuffle(batches)
        for i, indices in batches:
            batch = tasks[i].tokenization.collate([encoded[i][j] for j in indices])
            loss = torch.nn.functional.cross_entropy(models[i](batch), labels[i][indices])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    encoder.eval()
    return {name: p.detach().clone() for name, p in encoder.named_parameters()}


def group_overlap(report: dict[str, Any], metric: str) -> dict[str, float | None]:
    names = report["tasks"]
    sentiment = [names.index(t) for t in SENTIMENT if t in names]
    unrelated = [names.index(t) for t in UNRELATED if t in names]
    within = mean_off_diagonal(report[metric], sentiment, sentiment)
    across = [
        v
        for v in (
            mean_off_diagonal(report[metric], sentiment, unrelated),
            mean_off_diagonal(report[metric], unrelated, sentiment),
        )
        if v is not None
    ]
    return {
        "sentiment_vs_sentiment": within,
        "sentiment_vs_trec_agnews": sum(across) / len(across) if across else None,
    }


def stitched_accuracies(base: BaseModel, tasks: Sequence[Task], patches: Sequence[GraftPatch]) -> dict[str, Any]:
    stitched = stitch(base.parameters, patches)
    out: dict[str, Any] = {"summary": stitched.summary(), "accuracy": {}}
    for task, patch in zip(tasks, patches, strict=True):
        with grafted(base.parameters, member_patch(stitched, patch, task.name)):
            out["accuracy"][task.name] = task.accuracy(base)
    return out


def forgetting(
    base: BaseModel, by_name: Mapping[str, Task], patches: Mapping[str, GraftPatch], args: argparse.Namespace
) -> dict[str, Any]:
    earlier = [by_name[name] for name in args.earlier]
    new = by_name[args.new]
    stitched = stitch(base.parameters, [patches[t.name] for t in earlier])
    start = member_patch(stitched, patches[earlier[0].name], "start")
    protect = stitched.masks({n: p.shape for n, p in base.parameters.items()})
    config = FinetuneConfig(lr=args.lr, epochs=args.epochs, seed=args.seed)
    out: dict[str, Any] = {"earlier": args.earlier, "new": args.new, "protected_entries": stitched.size, "runs": {}}
    with grafted(base.parameters, start):
        out["before"] = {t.name: t.accuracy(base) for t in earlier}
        out["new_before"] = new.accuracy(base)
        start_values = {n: p.detach().clone() for n, p in base.parameters.items() if n in protect}
        for label, masks in (("plain", None), ("protect", protect)):
            tick = time.perf_counter()
            ft = finetune(base, new.spec, new.data.train, new.data.dev, config, protect=masks)
            moved = max(float((ft.body[n] - start_values[n])[m].abs().max()) for n, m in protect.items())
            out["runs"][label] = {
                "earlier_after": {t.name: t.accuracy(base, ft.body) for t in earlier},
                "new_after": new.accuracy(base, ft.body),
                "max_change_on_protected_entries": moved,
                "seconds": round(time.perf_counter() - tick, 1),
            }
            print(f"  forgetting/{label}: {json.dumps(out['runs'][label])}", flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    base = load_base(args.base)
    eligible = eligible_size(base.parameters, EligibleRule())
    tasks = [Task(base, name, args) for name in args.tasks]
    by_name = {t.name: t for t in tasks}
    config = FinetuneConfig(lr=args.lr, epochs=args.epochs, seed=args.seed)
    rows: dict[str, dict[str, Any]] = {}
    separate: dict[str, GraftPatch] = {}
    for task in tasks:
        tick = time.perf_counter()
        ft = finetune(base, task.spec, task.data.train, task.data.dev, config)
        patch = localize_patch(base, task, ft.body, args, eligible)
        report = Evaluator(base, task.spec, ft.body, task.test, batch_size=128).report(patch)
        separate[task.name] = patch
        rows[task.name] = {
            "train_examples": len(task.data.train),
            "test_examples": len(task.test),
            "acc_pre": report["acc_pre"],
            "acc_ft": report["acc_ft"],
            "acc_graft": report["acc_graft"],
            "mask_size": patch.mask_size,
            "seconds": round(time.perf_counter() - tick, 1),
        }
        print(f"[{task.name}] {json.dumps(rows[task.name])}", flush=True)
    stitched_sep = stitched_accuracies(base, tasks, [separate[t.name] for t in tasks])

    tick = time.perf_counter()
    mt_config = FinetuneConfig(lr=args.lr, epochs=args.mt_epochs or args.epochs, seed=args.seed)
    mt_body = finetune_mixed(base, tasks, mt_config)
    mt_seconds = round(time.perf_counter() - tick, 1)
    multi: dict[str, GraftPatch] = {}
    for task in tasks:
        patch = localize_patch(base, task, mt_body, args, eligible)
        multi[task.name] = patch
        with grafted(base.parameters, patch):
            rows[task.name]["mt_acc_graft"] = task.accuracy(base)
        rows[task.name]["mt_acc_ft"] = task.accuracy(base, mt_body)
        rows[task.name]["mt_mask_size"] = patch.mask_size
        print(f"[{task.name}/multi-task] {json.dumps({k: v for k, v in rows[task.name].items() if 'mt' in k})}")
    stitched_mt = stitched_accuracies(base, tasks, [multi[t.name] for t in tasks])
    for task in tasks:
        rows[task.name]["stitched"] = stitched_sep["accuracy"][task.name]
        rows[task.name]["mt_stitched"] = stitched_mt["accuracy"][task.name]

    overlap_sep = overlap_report(separate, base.parameters)
    overlap_mt = overlap_report(multi, base.parameters)
    forgot = forgetting(base, by_name, separate, args) if args.new in by_name and args.earlier else None

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = overlap_heatmap(
        [("separate fine-tunes", overlap_sep), ("one multi-task fine-tune", overlap_mt)], out / "overlap.png"
    )
    result = {
        "settings": {**vars(args), "eligible_size": eligible, "k_entries": int(args.sparsity * eligible)},
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "threads": args.threads},
        "wall_seconds": None,
        "tasks": rows,
        "multitask_finetune_seconds": mt_seconds,
        "overlap": {
            "separate": overlap_sep,
            "multitask": overlap_mt,
            "groups": {
                name: {metric: group_overlap(report, metric) for metric in ("containment", "jaccard")}
                for name, report in (("separate", overlap_sep), ("multitask", overlap_mt))
            },
        },
        "stitch": {"separate": stitched_sep["summary"], "multitask": stitched_mt["summary"]},
        "forgetting": forgot,
        "heatmap": str(png),
    }
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    (out / "multitask.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    (out / "multitask.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def _f(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        "# Multi-skill benchmark (benchmarks/multitask.py)",
        "",
        f"Base all-MiniLM-L6-v2, prompt mode, k={s['k']} per class, SGD lr={s['lr']} × {s['epochs']} epochs, "
        f"learned masks at sparsity {s['sparsity']:g} ({s['k_entries']} of {s['eligible_size']} entries), "
        f"T={s['steps']} steps of max |ΔS| {s['max_step']:g}, seed {s['seed']}; "
        f"accuracy on a seeded test subset of ≤{s['test_limit']} examples "
        f"per task; {result['machine']['threads']} CPU threads, wall {result['wall_seconds']} s.",
        "",
        "## Accuracy per task",
        "",
        "| task | test n | pre | ft | graft | stitched (7 grafts) | multi-task ft | multi-task graft | "
        "multi-task stitched |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["tasks"].items():
        lines.append(
            f"| {name} | {row['test_examples']} | {_f(row['acc_pre'])} | {_f(row['acc_ft'])} | {_f(row['acc_graft'])} "
            f"| {_f(row['stitched'])} | {_f(row['mt_acc_ft'])} | {_f(row['mt_acc_graft'])} | {_f(row['mt_stitched'])} |"
        )
    rows = result["tasks"].values()
    mean = lambda key: sum(r[key] for r in rows) / len(result["tasks"])  # noqa: E731
    lines.append(
        f"| **mean** | | {_f(mean('acc_pre'))} | {_f(mean('acc_ft'))} | {_f(mean('acc_graft'))} | "
        f"{_f(mean('stitched'))} | {_f(mean('mt_acc_ft'))} | {_f(mean('mt_acc_graft'))} | {_f(mean('mt_stitched'))} |"
    )
    lines += ["", "## Mask overlap", ""]
    for which in ("separate", "multitask"):
        report = result["overlap"][which]
        names = report["tasks"]
        lines += [f"### {which}: |γ_row ∩ γ_col| / |γ_col| (sign agreement on shared entries in brackets)", ""]
        lines.append("| | " + " | ".join(names) + " |")
        lines.append("|---" * (len(names) + 1) + "|")
        for i, name in enumerate(names):
            cells = [
                f"{_f(report['containment'][i][j], 2)} ({_f(report['sign_agreement'][i][j], 2)})"
                for j in range(len(names))
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        for metric in ("containment", "jaccard"):
            groups = result["overlap"]["groups"][which][metric]
            within, across = groups["sentiment_vs_sentiment"], groups["sentiment_vs_trec_agnews"]
            verdict = (
                "n/a"
                if within is None or across is None
                else ("sentiment pairs overlap MORE" if within > across else "sentiment pairs do NOT overlap more")
            )
            lines.append(
                f"- mean {metric}: sentiment×sentiment {_f(within)} vs sentiment×{{trec, agnews}} {_f(across)}: "
                f"{verdict}"
            )
        stitch_info = result["stitch"][which]
        lines += [
            f"- stitched union: {stitch_info['union_size']} entries, {stitch_info['shared_entries']} shared by ≥ 2 "
            f"masks (coverage {stitch_info['coverage']})",
            "",
        ]
    forgot = result["forgetting"]
    if forgot:
        lines += [
            f"## Forgetting: learn {forgot['new']} after {', '.join(forgot['earlier'])} (start: their stitched grafts, "
            f"{forgot['protected_entries']} protected entries)",
            "",
            "| task | before | after plain fine-tune | after `--protect` fine-tune |",
            "|---|---|---|---|",
        ]
        plain, protect = forgot["runs"]["plain"], forgot["runs"]["protect"]
        for name in forgot["earlier"]:
            lines.append(
                f"| {name} (earlier) | {_f(forgot['before'][name])} | {_f(plain['earlier_after'][name])} | "
                f"{_f(protect['earlier_after'][name])} |"
            )
        lines.append(
            f"| {forgot['new']} (new) | {_f(forgot['new_before'])} | {_f(plain['new_after'])} | "
            f"{_f(protect['new_after'])} |"
        )
        lines += [
            "",
            f"Largest change of a protected entry: plain {plain['max_change_on_protected_entries']:.3g}, "
            f"protect {protect['max_change_on_protected_entries']:.3g}.",
        ]
    lines += ["", f"Heatmap: `{result['heatmap']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
