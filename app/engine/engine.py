"""The inference engine: one thread owns the base weights and runs dynamically batched forward passes.

Requests hand in rows (a task plus one encoded input, tokenised by the caller outside the weight lock); the
inference thread gathers them into batches of at most ``max_batch_size`` rows, waiting at most ``max_batch_wait_ms``
after the oldest row arrived, and runs each batch one of two ways:

* **swap** (bit-exact): the batch's task patch is scattered into the weights, the forward runs, and the saved
  originals are written back in ``finally`` — the base is restored even when the forward raises.
* **mixed**: one forward over rows of many tasks with the base weights untouched; each row's sparse delta is added
  to the outputs of the layers it touches (``app.engine.mixed``). Exact up to float rounding.

Policy ``auto`` (the default) prefers a swap batch when the oldest row's task has enough queued rows to fill most
of a batch or at least ``swap_min_rows`` of them, and otherwise a mixed batch of the oldest rows; a mixed batch
whose delta work would exceed ``mixed_max_entries`` (dense patches), or rows of tasks that touch parameters
outside Linear/LayerNorm modules, run as per-task swaps.
The queue is bounded (``max_queue`` rows): a full queue refuses new work with ``Overloaded`` instead of growing.
With ``EngineConfig.process`` the batches are run by a child process (``app.engine.remote``) instead of this one;
the queue and the policy stay here.
"""

from __future__ import annotations

import itertools
import logging
import operator
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from app.core.errors import InferenceFailed, NotReady, Overloaded
from app.engine import kernel
from app.engine.mixed import DeltaHooks, DeltaTargets, Plan, build_plan
from app.engine.registry import EngineTask
from app.engine.weights import BaseWeights
from app.grafting.base import BaseModel
from app.grafting.heads import Batch, Encoded, collate, encoder_hidden, head_logits
from app.observability import observe_batch, observe_inputs, observe_patch_swap

log = logging.getLogger(__name__)

Policy = Literal["auto", "swap", "mixed"]


@dataclass(frozen=True)
class EngineConfig:
    """Batching knobs, passed explicitly (the engine never reads global settings)."""

    max_batch_size: int = 32
    max_batch_wait_ms: float = 5.0
    max_queue: int = 4096
    policy: Policy = "auto"
    # Σ over the batch's rows of their task's entry count above which a mixed batch costs more than swaps.
    mixed_max_entries: int = 1 << 20
    # auto: take a single-task swap batch when that task's queued rows fill at least this share of a batch...
    swap_fill: float = 0.75
    # ...or number at least this many: on a CPU a forward's fixed cost is small, so a few rows of one task run
    # cheaper swapped than mixed (serve_bench, 10 tasks: swap 0.97–1.02 of the bare base, mixed 0.87–1.00, on
    # MiniLM and SmolLM2). On a GPU, where small batches waste the device, raise it (CUDA not measured).
    swap_min_rows: int = 4
    # Run the forward passes in a child process with its own copy of the base (``base_source``, loaded there):
    # its own GIL, so a busy event loop in this process does not stall them (app.engine.remote).
    process: bool = False
    base_source: str | None = None
    # a child process that died is replaced by the next batch: at most this many attempts (a failed start counts)
    # within app.engine.remote.RESTART_WINDOW_S (5 minutes); then the engine stops running for good
    process_restarts: int = 3
    # build the mixed path's compiled kernel in the background (app.engine.kernel); false: torch operators only
    mixed_kernel: bool = True


class BatchExecutor(Protocol):
    """Runs the batches the inference thread takes somewhere else (app.engine.remote: a child process). ``run``
    returns the rows' logits and what the batch added to the counters named in ``EXECUTED_COUNTERS``."""

    # times the executor replaced a worker that died
    restarts: int

    @property
    def alive(self) -> bool: ...

    def run(
        self, rows: Sequence[tuple[EngineTask, Encoded]], observer: Observer
    ) -> tuple[list[torch.Tensor], dict[str, int]]: ...

    def close(self) -> None: ...


class Observer:
    """Where the engine reports batches, inputs and patch swaps: the Prometheus metrics, unless a child process's
    engine records them to send back (app.engine.remote)."""

    def batch(self, mode: str, rows: int) -> None:
        observe_batch(mode, rows)

    def inputs(self, task: str, count: int) -> None:
        observe_inputs(task, count)

    def patch_swap(self, phase: str, seconds: float) -> None:
        observe_patch_swap(phase, seconds)


