"""The engine's forward passes in a child process (``EngineConfig.process``).

The server's inference thread keeps the queue, the batch policy and the futures; each batch it takes is sent to a
child process that holds its own copy of the base and runs the batch there with an in-process ``Engine``
(``Engine.execute``: swap or mixed, exactly as in one process). The child has its own GIL: in one process the
event loop and the inference thread take turns on one, and a small base's forward, a long string of short
operators, waits for it between nearly every two (benchmarks/http_bench.py, MiniLM: HTTP at ~0.9 of the engine
alone). Here the inference thread only pickles a batch and waits on a pipe, without the GIL.

A task is shipped to the child the first time a batch names it (its tensors by value, under the task object's id)
and dropped there when the server's task object is garbage-collected, so the child holds what the server's cache
holds. The child records the engine's metric observations and counters and sends them back with each batch's
logits; the server replays them into its own metrics. The server's copy of the base is never patched (the
registry and the job runner read it).

If the child dies (killed, out of memory), the batch it was running fails with ``InferenceFailed`` and the next
batch starts a new child first (the base loaded again, tasks shipped again as batches name them): a batch that
finds the child dead waits for the restart instead of failing. A child that keeps dying is not restarted for
ever: after ``EngineConfig.process_restarts`` restart attempts within ``RESTART_WINDOW_S`` (a failed start counts)
the executor gives up for good, and the engine reports itself not running (``/ready`` answers 503).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import pickle
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from app.core.errors import InferenceFailed
from app.engine.engine import EXECUTED_COUNTERS, Engine, EngineConfig, Observer
from app.engine.registry import EngineTask
from app.grafting.base import BaseModel, load_base
from app.grafting.heads import Encoded, HeadSpec

log = logging.getLogger(__name__)

Observation = tuple[str, str, float]
# a tensor on its way to the child: its elements and its torch dtype's name
Carried = tuple[np.ndarray, str]

# restarts older than this no longer count against EngineConfig.process_restarts
RESTART_WINDOW_S = 300.0


class _Child:
    """One started engine process and the server's end of its pipe."""

    def __init__(self, process: multiprocessing.process.BaseProcess, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        # held while a batch is on the pipe: stop() then kills instead of writing between its messages
        self.io = threading.Lock()
        self._stop_lock = threading.Lock()
        self._stopped = False

    @property
    def running(self) -> bool:
        # the sentinel becomes ready when the process ends; unlike is_alive() it reaps nothing, so any thread may ask
        return not self._stopped and not multiprocessing.connection.wait([self.process.sentinel], timeout=0)

    def kill(self, timeout: float = 10.0) -> None:
        """End the process now and wait for it (so that ``running`` is false when this returns)."""
        self.process.kill()
        self.process.join(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the child to exit, killing it if it does not or if a batch is on the pipe; once, from any thread."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        idle = self.io.acquire(blocking=False)
        try:
            if idle:
                with contextlib.suppress(OSError, ValueError):  # the child may be gone already
                    self.conn.send(("close",))
                self.process.join(timeout)
            if self.process.exitcode is None:
                self.kill(timeout)
        finally:
            if idle:  # else the batch's thread closes the pipe when its recv fails
                self.conn.close()
                self.io.release()


class RemoteExecutor:
    """The server's end of the child process: ships tasks, sends batches, returns their logits, and starts a new
    child when the last one died."""

    def __init__(self, config: EngineConfig, base: BaseModel, start_timeout_s: float = 600.0) -> None:
        if config.base_source is None:
            raise ValueError("EngineConfig.process needs base_source, the base the child process loads")
        self._config = config
        self._device = str(next(base.encoder.parameters()).device)
        self._fingerprint = base.fingerprint
        self._start_timeout_s = start_timeout_s
        # over _shipped, _dropped and _finalizers: finalizers run on any thread, this one included (a collection
        # while it holds the lock), hence re-entrant
        self._lock = threading.RLock()
        self._shipped: set[int] = set()
        self._dropped: list[int] = []
        self._finalizers: set[int] = set()
        # over _child, _closed, _restarting, _given_up and the attempts as a whole: close() and alive run on other
        # threads while the inference thread starts a child
        self._state = threading.Lock()
        self._child: _Child | None = None
        self._closed = False
        # restart attempts (monotonic times), appended and pruned by the inference thread only (under _state)
        self._attempts: deque[float] = deque()
        self._restarting = False
        self._given_up = False
        # children started after the first, for /v1/info and /metrics
        self.restarts = 0
        self._spawn()

    @property
    def alive(self) -> bool:
        """The child runs, or the next batch may start a new one. Read by any thread."""
        with self._state:  # one view of _restarting, _child and the attempts (the inference thread changes them)
            if self._closed or self._given_up:
                return False
            child = self._child
            if self._restarting or (child is not None and child.running) or self._restarts_left() > 0:
                return True
            # Nothing would start another child (no batch reaches an engine that is not ready): stay down for good,
            # for the orchestrator to replace this replica, rather than come back when the window has passed.
            self._given_up = True
            return False

    def run(
        self, rows: Sequence[tuple[EngineTask, Encoded]], observer: Observer
    ) -> tuple[list[torch.Tensor], dict[str, int]]:
        """One batch's logits (float32, CPU) and what it added to the child engine's counters; the child's metric
        observations are replayed into ``observer``. Called by the inference thread only."""
        child = self._running_child()
        with self._lock:
            drops, self._dropped = self._dropped, []
            new = {id(task): task for task, _ in rows if id(task) not in self._shipped}
        try:
            # pickled here, by value (plain pickle: no shared-memory handles), so a task that cannot be sent fails
            # its batch without touching the child
            message = pickle.dumps(
                (
                    "run",
                    drops,
                    [(key, task_payload(task)) for key, task in new.items()],
                    [(id(task), encoded) for task, encoded in rows],
                ),
                protocol=pickle.HIGHEST_PROTOCOL,
            )
        except Exception as exc:
            with self._lock:
                self._dropped[:0] = drops
            raise InferenceFailed(f"this batch could not be sent to the engine process: {exc!r}") from exc
        with child.io:
            try:
                child.conn.send_bytes(message)
                kind, *reply = child.conn.recv()
            except Exception as exc:
                # the child died or the pipe broke: the two sides may disagree on what the child holds, so the next
                # batch starts from a new child
                child.kill()
                if child._stopped:  # close() left the pipe to this thread
                    child.conn.close()
                raise InferenceFailed("the engine process failed while running this batch") from exc
        if kind != "ok":
            # the child is fine and dropped what it loaded for this batch: its new tasks are sent again next time
            raise InferenceFailed(reply[0])
        with self._lock:
            for key, task in new.items():
                self._shipped.add(key)
                if key not in self._finalizers:  # one per task object, across restarts
                    self._finalizers.add(key)
                    weakref.finalize(task, self._forget, key)
        logits, observations, added = reply
        for name, label, value in observations:
            if name == "batch":
                observer.batch(label, int(value))
            elif name == "inputs":
                observer.inputs(label, int(value))
            else:
                observer.patch_swap(label, value)
        return [torch.tensor(row, dtype=torch.float32) for row in logits], added

    def close(self, timeout: float = 10.0) -> None:
        with self._state:
            self._closed = True
            child, self._child = self._child, None
        if child is not None:
            child.stop(timeout)

    def _restarts_left(self) -> int:
        horizon = time.monotonic() - RESTART_WINDOW_S
        return self._config.process_restarts - sum(1 for at in tuple(self._attempts) if at >= horizon)

    def _running_child(self) -> _Child:
        """The running child, or a new one in place of a dead one (nothing shipped to the old one is there)."""
        child = self._child
        if child is not None and child.running:
            return child
        exit_code = None
        if child is not None:
            child.stop()
            exit_code = child.process.exitcode
        with self._state:
            if self._closed:
                raise InferenceFailed("the engine is shutting down")
            horizon = time.monotonic() - RESTART_WINDOW_S
            while self._attempts and self._attempts[0] < horizon:
                self._attempts.popleft()
            if self._given_up or self._restarts_left() <= 0:
                self._given_up = True
                raise InferenceFailed(
                    f"the engine process is not running and is not restarted again ({len(self._attempts)} restart "
                    f"attempts within {RESTART_WINDOW_S:.0f} s; "
                    f"SKILLGRAFT_ENGINE_PROCESS_RESTARTS={self._config.process_restarts})"
                )
            self._attempts.append(time.monotonic())
            self._restarting = True
        log.warning("the engine process is not running (exit code %s); starting a new one", exit_code)
        with self._lock:
            self._shipped.clear()
            self._dropped.clear()
        try:
            child = self._spawn()
        except Exception as exc:
            raise InferenceFailed(f"restarting the engine process failed: {exc}") from exc
        finally:
            with self._state:
                self._restarting = False
        self.restarts += 1
        return child

    def _spawn(self) -> _Child:
        """Start a child and wait until it has loaded the base (raises, with the child stopped, if it cannot)."""
        context = multiprocessing.get_context("spawn")
        conn, child_end = context.Pipe()
        process = context.Process(
            target=child_main,
            args=(child_end, self._config, self._device, torch.get_num_threads()),
            name="skillgraft-engine",
            daemon=True,
        )
        try:
            process.start()
        except Exception as exc:
            conn.close()
            raise RuntimeError(f"the engine process could not be started: {exc}") from exc
        finally:
            child_end.close()
        child = _Child(process, conn)
        with self._state:
            closed = self._closed
            if not closed:
                self._child = child
        if closed:
            child.kill()
            child.stop()
            raise RuntimeError("the engine is shutting down")
        try:
            problem = self._await_ready(child)
        except (EOFError, OSError):
            problem = "ended while starting (stopped by close(), or it died)"
        except BaseException:
            child.kill()
            child.stop()
            raise
        if problem is not None:
            child.kill()
            child.stop()
            raise RuntimeError(f"the engine process {problem}")
        return child

    def _await_ready(self, child: _Child) -> str | None:
        """None once the child says it loaded this base, else what went wrong."""
        if not child.conn.poll(self._start_timeout_s):
            return f"did not start within {self._start_timeout_s:.0f} s"
        try:
            kind, detail = child.conn.recv()
        except EOFError:
            child.process.join(1.0)
            code = child.process.exitcode
            # spawn re-imports the main module: a script without the guard starts the service again and fails
            hint = (
                "; a script that starts the service needs an `if __name__ == '__main__':` guard, as "
                "multiprocessing's spawn requires"
                if code == 1
                else ""
            )
            return f"exited while starting (exit code {code}{hint})"
        if kind != "ready":
            return f"failed to start: {detail}"
        if detail != self._fingerprint:
            return f"loaded a different base ({detail[:19]}, not {self._fingerprint[:19]})"
        return None

    def _forget(self, key: int) -> None:
        with self._lock:
            self._finalizers.discard(key)
            if key in self._shipped:
                self._shipped.discard(key)
                self._dropped.append(key)


def task_payload(task: EngineTask) -> dict[str, Any]:
    """What the child needs of a task, tensors as numpy arrays with their torch dtype (pickled by value, only the
    tensor's own elements even where it is a view of a larger buffer)."""

    def array(tensor: torch.Tensor | None) -> Carried | None:
        if tensor is None:
            return None
        tensor = tensor.detach().cpu()
        # numpy has no bfloat16: carried as float32, which holds every bfloat16 value exactly, and cast back
        wide = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
        return wide.numpy(), str(tensor.dtype).removeprefix("torch.")

    return {
        "name": task.name,
        "etag": task.etag,
        "spec": task.spec,
        "params": task.params,
        "indices": array(task.indices),
        "values": array(task.values),
        "slots": array(task.slots),
        "slot_counts": array(task.slot_counts),
        "label_ids": array(task.label_ids),
        "head": {name: array(tensor) for name, tensor in task.head.items()},
    }


def task_from_payload(
    payload: dict[str, Any], device: torch.device, label_ids: dict[HeadSpec, torch.Tensor]
) -> EngineTask:
    """The child's task from ``task_payload``; tasks over one head spec share one label-id tensor, as in the
    server's registry (the mixed path groups rows by it)."""

    def tensor(carried: Carried | None) -> torch.Tensor | None:
        if carried is None:
            return None
        array, dtype = carried
        return torch.from_numpy(array).to(device=device, dtype=getattr(torch, dtype))

    labels = tensor(payload["label_ids"])
    if labels is not None:
        labels = label_ids.setdefault(payload["spec"], labels)
    return EngineTask(
        name=payload["name"],
        etag=payload["etag"],
        spec=payload["spec"],
        tokenization=None,  # type: ignore[arg-type]  # the server tokenises
        params=payload["params"],
        indices=tensor(payload["indices"]),  # type: ignore[arg-type]
        values=tensor(payload["values"]),  # type: ignore[arg-type]
        slots=tensor(payload["slots"]),  # type: ignore[arg-type]
        slot_counts=tensor(payload["slot_counts"]),
        label_ids=labels,
        head={name: tensor(array) for name, array in payload["head"].items()},  # type: ignore[misc]
    )


class _Recorder(Observer):
    """The child engine's observer: keeps its observations until the batch's reply carries them."""

    def __init__(self) -> None:
        self.observations: list[Observation] = []

    def batch(self, mode: str, rows: int) -> None:
        self.observations.append(("batch", mode, rows))

    def inputs(self, task: str, count: int) -> None:
        self.observations.append(("inputs", task, count))

    def patch_swap(self, phase: str, seconds: float) -> None:
        self.observations.append(("patch_swap", phase, seconds))

    def take(self) -> list[Observation]:
        taken, self.observations = self.observations, []
        return taken


def child_main(conn: Connection, config: EngineConfig, device: str, threads: int) -> None:
    """The child process: load the base, then run each batch it is sent until told to close."""
    # Ctrl-C or a signal to the process group is the server's to handle: it finishes its batches, then closes this
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    try:
        assert config.base_source is not None
        base = load_base(config.base_source, device)
        recorder = _Recorder()
        engine = Engine(base, replace(config, process=False), observer=recorder)
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", base.fingerprint))
    tasks: dict[int, EngineTask] = {}
    label_ids: dict[HeadSpec, torch.Tensor] = {}
    try:
        while True:
            try:
                message = conn.recv()
            except EOFError:
                return
            if message[0] == "close":
                return
            _, drops, new, rows = message
            for key in drops:
                tasks.pop(key, None)
            before = {key: getattr(engine.stats, key) for key in EXECUTED_COUNTERS}
            try:
                for key, payload in new:
                    tasks[key] = task_from_payload(payload, engine.device, label_ids)
                logits = engine.execute([(tasks[key], encoded) for key, encoded in rows])
            except Exception as exc:
                recorder.take()
                for key, _ in new:  # the server sends them again with its next batch
                    tasks.pop(key, None)
                cause = exc.__cause__ or exc
                conn.send(("error", f"inference failed in the engine process: {type(cause).__name__}: {cause}"))
                continue
            # what this batch added, not the totals: a restarted child counts from zero again
            added = {key: getattr(engine.stats, key) - count for key, count in before.items()}
            conn.send(("ok", [row.tolist() for row in logits], recorder.take(), added))
    finally:
        engine.close()
