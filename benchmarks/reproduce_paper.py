"""Reproduce the paper's grafting measurements on the packaged base (a benchmark, not a test).

For every task × head mode × k × seed: SGD fine-tune, then for every sparsity and method (learned, topk, random,
dataless) localize, build the patch and evaluate it on a test subset: relative gain, graft/ft ratio, agreement,
ECE, mask layout, wall time. Then per method: s95 (smallest mask fraction with relative gain ≥ 0.95), ECE at
s95, OOD accuracy at s95 (SST-2 → MR, CR, Amazon domains; MPQA → SST-2), and the cost ratio of a learned
localization against steps × one forward+backward over the step's examples, measured in the same run.

Writes ``results.json`` (every measured row), ``results.md`` (tables + target checks) and ``relative_gain.png``.

    python benchmarks/reproduce_paper.py                     # the full protocol (hours on 2 CPU cores)
    python benchmarks/reproduce_paper.py --tasks sst2,cr --modes prompt --seeds 0 --sparsities 1e-3,1e-2 \\
        --steps 6 --test-limit 500 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from app.grafting.base import BaseModel, load_base
from app.grafting.data import TaskData, load_dataset, resolve_task_data
from app.grafting.evaluate import Evaluator
from app.grafting.finetune import FinetuneConfig, finetune
from app.grafting.heads import Example, HeadSpec
from app.grafting.localize import METHODS, LocalizeConfig, localize, time_forward_backward
from app.grafting.patch import build_patch

ALL_TASKS = ("sst2", "cr", "mr", "mpqa", "subj", "trec", "agnews")
OOD_TARGETS = {
    "sst2": ("mr", "cr", "amazon-books", "amazon-dvd", "amazon-electronics", "amazon-kitchen"),
    "mpqa": ("sst2",),
}
S95_GAIN = 0.95


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    csv = lambda text: [t.strip() for t in text.split(",") if t.strip()]  # noqa: E731
    parser.add_argument("--tasks", type=csv, default=list(ALL_TASKS))
    parser.add_argument("--modes", type=csv, default=["prompt", "classifier"])
    parser.add_argument("--k", type=int, default=64, help="examples per class")
    parser.add_argument("--large-k", type=int, default=512, help="the larger setting (0: skip)")
    parser.add_argument("--large-tasks", type=csv, default=["sst2"], help="tasks that also run --large-k")
    parser.add_argument("--seeds", type=lambda t: [int(x) for x in csv(t)], default=[0, 1, 2])
    parser.add_argument(
        "--sparsities", type=lambda t: [float(x) for x in csv(t)], default=[1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    )
    parser.add_argument("--methods", type=csv, default=list(METHODS))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr-prompt", type=float, default=2e-2)
    parser.add_argument("--lr-classifier", type=float, default=5e-2)
    parser.add_argument("--steps", type=int, default=10, help="learned-mask steps T")
    parser.add_argument("--bias", type=float, default=10.0)
    parser.add_argument("--max-step", type=float, default=None, help="scale-free step (None: η = --lr-mask)")
    parser.add_argument("--step-rank", type=float, default=1.0, help="with --max-step: scale set by rank factor·k")
    parser.add_argument("--lr-mask", type=float, default=1e7)
    parser.add_argument("--l1", type=float, default=0.0)
    parser.add_argument("--budget-factor", type=float, default=1.0, help="learned-mask size cap = factor·k (0: none)")
    parser.add_argument("--examples-per-step", type=int, default=1024)
    parser.add_argument("--score-every", type=int, default=1)
    parser.add_argument("--test-limit", type=int, default=0, help="seeded test subset size (0: whole test set)")
    parser.add_argument("--ood-limit", type=int, default=500, help="seeded subset size per OOD set (0: whole)")
    parser.add_argument("--no-ood", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument(
        "--from-json",
        nargs="+",
        default=None,
        help="run nothing: merge these results.json files (e.g. runs split by mode) into one report in --out",
    )
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}")
    return args


def subset(examples: list[Example], limit: int, seed: int = 0) -> list[Example]:
    """A seeded sample (test files may be sorted by label, so never just the first N)."""
    if not limit or limit >= len(examples):
        return list(examples)
    return random.Random(seed).sample(examples, limit)


def run_checkpoint(
    base: BaseModel, args: argparse.Namespace, task: str, mode: str, k: int, seed: int, rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """Fine-tune one checkpoint, localize at every sparsity with every method, evaluate in and out of domain."""
    data: TaskData = resolve_task_data(task, k=k, seed=seed, data_dir=args.data_dir)
    spec: HeadSpec = data.head_spec(mode, classifier_kind="bert-pooler")
    lr = args.lr_prompt if mode == "prompt" else args.lr_classifier
    tick = time.perf_counter()
    ft = finetune(base, spec, data.train, data.dev, FinetuneConfig(lr=lr, epochs=args.epochs, seed=seed))
    finetune_seconds = time.perf_counter() - tick
    test = subset(data.test, args.test_limit)
    evaluator = Evaluator(base, spec, ft.body, test, ft.head, head_seed=seed)
    reference = evaluator.reference()
    step_examples = data.train[: args.examples_per_step]
    base_config = LocalizeConfig(
        steps=args.steps,
        bias=args.bias,
        lr=args.lr_mask,
        max_step=args.max_step,
        l1=args.l1,
        examples_per_step=args.examples_per_step,
        score_every=args.score_every,
        seed=seed,
    )
    forward_backward = time_forward_backward(base, spec, step_examples, base_config, ft.head)
    key = {"task": task, "mode": mode, "k": k, "seed": seed}
    info = {
        **key,
        "finetune": {**ft.training_record(), "seconds": round(finetune_seconds, 2)},
        "reference": reference,
        "forward_backward_seconds": forward_backward,
    }
    print(f"[{task}/{mode}/k={k}/seed={seed}] ft {json.dumps(reference)} fb {forward_backward:.2f}s", flush=True)
    patches: dict[tuple[str, float], Any] = {}
    eligible = sum(p.numel() for n, p in base.parameters.items() if n.startswith("encoder.layer."))  # default E
    for sparsity in args.sparsities:
        for method in args.methods:
            config = replace(base_config, method=method, sparsity=sparsity)
            k_size = math.floor(sparsity * eligible)
            if method == "learned":
                config = replace(config, step_rank=max(1, math.floor(args.step_rank * k_size)))
                if args.budget_factor:
                    config = replace(config, budget=math.floor(args.budget_factor * k_size))
            tick = time.perf_counter()
            result = localize(base, ft.body, spec, data.train, data.dev, config, ft.head)
            seconds = time.perf_counter() - tick
            patch = build_patch(
                base.parameters,
                ft.body,
                result.mask,
                task=task,
                spec=spec,
                base_fingerprint=base.fingerprint,
                head=ft.head,
                eligible_size=result.eligible_size,
                method=method,
            )
            patches[(method, sparsity)] = patch
            report = evaluator.report(patch)
            row = {
                **key,
                "method": method,
                "sparsity": sparsity,
                "mask_size": result.size,
                "mask_fraction": result.sparsity,
                "seconds": round(seconds, 3),
                **{k2: v for k2, v in report.items() if k2 != "mask"},
                "per_layer": report["mask"]["per_layer"],
                "per_module_type": report["mask"]["per_module_type"],
            }
            if method == "learned":
                row["best_step"] = result.best_step
                row["timings"] = result.timings
                row["rescored_steps"] = sum(1 for h in result.history if h.get("rescored"))
                row["cost_ratio"] = seconds / (args.steps * forward_backward) if args.steps else None
            rows.append(row)
            print(
                f"  s={sparsity:g} {method:8s} size={result.size:>8d} acc={report['acc_graft']:.3f} "
                f"rg={_fmt(report['relative_gain'])} {seconds:.1f}s",
                flush=True,
            )
    if not args.no_ood and task in OOD_TARGETS:
        info["ood"] = run_ood(base, args, spec, ft, task, patches, rows, key)
    return info


def run_ood(
    base: BaseModel,
    args: argparse.Namespace,
    spec: HeadSpec,
    ft: Any,
    task: str,
    patches: dict[tuple[str, float], Any],
    rows: list[dict[str, Any]],
    key: dict[str, Any],
) -> list[dict[str, Any]]:
    """OOD accuracy of θ_ft and of each method's graft at its s95 (else its largest sparsity) for this checkpoint."""
    mine = [r for r in rows if all(r[k] == v for k, v in key.items())]
    chosen: dict[str, float] = {}
    for method in args.methods:
        ordered = sorted((r for r in mine if r["method"] == method), key=lambda r: r["mask_fraction"])
        hit = next((r for r in ordered if (r["relative_gain"] or -1) >= S95_GAIN), None)
        chosen[method] = (hit or ordered[-1])["sparsity"]
    out = []
    for target in OOD_TARGETS[task]:
        examples = subset(load_dataset(target, args.data_dir).test, args.ood_limit)
        evaluator = Evaluator(base, spec, ft.body, examples, ft.head, head_seed=key["seed"])
        reference = evaluator.reference()
        for method, sparsity in chosen.items():
            report = evaluator.report(patches[(method, sparsity)])
            out.append(
                {
                    **key,
                    "target": target,
                    "method": method,
                    "sparsity": sparsity,
                    "acc_pre": reference["acc_pre"],
                    "acc_ft": reference["acc_ft"],
                    "acc_graft": report["acc_graft"],
                    "ece_ft": reference["ece_ft"],
                    "ece_graft": report["ece_graft"],
                }
            )
        print(
            f"  OOD {target}: ft {reference['acc_ft']:.3f} "
            + " ".join(f"{o['method']}@{o['sparsity']:g}={o['acc_graft']:.3f}" for o in out if o["target"] == target),
            flush=True,
        )
    return out


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return sum(present) / len(present) if present else None


