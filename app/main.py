"""The FastAPI application: assembled here, nothing else (``create_app`` is uvicorn's factory)."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from app import __version__
from app.api.auth import AuthMiddleware, KeyRing
from app.api.errors import install_error_handlers
from app.api.limits import BodyLimit, BodySizeLimitMiddleware
from app.api.openapi import install_openapi
from app.api.routes import classify, dashboard, health, info, jobs, metrics, skills, tasks, v2
from app.config import Settings, get_settings
from app.core.object_store import open_task_store
from app.core.store_sync import RedisAnnouncer, StoreSync
from app.engine.engine import EngineConfig
from app.engine.service import InferenceService, ServiceLimits
from app.grafting.base import load_base
from app.jobs.service import build_job_service, connect_redis
from app.observability import RequestObservabilityMiddleware, bind_app_state

log = logging.getLogger("skillgraft")
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def build_service(settings: Settings) -> InferenceService:
    """Load the base once and start the engine: blocking, seconds (run it off the event loop)."""
    base = load_base(settings.base_model, settings.device)
    limits = ServiceLimits(
        max_inputs_per_request=settings.max_inputs_per_request,
        max_text_chars=settings.max_text_chars,
        max_tasks_per_request=settings.max_tasks_per_request,
        max_patch_bytes=settings.max_patch_bytes,
    )
    engine_config = EngineConfig(
        max_batch_size=settings.max_batch_size,
        max_batch_wait_ms=settings.max_batch_wait_ms,
        max_queue=settings.max_queue,
        policy=settings.engine_policy,
        process=settings.engine_process,
        process_restarts=settings.engine_process_restarts,
        mixed_kernel=settings.mixed_kernel,
        base_source=settings.base_model,
    )
    # with Redis, every task change this replica makes is announced to the others (they subscribe in StoreSync)
    announce = RedisAnnouncer(connect_redis(settings.redis_url)) if settings.redis_url else None
    return InferenceService(
        base,
        open_task_store(settings),
        limits,
        engine_config,
        settings.patch_cache_bytes,
        settings.max_length,
        announce=announce,
    )


def build_store_sync(settings: Settings, service: InferenceService) -> StoreSync | None:
    """The thread that keeps this replica in step with the others: notices over Redis, re-checks of a shared
    object store. A local store without Redis has nobody else to keep in step with."""
    redis_url = settings.redis_url
    if redis_url is None and not service.store.remote:
        return None
    sync = StoreSync(
        service.store,
        service.task_changed,
        settings.store_recheck_s,
        redis_factory=(lambda: connect_redis(redis_url)) if redis_url else None,
    )
    sync.start()
    return sync


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = await anyio.to_thread.run_sync(build_service, settings)
        log.info(
            "skillgraft ready: base %s (%s) on %s, store %s",
            service.base.name,
            service.base.fingerprint[:19],
            service.device,
            service.store.location,
        )
        app.state.service = service
        store_sync = build_store_sync(settings, service)
        app.state.store_sync = store_sync
        job_service = await anyio.to_thread.run_sync(build_job_service, settings, service.base, service.store)
        app.state.jobs = job_service
        log.info("jobs run %s", "on RQ workers via Redis" if settings.redis_url else "in process")
        try:
            yield
        finally:
            app.state.service = None
            app.state.jobs = None
            if store_sync is not None:
                store_sync.stop()
            job_service.runner.close()
            await anyio.to_thread.run_sync(service.close)

    app = FastAPI(
        title="skillgraft",
        version=__version__,
        description="One pretrained transformer in memory, many tasks as sparse graft patches applied per request.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.keys = KeyRing.from_settings(settings.read_keys, settings.admin_keys)
    if not app.state.keys.enabled and settings.host not in LOOPBACK_HOSTS:
        log.warning(
            "NO API KEYS CONFIGURED and binding %s: anyone who can reach this port can upload, delete and classify. "
            "Set SKILLGRAFT_ADMIN_KEYS / SKILLGRAFT_READ_KEYS.",
            settings.host,
        )
    app.state.service = None
    app.state.jobs = None
    app.state.store_sync = None
    install_error_handlers(app)
    install_openapi(app)
    writes = frozenset({"POST", "PUT", "PATCH"})
    app.add_middleware(
        BodySizeLimitMiddleware,
        limits=[
            BodyLimit(frozenset({"POST"}), re.compile(r"/v1/tasks/?"), settings.max_upload_bytes, "max_upload_bytes"),
            BodyLimit(
                frozenset({"PUT"}), re.compile(r"/v1/tasks/[^/]+/patch"), settings.max_patch_bytes, "max_patch_bytes"
            ),
            BodyLimit(writes, re.compile(r".*"), settings.max_request_bytes, "max_request_bytes"),
        ],
    )
    # Starlette runs middlewares in reverse order of adding: request logging, then keys, then body limits, so a
    # request without the right key is refused before any limit is looked at or any body byte is read.
    app.add_middleware(AuthMiddleware, keys=app.state.keys)
    app.add_middleware(RequestObservabilityMiddleware)
    bind_app_state(app.state)
    # Routes are tried in order: the inference routes, which carry nearly every request, come first.
    for module in (classify, v2, health, info, tasks, jobs, metrics, skills, dashboard):
        app.include_router(module.router)
    return app
