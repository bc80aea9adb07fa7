"""Where job records live: JSON files under the store directory (embedded default) or Redis (scale-out).

Both implement the same small interface so the API, the runners and the job function never care which is used.
Finished states are final: an update that would move a job out of succeeded/failed/cancelled is ignored, so a
late progress report from a cancelled job cannot bring it back.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Protocol

from app.core.files import atomic_write
from app.jobs.models import JobRecord, JobState, utc_now


class JobStore(Protocol):
    def create(self, record: JobRecord) -> bool:
        """Store a new record; False (and nothing written) when the id exists."""

    def get(self, job_id: str) -> JobRecord | None: ...

    def update(self, job_id: str, **fields: Any) -> JobRecord | None:
        """Apply field changes (``progress`` may be a partial dict); ignored once the job is finished."""

    def list(self, state: JobState | None = None, limit: int = 50) -> list[JobRecord]: ...

    def delete(self, job_id: str) -> None: ...


def _merge(record: JobRecord, fields: dict[str, Any]) -> JobRecord | None:
    new_state = fields.get("state")
    # A failed job may be queued again (RQ retry, or the same upload resubmitted); nothing else leaves a final state.
    requeue = record.state == JobState.failed and new_state == JobState.queued
    if record.state.finished and new_state is not None and JobState(new_state) != record.state and not requeue:
        return None
    if record.state.finished and new_state is None and "progress" in fields:
        return None
    data = record.model_dump()
    progress = fields.pop("progress", None)
    if progress is not None:
        data["progress"] = {**data["progress"], **progress, "updated_at": utc_now()}
    timings = fields.pop("timings", None)
    if timings is not None:
        data["timings"] = {**data["timings"], **timings}
    data.update(fields)
    data["updated_at"] = utc_now()
    return JobRecord.model_validate(data)


class FileJobStore:
    """One JSON file per job in ``<store>/jobs``; writes are temp file + rename, guarded by a process lock."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def _path(self, job_id: str) -> Path:
        if not job_id.isalnum():
            raise ValueError(f"invalid job id {job_id!r}")
        return self.root / f"{job_id}.json"

    def _write(self, record: JobRecord) -> None:
        atomic_write(self._path(record.id), lambda tmp: tmp.write_text(record.model_dump_json()))

    def create(self, record: JobRecord) -> bool:
        with self._lock:
            if self._path(record.id).exists():
                return False
            self._write(record)
            return True

    def get(self, job_id: str) -> JobRecord | None:
        try:
            return JobRecord.model_validate_json(self._path(job_id).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def update(self, job_id: str, **fields: Any) -> JobRecord | None:
        with self._lock:
            record = self.get(job_id)
            if record is None:
                return None
            merged = _merge(record, fields)
            if merged is None:
                return record
            self._write(merged)
            return merged

    def list(self, state: JobState | None = None, limit: int = 50) -> list[JobRecord]:
        records = [r for p in self.root.glob("*.json") if (r := self.get(p.stem)) is not None]
        records = [r for r in records if state is None or r.state == state]
        return sorted(records, key=lambda r: r.created_at, reverse=True)[:limit]

    def delete(self, job_id: str) -> None:
        self._path(job_id).unlink(missing_ok=True)


class RedisJobStore:
    """Records as JSON strings under ``skillgraft:job:<id>``, indexed by creation time in a sorted set.

    Updates are read-modify-write inside WATCH/MULTI so progress reports from a worker and a cancel from an API
    replica cannot overwrite each other.
    """

    prefix = "skillgraft:job:"
    index = "skillgraft:jobs"

    def __init__(self, redis: Any) -> None:
        self.redis = redis

    def create(self, record: JobRecord) -> bool:
        created = self.redis.set(self.prefix + record.id, record.model_dump_json(), nx=True)
        if created:
            self.redis.zadd(self.index, {record.id: _timestamp(record.created_at)})
        return bool(created)

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.redis.get(self.prefix + job_id)
        return None if raw is None else JobRecord.model_validate_json(raw)

    def update(self, job_id: str, **fields: Any) -> JobRecord | None:
        from redis.exceptions import WatchError

        key = self.prefix + job_id
        while True:
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        return None
                    record = JobRecord.model_validate_json(raw)
                    merged = _merge(record, dict(fields))
                    if merged is None:
                        return record
                    pipe.multi()
                    pipe.set(key, merged.model_dump_json())
                    pipe.execute()
                    return merged
                except WatchError:
                    continue

    def list(self, state: JobState | None = None, limit: int = 50) -> list[JobRecord]:
        ids = self.redis.zrevrange(self.index, 0, max(limit * 4, 200))
        records = []
        for raw_id in ids:
            record = self.get(raw_id.decode() if isinstance(raw_id, bytes) else raw_id)
            if record is not None and (state is None or record.state == state):
                records.append(record)
            if len(records) >= limit:
                break
        return records

    def delete(self, job_id: str) -> None:
        self.redis.delete(self.prefix + job_id)
        self.redis.zrem(self.index, job_id)


def _timestamp(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()
