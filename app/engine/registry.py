"""The task registry: names in the store → validated, engine-ready tasks, behind a byte-bounded LRU cache.

Policy:

* **Load once.** A task is parsed and validated at most once per stored version (etag), even when many requests
  ask for it at the same moment: the first caller loads it, the others wait on the same future. Loading happens
  in the caller's thread, never in the inference thread, so a slow or bad patch cannot stall the engine, and a
  patch that fails validation never reaches it.
* **Fresh.** Every lookup compares the store's etag of the task with the cached one, so a patch replaced or added
  by another process (a job worker, another replica) is served on the next request, without a restart; a deleted
  task is unknown at once. The registry never learns which store it reads: a local folder answers ``stat`` from
  the file (inode, mtime, size), an object store from what it last saw (kept fresh by change notices and
  re-checks, see ``app.core.store_sync``), and ``fetch`` hands over a local file either way. ``refresh`` is how a
  change notice reaches the cache: a deleted task is dropped, a replaced one that was being served is reloaded
  before the next request asks for it.
* **Bounded.** Cached tasks are kept in least-recently-used order; after each insertion the oldest are evicted
  until the total of their tensor bytes fits ``cache_bytes``. A batch already holding an evicted task finishes with
  it (the reference keeps it alive). A task larger than the whole budget is served but not kept.
* **Remembered failures.** A stored patch that fails validation is remembered per etag, so requests for it fail
  fast (``TaskUnusable``) until the file changes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from app.core.errors import TaskNotFound, TaskUnusable
from app.core.store import StoredPatch, TaskStore
from app.engine.mixed import DeltaTargets
from app.engine.weights import BaseWeights
from app.grafting.base import BaseModel
from app.grafting.heads import HeadSpec, Tokenization, label_word_ids
from app.grafting.patch import BaseMismatchError, GraftPatch, PatchError, load_patch, validate_for_base


@dataclass(eq=False)
class EngineTask:
    """One task as the engine runs it: all tensors on the engine's device, entries packed into few tensors.

    Entries of all touched parameters are concatenated, ordered by mixed-path slot (so a batch plan needs no
    sort), as global indices into :class:`BaseWeights`' index space; a task costs a handful of tensor objects
    whatever the number of parameters it touches.
    """

    name: str
    etag: str
    spec: HeadSpec
    tokenization: Tokenization  # shared by tasks with the same head spec
    params: tuple[str, ...]
    indices: torch.Tensor  # global indices (parameter offset + flat index)
    # Fine-tuned values: the swap path writes them in (bit-exact); the mixed path subtracts the base at the same
    # indices per batch (the base is pristine then), so no delta copy is kept in memory.
    values: torch.Tensor
    slots: torch.Tensor  # int16 slot of each entry in DeltaTargets (mixed path)
    slot_counts: torch.Tensor | None  # entries per slot (mixed path); None when not mixable
    label_ids: torch.Tensor | None = None
    head: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def mixable(self) -> bool:
        return self.slot_counts is not None

    @property
    def num_entries(self) -> int:
        return int(self.indices.numel())

    @property
    def nbytes(self) -> int:
        # label_ids are shared per head spec, like the tokenization: not counted per task
        tensors = [self.indices, self.values, self.slots, *self.head.values()]
        if self.slot_counts is not None:
            tensors.append(self.slot_counts)
        return sum(t.numel() * t.element_size() for t in tensors)

    def mixed_entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        assert self.slot_counts is not None, f"task {self.name} is not mixable"
        return self.slots, self.indices, self.values, self.slot_counts


class _VersionGone(Exception):
    """The stored version being loaded vanished (replaced or deleted meanwhile): look the task up again."""


class TaskRegistry:
    """Tasks by name over a :class:`TaskStore`, cached for the engine (see the module docstring for the policy).

    Tasks with the same head spec share one tokenization and label-id tensor (a thousand tasks over one template
    cost one), kept in a small table beside the cache.
    """

    def __init__(
        self,
        store: TaskStore,
        base: BaseModel,
        weights: BaseWeights,
        cache_bytes: int,
        max_length: int,
    ) -> None:
        self.store = store
        self.base = base
        self.weights = weights
        self.targets = DeltaTargets.of(base.encoder, weights)
        self.cache_bytes = cache_bytes
        self.max_length = max_length
        self.device = next(base.encoder.parameters()).device
        self._parameters = base.parameters
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, EngineTask] = OrderedDict()
        self._cached_bytes = 0
        self._loading: dict[tuple[str, str], Future[EngineTask]] = {}
        self._failures: dict[str, tuple[str, str]] = {}
        self._heads: dict[HeadSpec, tuple[Tokenization, torch.Tensor | None]] = {}
        self.stats = {"hits": 0, "loads": 0, "evictions": 0}

    # -- lookups -----------------------------------------------------------------------------------------------

    def lookup_cached(self, name: str) -> EngineTask | None:
        """The cached task if it is still the stored version; cheap (one ``stat``: a file's, or what an object
        store last saw, which asks the bucket only once that is older than its re-check interval)."""
        stored = self.store.stat(name)
        with self._lock:
            task = self._cache.get(name)
            if stored is None or task is None or task.etag != stored.etag:
                return None
            self._cache.move_to_end(name)
            self.stats["hits"] += 1
            return task

    def get(self, name: str) -> EngineTask:
        """The current version of a task, loading and validating it if needed (blocking: call from a thread)."""
        try:
            return self._get(name)
        except _VersionGone:
            # the version ``stat`` named was replaced before its bytes were read: ask the store again, once
            self.store.invalidate(name)
            try:
                return self._get(name)
            except _VersionGone as exc:
                raise TaskNotFound(f"task {name!r} not found") from exc

    def _get(self, name: str) -> EngineTask:
        stored = self.store.stat(name)
        if stored is None:
            self._forget(name)
            raise TaskNotFound(f"task {name!r} not found")
        key = (name, stored.etag)
        with self._lock:
            task = self._cache.get(name)
            if task is not None and task.etag == stored.etag:
                self._cache.move_to_end(name)
                self.stats["hits"] += 1
                return task
            failure = self._failures.get(name)
            if failure is not None and failure[0] == stored.etag:
                raise TaskUnusable(failure[1])
            pending = self._loading.get(key)
            owner = pending is None
            if pending is None:
                pending = self._loading[key] = Future()
        if not owner:
            return pending.result()
        try:
            task = self._load(stored)
        except BaseException as exc:
            error = exc
            if isinstance(exc, PatchError):
                message = f"task {name!r} has an unusable patch: {exc}"
                error = TaskUnusable(message)
                with self._lock:
                    self._failures[name] = (stored.etag, message)
            elif isinstance(exc, FileNotFoundError):
                error = _VersionGone(name)
            with self._lock:
                self._loading.pop(key, None)
            pending.set_exception(error)
            if error is exc:
                raise
            raise error from exc
        with self._lock:
            self._loading.pop(key, None)
            self._failures.pop(name, None)
            self.stats["loads"] += 1
            self._insert(task)
        pending.set_result(task)
        return task

    def refresh(self, name: str) -> None:
        """A notice said ``name`` changed elsewhere: drop it if it is gone, reload it now if it was being served
        (so the next request finds the new version ready), leave it alone otherwise."""
        self.store.invalidate(name)
        stored = self.store.stat(name)
        with self._lock:
            cached = self._cache.get(name)
        if stored is None:
            self._forget(name)
        elif cached is not None and cached.etag != stored.etag:
            self.get(name)

    def is_cached(self, name: str) -> bool:
        with self._lock:
            return name in self._cache

    def cache_info(self) -> dict[str, int]:
        with self._lock:
            return {
                "tasks": len(self._cache),
                "bytes": self._cached_bytes,
                "budget_bytes": self.cache_bytes,
                **self.stats,
            }

    # -- changes -----------------------------------------------------------------------------------------------

    def put(self, name: str, data: bytes, source: str = "upload") -> tuple[StoredPatch, bool]:
        """Validate ``data`` as a patch for this base and store it under ``name``; returns (stored, created).

        Raises ``PatchError`` (malformed) or ``BaseMismatchError`` (another base) and leaves the store unchanged.
        """
        created = self.store.stat(name) is None
        stored = self.store.write_patch(name, data, self.check_file, source=source)
        self._forget(name)
        return stored, created

    def delete(self, name: str) -> None:
        removed = self.store.delete(name)
        self._forget(name)
        if not removed:
            raise TaskNotFound(f"task {name!r} not found")

    def check_file(self, path: Path) -> GraftPatch:
        """Everything a patch must pass before it may be stored or served (format, base, head)."""
        return validate_for_base(load_patch(path), self.base, self.max_length)

    # -- internals ---------------------------------------------------------------------------------------------

    def _forget(self, name: str) -> None:
        with self._lock:
            task = self._cache.pop(name, None)
            if task is not None:
                self._cached_bytes -= task.nbytes
            self._failures.pop(name, None)

    def _insert(self, task: EngineTask) -> None:
        old = self._cache.pop(task.name, None)
        if old is not None:
            self._cached_bytes -= old.nbytes
        if task.nbytes > self.cache_bytes:
            return
        self._cache[task.name] = task
        self._cached_bytes += task.nbytes
        while self._cached_bytes > self.cache_bytes and self._cache:
            _, evicted = self._cache.popitem(last=False)
            self._cached_bytes -= evicted.nbytes
            self.stats["evictions"] += 1

    def _head_of(self, spec: HeadSpec) -> tuple[Tokenization, torch.Tensor | None]:
        with self._lock:
            shared = self._heads.get(spec)
        if shared is None:
            label_ids = None
            if spec.mode == "prompt":
                words = spec.label_words or ()
                label_ids = torch.tensor(label_word_ids(self.base.tokenizer, words, self.base.family)).to(self.device)
            shared = (Tokenization(self.base.tokenizer, spec, self.max_length, self.base.family), label_ids)
            with self._lock:
                if len(self._heads) >= 4096:  # many distinct specs: start over rather than grow without bound
                    self._heads.clear()
                shared = self._heads.setdefault(spec, shared)
        return shared

    def _load(self, stored: StoredPatch) -> EngineTask:
        patch = self.check_file(self.store.fetch(stored))
        tokenization, label_ids = self._head_of(patch.spec)
        slot_of = {name: self.targets.slot(name) for name in patch.entries}
        mixable = all(slot is not None for slot in slot_of.values())
        # Slot order lets a batch plan group entries without sorting; each parameter is one slot, so its
        # entries stay contiguous.
        names = sorted(patch.entries, key=lambda n: (slot_of[n] if slot_of[n] is not None else -1, n))
        index_dtype = self.weights.index_dtype
        dtypes = {patch.entries[name][1].dtype for name in names}
        # One dtype in practice; float64 holds any narrower float exactly if a base mixes dtypes.
        packed_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float64
        if names:
            indices = torch.cat([patch.entries[n][0] + self.weights.offsets[n] for n in names]).to(index_dtype)
            values = torch.cat([patch.entries[n][1].to(packed_dtype) for n in names])
            slots = torch.cat(
                [torch.full((patch.entries[n][0].numel(),), slot_of[n] or 0, dtype=torch.int16) for n in names]
            )
        else:
            indices = torch.zeros(0, dtype=index_dtype)
            values = torch.zeros(0, dtype=next(iter(self._parameters.values())).dtype)
            slots = torch.zeros(0, dtype=torch.int16)
        slot_counts = torch.bincount(slots.to(torch.int64), minlength=len(self.targets)) if mixable else None
        indices, values, slots = indices.to(self.device), values.to(self.device), slots.to(self.device)
        return EngineTask(
            name=stored.name,
            etag=stored.etag,
            spec=patch.spec,
            tokenization=tokenization,
            params=tuple(names),
            indices=indices,
            values=values,
            slots=slots,
            slot_counts=None if slot_counts is None else slot_counts.to(self.device),
            label_ids=label_ids,
            head={k: v.to(self.device) for k, v in patch.head.items()},
        )


__all__ = ["BaseMismatchError", "EngineTask", "PatchError", "TaskRegistry"]
