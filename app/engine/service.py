"""The serving service: "classify these texts with these tasks", plus task management, below any protocol.

The REST and KServe v2 routes call the same methods. It validates limits, resolves tasks through the registry
and tokenises (never in the inference thread, never under the weight lock), then awaits the engine. A small
request whose tasks are all cached is prepared on the event loop itself; a cache miss, a remote store or much
text goes to a worker thread, since those may block. Nothing here imports FastAPI.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import torch

from app.core.errors import InvalidInput, LimitExceeded, NotReady, TaskNotFound
from app.core.store import LocalTaskStore, StoredPatch, StoreHealth, TaskStore
from app.core.store_sync import TaskNotice
from app.engine.engine import Engine, EngineConfig
from app.engine.registry import EngineTask, TaskRegistry
from app.grafting.base import BaseModel, EligibleRule, eligible_size
from app.grafting.heads import Encoded, Example
from app.grafting.patch import PatchError

# A request of at most this many rows (inputs × tasks) and this much text (summed over inputs, times tasks) is
# tokenised on the event loop; a bigger one in a worker thread.
INLINE_PREPARE_MAX_ROWS = 4
INLINE_PREPARE_MAX_CHARS = 2048


def softmax(logits: list[float]) -> list[float]:
    """Probabilities in double precision. Plain floats, not torch: a request's few labels cost microseconds this
    way, against 50-95 us per torch call on a tiny tensor (measured on the event loop under load), time that
    holds the GIL the inference thread needs."""
    top = max(logits)
    exps = [math.exp(value - top) for value in logits]
    total = math.fsum(exps)
    return [value / total for value in exps]


@dataclass(frozen=True)
class TextInput:
    text: str
    text_pair: str | None = None


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    probabilities: dict[str, float] | None = None
    # the input was longer than max_length tokens and was cut to fit
    truncated: bool = False


@dataclass(frozen=True)
class TaskPredictions:
    task: str
    predictions: list[Prediction]


@dataclass(frozen=True)
class ServiceLimits:
    max_inputs_per_request: int = 256
    max_text_chars: int = 10_000
    max_tasks_per_request: int = 16
    max_patch_bytes: int = 256 * 2**20


@dataclass(frozen=True)
class TaskInfo:
    """What the API shows of a stored task: the patch's own metadata plus store facts and cache state."""

    name: str
    etag: str
    size_bytes: int
    modified_at: str
    cached: bool
    metadata: dict[str, Any]
    record: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None


