"""The ``skillgraft`` command line: one sub-command per module in this package."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from app.cli import config, datasets, finetune, localize, overlap, patch_info, serve, submit, worker


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skillgraft", description="Skill localization by model grafting: fine-tune, localize, serve."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (datasets, finetune, localize, patch_info, serve, submit, worker, config, overlap):
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"skillgraft {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
