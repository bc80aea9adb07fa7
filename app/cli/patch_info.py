"""``skillgraft patch-info``: print a patch's metadata after validating it against the base."""

from __future__ import annotations

import argparse

from app.cli.common import add_base_options, print_json
from app.grafting.base import load_base
from app.grafting.patch import load_patch, validate_for_base


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("patch-info", help="show and validate a graft patch file")
    add_base_options(parser)
    parser.add_argument("patch", help="patch .safetensors file")
    parser.add_argument("--no-validate", action="store_true", help="only parse, do not load the base")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    patch = load_patch(args.patch)
    if not args.no_validate:
        base = load_base(args.base_model, args.device)
        validate_for_base(patch, base)
    print_json({**patch.metadata(), "bytes": patch.nbytes, "parameters_touched": len(patch.entries)})
    return 0
