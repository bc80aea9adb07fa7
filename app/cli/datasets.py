"""``skillgraft datasets``: list the named datasets and their default prompts."""

from __future__ import annotations

import argparse

from app.grafting.data import REGISTRY


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("datasets", help="list the named datasets")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    for name, info in sorted(REGISTRY.items()):
        print(f"{name:20s} {len(info.labels)} labels  {info.description}")
        print(f"{'':20s}   encoder prompt {info.template!r} → {', '.join(info.label_words)}")
        print(f"{'':20s}   decoder prompt {info.decoder_template!r} → {', '.join(info.decoder_label_words)}")
    return 0
