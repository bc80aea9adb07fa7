"""``skillgraft config``: the settings in force (from the environment), or the settings table for the docs."""

from __future__ import annotations

import argparse
import json

from app.config import Settings


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("config", help="show the settings in force, or all settings as a Markdown table")
    parser.add_argument("--markdown", action="store_true", help="print every setting with its default and meaning")
    parser.set_defaults(run=run)


def settings_table() -> str:
    rows = ["| environment variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "(packaged model)" if name == "base_model" and default is None else default
        if name == "store_dir":
            shown = "models_store/ of the checkout"
        rows.append(f"| `SKILLGRAFT_{name.upper()}` | `{shown}` | {field.description or ''} |")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    if args.markdown:
        print(settings_table())
        return 0
    current = Settings().model_dump(mode="json")
    for secret in ("read_keys", "admin_keys"):
        current[secret] = [f"…{key[-4:]}" for key in current[secret]]  # never print whole keys
    print(json.dumps(current, indent=2, sort_keys=True))
    return 0