class _Ticket:
    """The future of one ``submit`` call, completed when its last row is done (one future per request, not
    per row, keeps a large request cheap)."""

    def __init__(self, size: int) -> None:
        self.future: Future[list[torch.Tensor]] = Future()
        self.results: list[torch.Tensor | None] = [None] * size
        self.remaining = size

    def set_row(self, slot: int, logits: torch.Tensor) -> None:
        self.results[slot] = logits
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(self.results)  # type: ignore[arg-type]

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


@dataclass
class _Row:
    task: EngineTask
    encoded: Encoded
    ticket: _Ticket
    slot: int
    arrived: float


# the counters an engine that runs batches elsewhere adds up from the executor's batches (failures it counts itself)
EXECUTED_COUNTERS = ("batches", "rows", "swap_batches", "mixed_batches")


@dataclass
class EngineStats:
    batches: int = 0
    rows: int = 0
    swap_batches: int = 0
    mixed_batches: int = 0
    failed_batches: int = 0
    # wall time inside batches: its rate against the clock is the inference thread's utilisation
    busy_seconds: float = 0.0


class Engine:
    """The single writer of the base weights (see the module docstring for the batching policy).

    ``weights.lock`` is held while a patch is swapped in; the registry takes it to read pristine base values.
    """

    def __init__(
        self,
        base: BaseModel,
        config: EngineConfig,
        weights: BaseWeights | None = None,
        observer: Observer | None = None,
        executor: BatchExecutor | None = None,
    ) -> None:
        self.base = base
        self.config = config
        self.observer = observer or Observer()
        # Serving is inference: dropout off, whatever another user of this base left switched on.
        base.encoder.eval()
        self.weights = weights or BaseWeights.of(base.encoder)
        self.targets = DeltaTargets.of(base.encoder, self.weights)
        self.device = next(base.encoder.parameters()).device
        self.stats = EngineStats()
        self._hooks = DeltaHooks(self.targets, use_kernel=config.mixed_kernel)
        self._last_plan: tuple[list[EngineTask], Plan] | None = None
        self._queue: deque[_Row] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._pad_id = int(base.tokenizer.pad_token_id or 0)
        self._uses_token_types = "token_type_ids" in base.tokenizer.model_input_names
        if config.process and executor is None:
            raise ValueError("EngineConfig.process needs the child process's executor (app.engine.remote)")
        self._executor = executor
        if config.mixed_kernel and config.policy != "swap" and executor is None and self.device.type == "cpu":
            kernel.start_build()  # the mixed path's fused kernel, once it is compiled (app.engine.kernel)
        self._thread = threading.Thread(target=self._loop, name="skillgraft-inference", daemon=True)
        self._thread.start()

    # -- public ------------------------------------------------------------------------------------------------

    @property
    def weights_lock(self) -> threading.Lock:
        """The lock over the base weights (``weights.lock``), for callers that read pristine base values."""
        return self.weights.lock

    @property
    def running(self) -> bool:
        alive = self._executor is None or self._executor.alive
        return alive and self._thread.is_alive() and not self._stopping

    @property
    def process_restarts(self) -> int:
        """Times a dead engine process was replaced (0 without one)."""
        return 0 if self._executor is None else self._executor.restarts

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def submit(self, rows: Sequence[tuple[EngineTask, Encoded]]) -> Future[list[torch.Tensor]]:
        """Queue rows; the future yields one float32 CPU logits vector per row, in order."""
        ticket = _Ticket(len(rows))
        if not rows:
            ticket.future.set_result([])
            return ticket.future
        now = time.monotonic()
        with self._cond:
            if self._stopping:
                raise NotReady("the engine is shutting down")
            if len(self._queue) + len(rows) > self.config.max_queue:
                raise Overloaded(
                    f"the batcher queue is full ({len(self._queue)} of max_queue={self.config.max_queue} inputs "
                    "waiting); retry later"
                )
            self._queue.extend(_Row(task, enc, ticket, i, now) for i, (task, enc) in enumerate(rows))
            self._cond.notify()
        return ticket.future

    def run(self, rows: Sequence[tuple[EngineTask, Encoded]], timeout: float | None = None) -> list[torch.Tensor]:
        """Blocking ``submit`` (benchmarks, CLI)."""
        return self.submit(rows).result(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Finish queued rows, stop the thread and remove the hooks."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)
        self._hooks.close()
        if self._executor is not None:
            self._executor.close()

    def execute(self, rows: Sequence[tuple[EngineTask, Encoded]]) -> list[torch.Tensor]:
        """Run ``rows`` as one batch in the calling thread, by the batch policy (a child process's executor)."""
        ticket = _Ticket(len(rows))
        now = time.monotonic()
        self._run_batch([_Row(task, enc, ticket, i, now) for i, (task, enc) in enumerate(rows)])
        return ticket.future.result()

    # -- the inference thread ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        config = self.config
        wait_s = config.max_batch_wait_ms / 1000.0
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                deadline = self._queue[0].arrived + wait_s
                while len(self._queue) < config.max_batch_size and not self._stopping:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                batch = self._take_batch()
            started = time.perf_counter()
            self._run_batch(batch)
            self.stats.busy_seconds += time.perf_counter() - started

    def _take_batch(self) -> list[_Row]:
        """Choose the next batch's rows (caller holds the condition's lock)."""
        limit = self.config.max_batch_size
        queue = self._queue
        head_task = queue[0].task
        if self.config.policy != "mixed":
            # Look a bounded way down the queue: a deep backlog must not make batch selection O(queue).
            window = itertools.islice(queue, self.config.max_batch_size * 16)
            same = [row for row in window if row.task is head_task][:limit]
            fifo = min(limit, len(queue))
            if (
                self.config.policy == "swap"
                or len(same) == fifo
                or len(same) >= self.config.swap_fill * fifo
                or len(same) >= self.config.swap_min_rows
            ):
                taken = {id(row) for row in same}
                self._queue = deque(row for row in queue if id(row) not in taken)
                return same
        return [queue.popleft() for _ in range(min(limit, len(queue)))]

    def _run_batch(self, rows: list[_Row]) -> None:
        # Rows of a request that already failed (another of its batches raised) are not worth a forward pass.
        rows = [row for row in rows if not row.ticket.future.done()]
        if not rows:
            return
        if self._executor is not None:
            self._run_elsewhere(rows)
            return
        groups: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(id(row.task), []).append(i)
        policy = self.config.policy
        try:
            if policy == "swap" or (policy == "auto" and len(groups) == 1):
                for members in groups.values():
                    self._run_swap([rows[i] for i in members])
                return
            mixable = [members for members in groups.values() if rows[members[0]].task.mixable]
            work = sum(rows[members[0]].task.num_entries * len(members) for members in mixable)
            if work > self.config.mixed_max_entries:
                mixable = []
            mixed_rows = [rows[i] for members in mixable for i in members]
            if policy == "auto" and len(mixable) == 1:
                self._run_swap(mixed_rows)
            elif mixed_rows:
                # policy "mixed" runs even a one-task batch this way (benchmarks and tests compare the paths)
                self._run_mixed(mixed_rows)
            in_mixed = {id(row) for row in mixed_rows}
            for members in groups.values():
                if id(rows[members[0]]) not in in_mixed:
                    self._run_swap([rows[i] for i in members])
        except Exception as exc:  # the engine must survive any batch: fail its requests, keep serving
            log.exception("inference batch failed")
            self.stats.failed_batches += 1
            error = InferenceFailed("inference failed for this batch; the base model was restored")
            error.__cause__ = exc
            for row in rows:
                row.ticket.fail(error)

    def _run_elsewhere(self, rows: list[_Row]) -> None:
        assert self._executor is not None
        try:
            logits, added = self._executor.run([(row.task, row.encoded) for row in rows], self.observer)
        except Exception as exc:
            log.exception("inference batch failed in the engine process")
            self.stats.failed_batches += 1
            error = InferenceFailed(f"inference failed for this batch: {exc}")
            error.__cause__ = exc
            for row in rows:
                row.ticket.fail(error)
            return
        for row, vector in zip(rows, logits, strict=True):
            row.ticket.set_row(row.slot, vector)
        for key in EXECUTED_COUNTERS:
            setattr(self.stats, key, getattr(self.stats, key) + added[key])

    def _collate(self, rows: list[_Row]) -> Batch:
        return collate([row.encoded for row in rows], self._pad_id, self._uses_token_types).to(self.device)

    @torch.inference_mode()
    def _run_swap(self, rows: list[_Row]) -> None:
        task = rows[0].task
        batch = self._collate(rows)
        with self.weights.lock:
            started = time.perf_counter()
            saved = self.weights.apply(task.indices, task.values)
            applied = time.perf_counter()
            try:
                hidden = encoder_hidden(self.base.encoder, batch)
                # The head runs before the restore: a prompt head reads the (possibly patched) embedding table.
                logits = self._head(task, hidden, batch.read_positions)
            finally:
                restoring = time.perf_counter()
                self.weights.restore(saved)
                self.observer.patch_swap("restore", time.perf_counter() - restoring)
            self.observer.patch_swap("apply", applied - started)
        self._deliver(rows, logits)
        self.stats.swap_batches += 1
        self.observer.batch("swap", len(rows))

    @torch.inference_mode()
    def _run_mixed(self, rows: list[_Row]) -> None:
        batch = self._collate(rows)
        self._hooks.plan = self._plan_for([row.task for row in rows], int(batch.input_ids.shape[1]))
        try:
            hidden = encoder_hidden(self.base.encoder, batch)
        finally:
            self._hooks.plan = None
        out: list[torch.Tensor | None] = [None] * len(rows)
        # One head call per distinct head, not per task: prompt-mode tasks over one template share their label ids
        # (the registry keeps one per head spec) and score against the same, unpatched, embedding table here.
        groups: dict[object, list[int]] = {}
        for i, row in enumerate(rows):
            task = row.task
            groups.setdefault(id(task) if task.head else (task.spec, id(task.label_ids)), []).append(i)
        for members in groups.values():
            if len(members) == len(rows):
                logits = self._head(rows[0].task, hidden, batch.read_positions).float().cpu()
            else:
                index = torch.tensor(members, device=self.device)
                logits = self._head(rows[members[0]].task, hidden[index], batch.read_positions[index]).float().cpu()
            for j, i in enumerate(members):
                out[i] = logits[j]
        for row, logits_row in zip(rows, out, strict=True):
            assert logits_row is not None
            row.ticket.set_row(row.slot, logits_row)
        self.stats.mixed_batches += 1
        self.observer.batch("mixed", len(rows))
        self._count(rows)

    def _plan_for(self, tasks: list[EngineTask], length: int) -> Plan:
        """The batch plan for rows of ``tasks`` (in row order) over ``length`` positions, reused while consecutive
        mixed batches repeat the same composition and length (steady traffic from the same clients): a plan
        depends only on those, as the base is pristine whenever a mixed batch runs. Held by task object, so a
        reloaded task never matches a stale plan."""
        cached = self._last_plan
        if (
            cached is not None
            and cached[1].length == length
            and len(cached[0]) == len(tasks)
            and all(map(operator.is_, cached[0], tasks))
        ):
            return cached[1]
        plan = build_plan([task.mixed_entries() for task in tasks], self.targets, self.device, length)
        self._last_plan = (tasks, plan)
        return plan

    def _head(self, task: EngineTask, hidden: torch.Tensor, read_positions: torch.Tensor) -> torch.Tensor:
        label_embeddings = None
        if task.label_ids is not None:
            # read inside the swap: a patch may touch the (tied) embedding table the prompt head scores with
            label_embeddings = self.base.encoder.get_input_embeddings().weight[task.label_ids]
        return head_logits(task.spec, hidden, read_positions, label_embeddings=label_embeddings, head_tensors=task.head)

    def _deliver(self, rows: list[_Row], logits: torch.Tensor) -> None:
        cpu = logits.float().cpu()
        for row, vector in zip(rows, cpu, strict=True):
            row.ticket.set_row(row.slot, vector)
        self._count(rows)

    def _count(self, rows: list[_Row]) -> None:
        self.stats.batches += 1
        self.stats.rows += len(rows)
        for name, count in Counter(row.task.name for row in rows).items():
            self.observer.inputs(name, count)
