"""``skillgraft worker``: run localization jobs from Redis (RQ) in this process."""

from __future__ import annotations

import argparse

from app.config import Settings
from app.observability import configure_json_logging


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("worker", help="run background localization jobs from Redis (needs REDIS_URL)")
    parser.add_argument("--redis-url", default=None, help="overrides SKILLGRAFT_REDIS_URL")
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from workers.worker import run_worker

    configure_json_logging("INFO")
    overrides = {"redis_url": args.redis_url} if args.redis_url else {}
    run_worker(Settings(**overrides), burst=args.burst)
    return 0
