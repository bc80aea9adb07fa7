"""Keeping replicas in step with the shared store: change notices over Redis pub/sub, and a periodic re-check.

Whoever changes a task (an API replica on PUT/DELETE, a job worker when it writes a patch) publishes a
:class:`TaskNotice` on :data:`TASK_CHANNEL`. Every API replica runs one :class:`StoreSync` thread that subscribes to
it and hands each notice to its service (which drops what it remembered of the task and reloads it if it was
serving it), so a change shows on every replica within a second. Pub/sub is fire-and-forget: a replica that was
disconnected misses notices. Hence the safety net: the same thread asks the store to ``sync`` (one listing,
compared with what it remembers) every ``recheck_s`` seconds and after every reconnection; and the store itself
never trusts what it saw for longer than that.

This lives in ``app.core`` so the engine side (which may not import ``app.jobs``) and the job side share the one
channel name and message format.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from app.core.store import TASK_NAME_PATTERN, TaskStore

log = logging.getLogger("skillgraft.store")
# Redis pub/sub channel of task changes (the job side has published ``{"task": name}`` here since RQ mode began).
TASK_CHANNEL = "skillgraft:tasks"
TaskEvent = Literal["written", "deleted"]


@dataclass(frozen=True)
class TaskNotice:
    """A task was (re)written or deleted; ``etag`` is its new version when known."""

    task: str
    event: TaskEvent = "written"
    etag: str | None = None

    def encode(self) -> str:
        return json.dumps({"task": self.task, "event": self.event, "etag": self.etag})

    @classmethod
    def decode(cls, raw: bytes | str) -> TaskNotice | None:
        """The notice, or None for a message that is not one (anyone may publish on a Redis channel)."""
        try:
            data = json.loads(raw)
        except (ValueError, TypeError):
            return None
        if not isinstance(data, dict):
            return None
        task, event, etag = data.get("task"), data.get("event", "written"), data.get("etag")
        if not isinstance(task, str) or not TASK_NAME_PATTERN.fullmatch(task):
            return None
        if event not in ("written", "deleted"):
            event = "written"
        return cls(task, event, etag if isinstance(etag, str) else None)


Announce = Callable[[TaskNotice], None]


class RedisAnnouncer:
    """Publishes notices on a Redis connection. A notice is a courtesy: if Redis is down it is logged and dropped,
    never failing the write it reports (the other replicas' re-check finds the change)."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis

    def __call__(self, notice: TaskNotice) -> None:
        try:
            self.redis.publish(TASK_CHANNEL, notice.encode())
        except Exception as exc:  # redis errors of every kind: the write already happened
            log.warning("could not publish the change of task %r: %s", notice.task, exc)


class StoreSync:
    """One daemon thread per API replica: Redis notices (when a Redis URL is configured) and the store's periodic
    ``sync``. ``on_change(name)`` is called for every task a notice or a re-check says changed."""

    def __init__(
        self,
        store: TaskStore,
        on_change: Callable[[str], None],
        recheck_s: float,
        redis_factory: Callable[[], Any] | None = None,
    ) -> None:
        self.store = store
        self.on_change = on_change
        self.recheck_s = max(recheck_s, 0.2)
        self.redis_factory = redis_factory
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="skillgraft-store-sync", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        pubsub = None
        next_sync = 0.0  # at once: a replica that starts later learns the store's state by listing it
        retry_at = 0.0
        while not self._stop.is_set():
            if self.redis_factory is not None and pubsub is None and time.monotonic() >= retry_at:
                pubsub = self._subscribe()
                if pubsub is None:
                    retry_at = time.monotonic() + 1.0
                else:
                    next_sync = 0.0  # notices may have been missed while unsubscribed
            if pubsub is not None:
                try:
                    message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
                except Exception as exc:  # connection lost: resubscribe, then re-check everything
                    log.warning("change notices interrupted (%s); resubscribing", exc)
                    self._close(pubsub)
                    pubsub = None
                    continue
                if message is not None and message.get("type") == "message":
                    notice = TaskNotice.decode(message.get("data"))
                    if notice is not None:
                        self._changed(notice.task)
            else:
                self._stop.wait(0.2)
            if time.monotonic() >= next_sync:
                next_sync = time.monotonic() + self.recheck_s
                self._sync()
        if pubsub is not None:
            self._close(pubsub)

    def _subscribe(self) -> Any:
        assert self.redis_factory is not None
        try:
            pubsub = self.redis_factory().pubsub()
            pubsub.subscribe(TASK_CHANNEL)
        except Exception as exc:
            log.warning("cannot subscribe to change notices yet (%s)", exc)
            return None
        return pubsub

    def _sync(self) -> None:
        try:
            changed = self.store.sync()
        except Exception:  # the thread must outlive any store failure
            log.exception("store re-check failed")
            return
        for name in changed:
            self._changed(name)

    def _changed(self, name: str) -> None:
        try:
            self.on_change(name)
        except Exception:
            log.exception("handling the change of task %r failed", name)

    @staticmethod
    def _close(pubsub: Any) -> None:
        try:
            pubsub.close()
        except Exception:
            log.debug("closing the notice subscription failed", exc_info=True)
