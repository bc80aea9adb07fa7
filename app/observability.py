"""Metrics (Prometheus) and structured logs with a request id.

* Per-request metrics and one JSON log line per request come from ``RequestObservabilityMiddleware``; the request
  id (the client's ``X-Request-ID`` if it is sane, else a new one) is returned in the same header and attached
  to every log record written while the request runs.
* Engine and cache figures are read from the service's own counters at scrape time (``ServiceCollector``), so
  the inference path carries no metrics code beyond the few observations it makes itself
  (``observe_batch``, ``observe_patch_swap``, ``observe_inputs``).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from collections import Counter as CountBy
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "X-Request-ID"
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

REGISTRY = CollectorRegistry(auto_describe=True)
HTTP_REQUESTS = Counter(
    "skillgraft_http_requests",
    "HTTP requests by route template, method and status",
    ["route", "method", "status"],
    registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "skillgraft_http_request_seconds",
    "HTTP request latency by route template and status",
    ["route", "method", "status"],
    registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
CLASSIFIED_INPUTS = Counter("skillgraft_classified_inputs", "Inputs classified, by task", ["task"], registry=REGISTRY)
BATCH_SIZE = Histogram(
    "skillgraft_batch_size",
    "Rows per engine forward pass, by execution path",
    ["path"],
    registry=REGISTRY,
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
PATCH_SWAP_SECONDS = Histogram(
    "skillgraft_patch_swap_seconds",
    "Seconds to apply or restore a patch in the live weights",
    ["phase"],
    registry=REGISTRY,
    buckets=(1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.05, 0.1),
)


def observe_inputs(task: str, count: int) -> None:
    CLASSIFIED_INPUTS.labels(task=task).inc(count)


def observe_batch(path: str, rows: int) -> None:
    BATCH_SIZE.labels(path=path).observe(rows)


def observe_patch_swap(phase: str, seconds: float) -> None:
    PATCH_SWAP_SECONDS.labels(phase=phase).observe(seconds)


class ServiceCollector(Collector):
    """Reads cache, engine and job counters from the running app at scrape time (the latest app bound)."""

    state: Any = None

    def collect(self) -> Iterable[Metric]:
        service = getattr(self.state, "service", None)
        if service is not None:
            info = service.registry.cache_info()
            yield _gauge("skillgraft_patch_cache_bytes", "Bytes of patches held in the cache", info["bytes"])
            yield _gauge("skillgraft_patch_cache_budget_bytes", "Byte budget of the patch cache", info["budget_bytes"])
            yield _gauge("skillgraft_patch_cache_tasks", "Tasks held in the patch cache", info["tasks"])
            # 1 while the task store answers (always for a local folder); 0 while a shared object store does not
            reachable = 1.0 if service.store_health().reachable else 0.0
            yield _gauge("skillgraft_store_reachable", "Whether the task store answered its last request", reachable)
            for name, help_text, value in (
                ("skillgraft_patch_cache_hits", "Patch cache hits", info.get("hits", 0)),
                (
                    "skillgraft_patch_cache_misses",
                    "Patch cache misses (patch loaded from the store)",
                    info.get("loads", 0),
                ),
                ("skillgraft_patch_cache_evictions", "Patches evicted from the cache", info.get("evictions", 0)),
            ):
                counter = CounterMetricFamily(name, help_text)
                counter.add_metric([], value)
                yield counter
            stats = service.engine.stats
            batches = CounterMetricFamily("skillgraft_engine_batches", "Engine batches by path", labels=["path"])
            batches.add_metric(["swap"], stats.swap_batches)
            batches.add_metric(["mixed"], stats.mixed_batches)
            batches.add_metric(["failed"], stats.failed_batches)
            yield batches
            busy = CounterMetricFamily(
                "skillgraft_engine_busy_seconds",
                "Seconds the inference thread spent running batches (its rate is the engine's utilisation)",
            )
            busy.add_metric([], stats.busy_seconds)
            yield busy
            restarts = CounterMetricFamily(
                "skillgraft_engine_process_restarts",
                "Times a dead engine process (SKILLGRAFT_ENGINE_PROCESS) was replaced by a new one",
            )
            restarts.add_metric([], service.engine.process_restarts)
            yield restarts
        jobs = getattr(self.state, "jobs", None)
        if jobs is not None:
            try:
                records = jobs.list(limit=1000)
            except Exception:  # the job store (Redis) may be down; the scrape must still answer
                records = []
            by_state = GaugeMetricFamily("skillgraft_jobs", "Recent jobs (last 1000) by state", labels=["state"])
            counts = CountBy(record.state.value for record in records)
            for state in ("queued", "running", "succeeded", "failed", "cancelled"):
                by_state.add_metric([state], counts.get(state, 0))
            yield by_state
            durations = GaugeMetricFamily(
                "skillgraft_job_duration_seconds",
                "Wall time of recent finished jobs by state (sum and count)",
                labels=["state", "stat"],
            )
            for state in ("succeeded", "failed", "cancelled"):
                spans = [_span(r.started_at, r.finished_at) for r in records if r.state.value == state]
                spans = [s for s in spans if s is not None]
                durations.add_metric([state, "sum"], sum(spans))
                durations.add_metric([state, "count"], len(spans))
            yield durations


SERVICE_COLLECTOR = ServiceCollector()
REGISTRY.register(SERVICE_COLLECTOR)


def bind_app_state(state: Any) -> None:
    """Point the scrape-time collector at this app's state (one app per process in production)."""
    SERVICE_COLLECTOR.state = state


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, help_text)
    gauge.add_metric([], value)
    return gauge


def _span(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def metrics_payload() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the current request id when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        for key in ("route", "method", "status", "duration_ms", "path", "client"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_json_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


access_log = logging.getLogger("skillgraft.access")


class RequestObservabilityMiddleware:
    """Request id in and out, latency and status metrics by route template, one access log line per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(REQUEST_ID_HEADER.lower().encode(), b"").decode("latin-1")
        request_id = given if _SAFE_REQUEST_ID.match(given) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (REQUEST_ID_HEADER.encode(), request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"]
            HTTP_REQUESTS.labels(route=route, method=method, status=str(status)).inc()
            HTTP_LATENCY.labels(route=route, method=method, status=str(status)).observe(elapsed)
            access_log.info(
                "%s %s %s",
                method,
                scope["path"],
                status,
                extra={"route": route, "method": method, "status": status, "duration_ms": round(elapsed * 1000, 2)},
            )
            request_id_var.reset(token)
