"""Options and helpers several sub-commands share."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from tqdm import tqdm

from app.grafting.data import TaskData, resolve_task_data
from app.grafting.heads import CLASSIFIER_HEADS
from app.grafting.packaged_bases import DEFAULT_BASE


def add_base_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base-model",
        default=os.environ.get("SKILLGRAFT_BASE_MODEL"),
        help="packaged base (smollm2-135m-instruct, all-minilm-l6-v2), model folder or GGUF file "
        f"(default: $SKILLGRAFT_BASE_MODEL, else {DEFAULT_BASE})",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])


def add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data (a named dataset, or your own JSONL/CSV files)")
    group.add_argument("--dataset", help="named dataset, see `skillgraft datasets`")
    group.add_argument("--train", dest="train_file", help="JSONL/CSV with text, optional text_pair, label")
    group.add_argument("--dev", dest="dev_file", help="optional dev file (else 10%% of --train)")
    group.add_argument("--test", dest="test_file", help="optional test file")
    group.add_argument("--k", type=int, default=16, help="examples per class for k-shot sampling (0 = full pool)")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--data-dir", default=None, help="folder of the named datasets (default ../shared/data)")


def add_head_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("task head")
    group.add_argument("--mode", choices=["prompt", "classifier"], default="prompt")
    group.add_argument("--template", help="prompt template with {text}, optional {text_pair}, and {mask}")
    group.add_argument("--label-words", help="comma-separated label words, one per label, in label order")
    group.add_argument("--classifier-kind", default=None, choices=sorted(CLASSIFIER_HEADS))


def task_data_from(args: argparse.Namespace) -> TaskData:
    return resolve_task_data(
        dataset=args.dataset,
        train_file=args.train_file,
        dev_file=args.dev_file,
        test_file=args.test_file,
        k=None if args.k == 0 else args.k,
        seed=args.seed,
        data_dir=args.data_dir,
    )


class ProgressBar:
    """A tqdm bar driven by the ``progress`` callbacks of fine-tuning and localization."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.bar: tqdm | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        if self.bar is None:
            self.bar = tqdm(total=event.get("total"), desc=self.description, file=sys.stderr, leave=False)
        self.bar.n = int(event.get("step", 0))
        shown = {
            k: round(v, 4) if isinstance(v, float) else v
            for k, v in event.items()
            if k not in ("step", "total", "phase")
        }
        self.bar.set_postfix(shown, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))