class InferenceService:
    """Owns the engine and the registry for one base model; ``close`` stops the engine."""

    def __init__(
        self,
        base: BaseModel,
        store: TaskStore,
        limits: ServiceLimits,
        engine_config: EngineConfig,
        cache_bytes: int,
        max_length: int,
        announce: Callable[[TaskNotice], None] | None = None,
    ) -> None:
        self.base = base
        # the default eligible set's size, for /v1/info (the base never changes while it is served)
        self.eligible_size = eligible_size(base.parameters, EligibleRule())
        self.store = store
        # tells the other replicas about a task this one changed (Redis pub/sub when configured)
        self.announce = announce
        self.limits = limits
        self.engine_config = engine_config
        self.max_length = max_length
        executor = None
        if engine_config.process:
            from app.engine.remote import RemoteExecutor

            executor = RemoteExecutor(engine_config, base)
        self.engine = Engine(base, engine_config, executor=executor)
        self.registry = TaskRegistry(store, base, self.engine.weights, cache_bytes, max_length)
        self.device = str(self.engine.device)

    @classmethod
    def for_directory(
        cls,
        base: BaseModel,
        store_dir: str | Path,
        limits: ServiceLimits | None = None,
        engine_config: EngineConfig | None = None,
        cache_bytes: int = 256 * 2**20,
        max_length: int = 128,
    ) -> InferenceService:
        return cls(
            base,
            LocalTaskStore(store_dir),
            limits or ServiceLimits(),
            engine_config or EngineConfig(),
            cache_bytes,
            max_length,
        )

    @property
    def ready(self) -> bool:
        return self.engine.running

    def close(self) -> None:
        self.engine.close()

    # -- classification ----------------------------------------------------------------------------------------

    async def classify(
        self, tasks: Sequence[str], inputs: Sequence[TextInput], return_probabilities: bool = False
    ) -> list[TaskPredictions]:
        """Classify every input with every task: one engine submission for the whole request."""
        if not self.ready:
            raise NotReady("the inference engine is not running")
        self.check_request(tasks, inputs)
        # a big request is prepared in the thread without looking at the cache here first
        cached = self.cached_tasks(tasks) if self.small_request(tasks, inputs) else []
        if cached and all(cached):
            # a thread hop costs more than tokenising a sentence: each hands the GIL to and fro with the inference
            # thread (http_bench, 32 clients, MiniLM: see the README's HTTP table)
            resolved = [task for task in cached if task is not None]
            prepared = self.encode_rows(resolved, inputs), resolved
        else:
            prepared = await anyio.to_thread.run_sync(self.prepare, list(tasks), list(inputs), cached)
        rows, resolved = prepared
        logits = await asyncio.wrap_future(self.engine.submit(rows))
        return self.decode(resolved, len(inputs), logits, return_probabilities, [enc.truncated for _, enc in rows])

    def check_request(self, tasks: Sequence[str], inputs: Sequence[TextInput]) -> None:
        limits = self.limits
        if not tasks:
            raise InvalidInput("name at least one task")
        if len(tasks) > limits.max_tasks_per_request:
            raise LimitExceeded(f"{len(tasks)} tasks exceed max_tasks_per_request={limits.max_tasks_per_request}")
        if len(set(tasks)) != len(tasks):
            raise InvalidInput("tasks must be distinct")
        if not inputs:
            raise InvalidInput("inputs must hold at least one text")
        if len(inputs) > limits.max_inputs_per_request:
            raise LimitExceeded(f"{len(inputs)} inputs exceed max_inputs_per_request={limits.max_inputs_per_request}")
        for i, item in enumerate(inputs):
            longest = max(len(item.text), len(item.text_pair or ""))
            if longest > limits.max_text_chars:
                raise LimitExceeded(
                    f"inputs[{i}] has {longest} characters, over max_text_chars={limits.max_text_chars}"
                )

    def prepare(
        self, tasks: list[str], inputs: list[TextInput], cached: Sequence[EngineTask | None] = ()
    ) -> tuple[list[tuple[EngineTask, Encoded]], list[EngineTask]]:
        """Resolve tasks (loading on a miss) and tokenise: the blocking half of a request, run in a worker thread.
        ``cached`` holds what ``cached_tasks`` already found: those are not looked up, nor counted, again."""
        known = list(cached) or [None] * len(tasks)
        resolved = [task or self.registry.get(name) for name, task in zip(tasks, known, strict=True)]
        return self.encode_rows(resolved, inputs), resolved

    def cached_tasks(self, tasks: Sequence[str]) -> list[EngineTask | None]:
        """Each task from the cache, where that cannot block: a local store's ``stat`` is a syscall, a remote one
        may be a request to the bucket (then nothing is looked up here, all None)."""
        if self.store.remote:
            return [None] * len(tasks)
        return [self.registry.lookup_cached(name) for name in tasks]

    @staticmethod
    def small_request(tasks: Sequence[str], inputs: Sequence[TextInput]) -> bool:
        """Few enough rows and little enough text to tokenise on the event loop (each row has a fixed cost of
        40-250 us by head and base, on top of its text)."""
        if len(inputs) * len(tasks) > INLINE_PREPARE_MAX_ROWS:
            return False
        chars = sum(len(item.text) + len(item.text_pair or "") for item in inputs)
        return chars * len(tasks) <= INLINE_PREPARE_MAX_CHARS

    @staticmethod
    def encode_rows(resolved: Sequence[EngineTask], inputs: Sequence[TextInput]) -> list[tuple[EngineTask, Encoded]]:
        examples = [Example(item.text, -1, item.text_pair) for item in inputs]
        rows: list[tuple[EngineTask, Encoded]] = []
        for task in resolved:
            rows.extend((task, encoded) for encoded in task.tokenization.encode_many(examples))
        return rows

    @staticmethod
    def decode(
        tasks: list[EngineTask],
        n_inputs: int,
        logits: list[torch.Tensor],
        return_probabilities: bool,
        truncated: Sequence[bool] | None = None,
    ) -> list[TaskPredictions]:
        """Logits (task-major, as ``prepare`` ordered the rows) to predictions; ``truncated`` in the same order."""
        out = []
        for t, task in enumerate(tasks):
            labels = task.spec.labels
            predictions = []
            for i, row_logits in enumerate(logits[t * n_inputs : (t + 1) * n_inputs]):
                row = softmax(row_logits.tolist())
                best = max(range(len(row)), key=row.__getitem__)
                shown = {label: p for label, p in zip(labels, row, strict=True)} if return_probabilities else None
                cut = bool(truncated[t * n_inputs + i]) if truncated is not None else False
                predictions.append(Prediction(labels[best], row[best], shown, cut))
            out.append(TaskPredictions(task.name, predictions))
        return out

    # -- tasks -------------------------------------------------------------------------------------------------

    def list_tasks(self) -> list[TaskInfo]:
        infos = []
        for name in self.store.list_names():
            try:
                infos.append(self.describe_task(name))
            except TaskNotFound:  # deleted between listing and reading
                continue
        return infos

    def describe_task(self, name: str) -> TaskInfo:
        stored = self.store.stat(name)
        if stored is None:
            raise TaskNotFound(f"task {name!r} not found")
        return self._info(stored)

    def put_patch(self, name: str, data: bytes, source: str = "upload") -> tuple[TaskInfo, bool]:
        if len(data) > self.limits.max_patch_bytes:
            raise LimitExceeded(f"patch of {len(data)} bytes exceeds max_patch_bytes={self.limits.max_patch_bytes}")
        stored, created = self.registry.put(name, data, source=source)
        self._announce(TaskNotice(name, "written", stored.etag))
        return self._info(stored), created

    def delete_task(self, name: str) -> None:
        self.registry.delete(name)
        self._announce(TaskNotice(name, "deleted"))

    def task_changed(self, name: str) -> None:
        """A notice (or a re-check) says another process changed ``name``: bring this replica in step."""
        self.registry.refresh(name)

    def store_health(self) -> StoreHealth:
        return self.store.health()

    def patch_file(self, name: str) -> tuple[StoredPatch, Path]:
        """The task's current version and a local file holding its patch (downloaded once from a remote store)."""
        stored = self.store.stat(name)
        if stored is None:
            raise TaskNotFound(f"task {name!r} not found")
        return stored, self.store.fetch(stored)

    @contextmanager
    def pristine_parameters(self) -> Iterator[Mapping[str, torch.Tensor]]:
        """The base's parameters with no patch written in, kept so for the block (it holds the engine's weight
        lock: no batch runs meanwhile), for readers of θ_pre such as the overlap report."""
        with self.engine.weights_lock:
            yield self.base.parameters

    def info(self) -> dict[str, Any]:
        return {
            "base": {
                "name": self.base.name,
                "family": self.base.family,
                "model_type": self.base.model_type,
                "num_parameters": self.base.num_parameters,
                "eligible_size": self.eligible_size,
                "hidden_size": self.base.hidden_size,
                "fingerprint": self.base.fingerprint,
            },
            "device": self.device,
            "limits": {
                "max_batch_size": self.engine_config.max_batch_size,
                "max_batch_wait_ms": self.engine_config.max_batch_wait_ms,
                "max_queue": self.engine_config.max_queue,
                "max_inputs_per_request": self.limits.max_inputs_per_request,
                "max_tasks_per_request": self.limits.max_tasks_per_request,
                "max_text_chars": self.limits.max_text_chars,
                "max_length": self.max_length,
                "max_patch_bytes": self.limits.max_patch_bytes,
                "patch_cache_bytes": self.registry.cache_bytes,
            },
            "engine": {
                "policy": self.engine_config.policy,
                "process": self.engine_config.process,
                "process_restarts": self.engine.process_restarts,
                "queued": self.engine.queued,
                **vars(self.engine.stats),
            },
            "cache": self.registry.cache_info(),
        }

    def _announce(self, notice: TaskNotice) -> None:
        if self.announce is not None:
            self.announce(notice)

    def _info(self, stored: StoredPatch) -> TaskInfo:
        problem = None
        try:
            # Floats such as NaN metrics would break JSON: show them as null.
            metadata = _finite(self.store.read_header(stored.name))
        except PatchError as exc:  # a file another process wrote badly: list it, say why it cannot serve
            metadata, problem = {}, str(exc)
        return TaskInfo(
            name=stored.name,
            etag=stored.etag,
            size_bytes=stored.size,
            modified_at=stored.modified_at,
            cached=self.registry.is_cached(stored.name),
            metadata=metadata,
            record=self.store.read_record(stored.name),
            problem=problem,
        )


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
