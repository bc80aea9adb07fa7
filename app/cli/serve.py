"""``skillgraft serve``: run the REST server (uvicorn) on the embedded defaults or the given options.

Options override the ``SKILLGRAFT_*`` environment; settings are validated before the server starts, so a bad
value fails at once with a message naming it.
"""

from __future__ import annotations

import argparse

from pydantic import ValidationError


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("serve", help="run the REST inference server")
    parser.add_argument("--host", default=None, help="bind address (default 127.0.0.1, SKILLGRAFT_HOST)")
    parser.add_argument("--port", type=int, default=None, help="port (default 8000, SKILLGRAFT_PORT)")
    parser.add_argument("--base-model", default=None, help="local encoder folder (default: packaged base)")
    parser.add_argument("--store-dir", default=None, help="task store folder (default models_store/ of the checkout)")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"])
    parser.add_argument("--max-batch-size", type=int, default=None)
    parser.add_argument("--max-batch-wait-ms", type=float, default=None)
    parser.add_argument("--engine-policy", default=None, choices=["auto", "swap", "mixed"])
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from app.config import Settings
    from app.main import create_app
    from app.observability import configure_json_logging

    overrides = {
        key: value
        for key, value in {
            "host": args.host,
            "port": args.port,
            "base_model": args.base_model,
            "store_dir": args.store_dir,
            "device": args.device,
            "max_batch_size": args.max_batch_size,
            "max_batch_wait_ms": args.max_batch_wait_ms,
            "engine_policy": args.engine_policy,
        }.items()
        if value is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"SKILLGRAFT_{'_'.join(map(str, e['loc'])).upper() or 'SETTINGS'}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"invalid settings: {problems}") from exc
    # One JSON line per log record (our access log carries the request id), instead of uvicorn's text logs.
    configure_json_logging(args.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        log_level=args.log_level,
    )
    return 0