def summarise(rows: list[dict[str, Any]], runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Seed-averaged curves, s95 per task/mode/k/method, and every target of the issue, met or not."""
    groups: dict[tuple[str, str, int], dict[str, dict[float, dict[str, Any]]]] = {}
    for row in rows:
        group = groups.setdefault((row["task"], row["mode"], row["k"]), {})
        cell = group.setdefault(row["method"], {}).setdefault(row["sparsity"], {"rows": []})
        cell["rows"].append(row)
    curves: list[dict[str, Any]] = []
    s95: dict[str, dict[str, Any]] = {}
    for (task, mode, k), methods in sorted(groups.items()):
        for method, cells in methods.items():
            points = []
            for sparsity, cell in sorted(cells.items()):
                rs = cell["rows"]
                points.append(
                    {
                        "sparsity": sparsity,
                        "mask_fraction": _mean([r["mask_fraction"] for r in rs]),
                        "relative_gain": _mean([r["relative_gain"] for r in rs]),
                        "gap_closed_from_body_head": _mean([r.get("gap_closed_from_body_head") for r in rs]),
                        "acc_graft": _mean([r["acc_graft"] for r in rs]),
                        "ratio": _mean([r["ratio"] for r in rs]),
                        "agreement_with_ft": _mean([r["agreement_with_ft"] for r in rs]),
                        "ece_graft": _mean([r["ece_graft"] for r in rs]),
                        "ece_ft": _mean([r["ece_ft"] for r in rs]),
                        "seconds": _mean([r["seconds"] for r in rs]),
                        "cost_ratio": _mean([r.get("cost_ratio") for r in rs]),
                        "seeds": len(rs),
                    }
                )
            curves.append({"task": task, "mode": mode, "k": k, "method": method, "points": points})
            gained = all(r["acc_ft"] > r["acc_pre"] for cell in cells.values() for r in cell["rows"])
            # without a fine-tuning gain over θ_pre the relative gain is meaningless: no s95 then
            hit = next((p for p in points if (p["relative_gain"] or -1) >= S95_GAIN), None) if gained else None
            s95[f"{task}/{mode}/k={k}/{method}"] = {
                "s95": hit["mask_fraction"] if hit else None,
                "ece_graft_at_s95": hit["ece_graft"] if hit else None,
                "ece_ft": hit["ece_ft"] if hit else None,
            }
    targets = check_targets(curves, s95, runs, args)
    return {"curves": curves, "s95": s95, "targets": targets}


def _point(curves: list[dict[str, Any]], task: str, mode: str, k: int, method: str, sparsity: float) -> dict | None:
    for curve in curves:
        if (curve["task"], curve["mode"], curve["k"], curve["method"]) == (task, mode, k, method):
            return next((p for p in curve["points"] if p["sparsity"] == sparsity), None)
    return None


def check_targets(
    curves: list[dict[str, Any]], s95: dict[str, dict[str, Any]], runs: list[dict[str, Any]], args: argparse.Namespace
) -> list[dict[str, Any]]:
    k = args.k
    out: list[dict[str, Any]] = []
    tasks = args.tasks
    for mode in args.modes:
        wins, detail = 0, []
        for task in tasks:
            learned = s95.get(f"{task}/{mode}/k={k}/learned", {}).get("s95")
            topk = s95.get(f"{task}/{mode}/k={k}/topk", {}).get("s95")
            win = learned is not None and (topk is None or learned * 3 <= topk)
            wins += win
            detail.append(f"{task}: learned {_fmt(learned, 6)} vs topk {_fmt(topk, 6)}")
        out.append(
            {
                "target": f"{mode}: learned s95 ≥3× smaller than topk's on ≥5 of 7 tasks",
                "met": wins >= 5,
                "figure": f"{wins}/{len(tasks)} tasks ({'; '.join(detail)})",
            }
        )
        random_gains = [
            p["relative_gain"]
            for c in curves
            if c["method"] == "random" and c["mode"] == mode
            for p in c["points"]
            if p["relative_gain"] is not None
        ]
        if random_gains:
            top = max(random_gains)
            out.append(
                {
                    "target": f"{mode}: random masks stay near zero gain",
                    "met": top <= 0.1,
                    "figure": f"largest random relative gain {top:.3f} (at any sparsity ≤ {max(args.sparsities):g})",
                }
            )
    if "classifier" in args.modes:
        if 1e-4 in args.sparsities:
            kept = []
            for task in tasks:
                p = _point(curves, task, "classifier", k, "learned", 1e-4)
                if p and p["ratio"] is not None:
                    kept.append((task, p["ratio"]))
            hits = sum(r >= 0.95 for _, r in kept)
            out.append(
                {
                    "target": "classifier @1e-4: learned graft keeps ≥95% of fine-tuned accuracy on ≥5/7 tasks",
                    "met": hits >= 5,
                    "figure": f"{hits}/{len(kept)}: " + ", ".join(f"{t} {r:.3f}" for t, r in kept),
                }
            )
        for sparsity in (1e-4, 1e-3):
            if sparsity not in args.sparsities:
                continue
            learned = [_point(curves, t, "classifier", k, "learned", sparsity) for t in tasks]
            topk = [_point(curves, t, "classifier", k, "topk", sparsity) for t in tasks]
            gl = _mean([p["gap_closed_from_body_head"] for p in learned if p])
            gt = _mean([p["gap_closed_from_body_head"] for p in topk if p])
            target = "learned closes more of the body+head → ft gap than topk"
            met = gl is not None and gt is not None and gl > gt
            if sparsity == 1e-3:
                target += ", and ≥75%"
                met = met and gl is not None and gl >= 0.75
            out.append(
                {
                    "target": f"classifier @{sparsity:g}: {target}",
                    "met": met,
                    "figure": f"mean gap closed: learned {_fmt(gl)}, topk {_fmt(gt)}",
                }
            )
    for method in args.methods:
        pairs = [
            (v["ece_graft_at_s95"], v["ece_ft"])
            for key, v in s95.items()
            if key.endswith("/" + method) and v["ece_graft_at_s95"] is not None
        ]
        if pairs:
            graft, ft = _mean([a for a, _ in pairs]), _mean([b for _, b in pairs])
            out.append(
                {
                    "target": f"{method}: graft ECE ≤ ft ECE on average at s95",
                    "met": graft is not None and ft is not None and graft <= ft,
                    "figure": f"ECE graft {_fmt(graft, 4)} vs ft {_fmt(ft, 4)} over {len(pairs)} task/mode cells",
                }
            )
        else:
            out.append(
                {
                    "target": f"{method}: graft ECE ≤ ft ECE on average at s95",
                    "met": False,
                    "figure": "no cell reached relative gain 0.95",
                }
            )
    ood = [o for run in runs for o in run.get("ood", [])]
    for method in args.methods:
        mine = [o for o in ood if o["method"] == method]
        if mine:
            graft, ft = _mean([o["acc_graft"] for o in mine]), _mean([o["acc_ft"] for o in mine])
            out.append(
                {
                    "target": f"{method}: graft OOD accuracy ≥ ft on average (at s95, else largest sparsity)",
                    "met": graft is not None and ft is not None and graft >= ft,
                    "figure": f"OOD acc graft {_fmt(graft, 4)} vs ft {_fmt(ft, 4)} over {len(mine)} task/target pairs",
                }
            )
    ratios = [p["cost_ratio"] for c in curves if c["method"] == "learned" for p in c["points"] if p["cost_ratio"]]
    if ratios:
        out.append(
            {
                "target": "cost: learned wall time ≤ 1.3 × steps × one forward+backward",
                "met": max(ratios) <= 1.3,
                "figure": f"ratio mean {sum(ratios) / len(ratios):.2f}, max {max(ratios):.2f} over {len(ratios)} runs",
            }
        )
    return out


def write_markdown(path: Path, summary: dict[str, Any], runs: list[dict[str, Any]], args: argparse.Namespace) -> None:
    lines = [
        "# Skill localization on all-MiniLM-L6-v2 (benchmarks/reproduce_paper.py)",
        "",
        "Command: `python " + " ".join(sys.argv) + "`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. Test subset: "
        + (f"{args.test_limit} seeded examples per task" if args.test_limit else "full test sets")
        + ". Relative gain = (acc_graft − acc_pre)/(acc_ft − acc_pre); classifier-mode θ_pre uses the head "
        "fine-tuning started from. Mask fraction = mask size / |E| (encoder layers).",
        "",
        "## Fine-tuned checkpoints",
        "",
        "| task | mode | k | seed | acc_pre | acc_ft | body+ft head | ECE ft | ft seconds | 1 fwd+bwd (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        ref = run["reference"]
        lines.append(
            f"| {run['task']} | {run['mode']} | {run['k']} | {run['seed']} "
            f"| {ref['acc_pre']:.3f} | {ref['acc_ft']:.3f} "
            f"| {_fmt(ref.get('acc_body_head'), 3)} | {ref['ece_ft']:.4f} | {run['finetune']['seconds']:.0f} "
            f"| {run['forward_backward_seconds']:.2f} |"
        )
    lines += ["", "## Relative gain by nominal sparsity (seed mean; mask fraction in brackets)", ""]
    sparsities = sorted(args.sparsities)
    lines.append("| task | mode | k | method | " + " | ".join(f"{s:g}" for s in sparsities) + " | s95 |")
    lines.append("|---" * (5 + len(sparsities)) + "|")
    for curve in summary["curves"]:
        by = {p["sparsity"]: p for p in curve["points"]}
        cells = []
        for s in sparsities:
            p = by.get(s)
            cells.append("" if p is None else f"{_fmt(p['relative_gain'])} ({p['mask_fraction']:.1e})")
        s95 = summary["s95"][f"{curve['task']}/{curve['mode']}/k={curve['k']}/{curve['method']}"]["s95"]
        lines.append(
            f"| {curve['task']} | {curve['mode']} | {curve['k']} | {curve['method']} | "
            + " | ".join(cells)
            + f" | {_fmt(s95, 6) if s95 is not None else 'not reached'} |"
        )
    classifier = [c for c in summary["curves"] if c["mode"] == "classifier"]
    if classifier:
        lines += ["", "## Classifier mode: accuracy ratio graft/ft and gap closed from body+ft head", ""]
        lines.append("| task | k | method | " + " | ".join(f"{s:g}" for s in sparsities) + " |")
        lines.append("|---" * (3 + len(sparsities)) + "|")
        for curve in classifier:
            by = {p["sparsity"]: p for p in curve["points"]}
            cells = [
                "" if by.get(s) is None else f"{_fmt(by[s]['ratio'], 3)} / {_fmt(by[s]['gap_closed_from_body_head'])}"
                for s in sparsities
            ]
            lines.append(f"| {curve['task']} | {curve['k']} | {curve['method']} | " + " | ".join(cells) + " |")
    learned = [c for c in summary["curves"] if c["method"] == "learned"]
    if learned:
        lines += ["", "## Learned-mask cost (seed mean)", ""]
        lines.append("| task | mode | k | " + " | ".join(f"{s:g}: seconds / ratio" for s in sparsities) + " |")
        lines.append("|---" * (3 + len(sparsities)) + "|")
        for curve in learned:
            by = {p["sparsity"]: p for p in curve["points"]}
            cells = [
                "" if by.get(s) is None else f"{by[s]['seconds']:.1f} / {_fmt(by[s]['cost_ratio'])}" for s in sparsities
            ]
            lines.append(f"| {curve['task']} | {curve['mode']} | {curve['k']} | " + " | ".join(cells) + " |")
    ood = [o for run in runs for o in run.get("ood", [])]
    if ood:
        lines += ["", "## Out of distribution (graft at each method's s95, else its largest sparsity)", ""]
        lines.append("| source | mode | seed | target | acc_pre | acc_ft | method@sparsity: acc_graft |")
        lines.append("|---|---|---|---|---|---|---|")
        seen: dict[tuple, list[dict[str, Any]]] = {}
        for o in ood:
            seen.setdefault((o["task"], o["mode"], o["seed"], o["target"]), []).append(o)
        for (task, mode, seed, target), items in seen.items():
            cells = ", ".join(f"{o['method']}@{o['sparsity']:g}: {o['acc_graft']:.3f}" for o in items)
            lines.append(
                f"| {task} | {mode} | {seed} | {target} | {items[0]['acc_pre']:.3f} "
                f"| {items[0]['acc_ft']:.3f} | {cells} |"
            )
    lines += ["", "## Targets of issue #3", "", "| target | met | figure |", "|---|---|---|"]
    for t in summary["targets"]:
        lines.append(f"| {t['target']} | {'yes' if t['met'] else 'no'} | {t['figure']} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(c["task"], c["mode"], c["k"]) for c in summary["curves"]})
    if not panels:
        return
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False, dpi=90)
    for ax, (task, mode, k) in zip(axes.flat, panels, strict=False):
        for curve in summary["curves"]:
            if (curve["task"], curve["mode"], curve["k"]) != (task, mode, k):
                continue
            pts = [p for p in curve["points"] if p["relative_gain"] is not None and p["mask_fraction"]]
            ax.plot(
                [p["mask_fraction"] for p in pts], [p["relative_gain"] for p in pts], marker="o", label=curve["method"]
            )
        ax.axhline(S95_GAIN, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_title(f"{task} / {mode} / k={k}", fontsize=9)
        ax.set_xlabel("mask fraction of |E|", fontsize=8)
        ax.set_ylabel("relative gain", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def merge(args: argparse.Namespace) -> int:
    """Re-summarise earlier runs together; the grid (tasks, modes, sparsities, methods) is the union of theirs."""
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    for file in args.from_json:
        payload = json.loads(Path(file).read_text())
        rows += payload["rows"]
        runs += payload["runs"]
        for name in ("tasks", "modes", "sparsities", "methods"):
            merged = list(getattr(args, name)) if file != args.from_json[0] else []
            merged += [v for v in payload["args"][name] if v not in merged]
            setattr(args, name, merged)
        args.k, args.test_limit = payload["args"]["k"], payload["args"]["test_limit"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows, runs, args)
    sources = [str(f) for f in args.from_json]
    (out / "results.json").write_text(
        json.dumps({"args": vars(args), "merged_from": sources, "runs": runs, "rows": rows, **summary}, indent=1)
    )
    write_markdown(out / "results.md", summary, runs, args)
    write_plot(out / "relative_gain.png", summary)
    print(f"merged {len(sources)} result files into {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return merge(args)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base = load_base()
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    settings = [(task, mode, args.k) for task in args.tasks for mode in args.modes]
    if args.large_k:
        settings += [(task, mode, args.large_k) for task in args.large_tasks for mode in args.modes]
    for task, mode, k in settings:
        for seed in args.seeds:
            runs.append(run_checkpoint(base, args, task, mode, k, seed, rows))
            summary = summarise(rows, runs, args)
            payload = {
                "args": vars(args),
                "seconds": round(time.perf_counter() - started, 1),
                "runs": runs,
                "rows": rows,
                **summary,
            }
            (out / "results.json").write_text(json.dumps(payload, indent=1, default=str))
            write_markdown(out / "results.md", summary, runs, args)
            write_plot(out / "relative_gain.png", summary)
    print(f"done in {time.perf_counter() - started:.0f}s; wrote {out}/results.json, results.md, relative_gain.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
