"""Fault injection with real processes on loopback: Redis outage, API restart mid-job, a full or read-only store,
and two uploads racing for one task name."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.grafting.base import BaseModel
from app.grafting.patch import patch_to_bytes, save_patch
from tests.utils.http import JOB_SPEC, classify, upload, wait_job
from tests.utils.processes import Processes, free_port
from tests.utils.tiny import make_patch
from tests.utils.uploads import jsonl, write_checkpoint


class RedisServer:
    """A private redis-server with an append-only file, so a restart keeps the queue (as in production)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (scripts/test.sh and .ci/run install it)")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.folder),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while (
            subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True).stdout.strip() != b"PONG"
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def _env(tmp_path: Path, base_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "SKILLGRAFT_STORE_DIR": str(tmp_path / "store"),
        "SKILLGRAFT_BASE_MODEL": str(base_dir),
        "SKILLGRAFT_MAX_BATCH_WAIT_MS": "1",
        **extra,
    }


@pytest.mark.slow
def test_redis_outage(redis_server: RedisServer, tmp_path: Path, tiny_base_dir: Path, tiny_base: BaseModel) -> None:
    procs = Processes(
        _env(tmp_path, tiny_base_dir, SKILLGRAFT_REDIS_URL=redis_server.url, SKILLGRAFT_WORKER_MAINTENANCE_S="1"),
        tmp_path,
    )
    try:
        url = procs.server()
        assert httpx.put(f"{url}/v1/tasks/served/patch", content=patch_to_bytes(make_patch(tiny_base))).status_code in (
            200,
            201,
        )
        assert classify(url, "served").status_code == 200
        checkpoint = write_checkpoint(tiny_base, tmp_path / "ckpt")
        before = upload(url, checkpoint, JOB_SPEC)  # queued while no worker runs
        assert before.status_code == 202, before.text

        redis_server.stop()
        during = classify(url, "served")
        assert during.status_code == 200, "classify keeps answering from the loaded base and cached patches"
        assert httpx.get(f"{url}/v1/tasks", timeout=10).status_code == 200
        refused = upload(url, checkpoint, {**JOB_SPEC, "task": "later"})
        assert refused.status_code == 503, refused.text
        assert "unavailable" in refused.json()["error"]["message"]
        assert httpx.get(f"{url}{before.json()['url']}", timeout=10).status_code == 503
        assert list((tmp_path / "store/uploads").glob(".incoming-*")) == [], "refused upload left nothing behind"

        redis_server.start()  # same data folder: the append-only file brings the queue back
        after = upload(url, checkpoint, {**JOB_SPEC, "task": "later"})
        assert after.status_code == 202, after.text
        procs.worker()
        for job in (before.json(), after.json()):
            done = wait_job(url, job["id"], procs, 120)
            assert done["state"] == "succeeded", (done, procs.logs())
        assert classify(url, "films").status_code == 200 and classify(url, "later").status_code == 200
    finally:
        procs.stop_all()


@pytest.mark.slow
def test_api_restart_mid_job(tmp_path: Path, tiny_base_dir: Path, tiny_base: BaseModel) -> None:
    procs = Processes(_env(tmp_path, tiny_base_dir), tmp_path)
    try:
        url = procs.server()
        checkpoint = write_checkpoint(tiny_base, tmp_path / "ckpt")
        job = upload(url, checkpoint, {**JOB_SPEC, "steps": 60}, train=jsonl(32)).json()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            current = httpx.get(f"{url}{job['url']}", timeout=10).json()
            if current["state"] == "running" and current["progress"]["step"] >= 2:
                break
            time.sleep(0.05)
        assert current["state"] == "running", current
        os.kill(procs.procs[0].pid, signal.SIGKILL)  # the API process dies mid-job, taking its job thread along
        procs.procs[0].wait(timeout=10)
        url = procs.server()
        done = wait_job(url, job["id"], procs, 180)
        assert done["state"] == "succeeded", (done, procs.logs())
        assert done["attempts"] == 2
        assert classify(url, "films").status_code == 200
        assert sorted(p.name for p in (tmp_path / "store/tasks").iterdir()) == ["films"]
    finally:
        procs.stop_all()


def fill_up(path: Path) -> None:
    """Write zeros until the filesystem says it is full (unbuffered, so the error comes from a write we make)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)


def _mount(*args: str) -> None:
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode != 0:
        reason = f"cannot mount here ({result.stderr.strip()}): needs root in a machine that allows mounts"
        if os.environ.get("SKILLGRAFT_REQUIRE_MOUNT") == "1":
            pytest.fail(reason + " (SKILLGRAFT_REQUIRE_MOUNT=1)")
        pytest.skip(reason)


@pytest.mark.slow
def test_store_full(tmp_path: Path, tiny_base_dir: Path, tiny_base: BaseModel) -> None:
    store = tmp_path / "store"
    store.mkdir()
    _mount("-t", "tmpfs", "-o", "size=512k", "tmpfs", str(store))
    procs = Processes(_env(tmp_path, tiny_base_dir), tmp_path)
    try:
        url = procs.server()
        small = make_patch(tiny_base, task="kept", fraction=0.002)
        assert httpx.put(f"{url}/v1/tasks/kept/patch", content=patch_to_bytes(small)).status_code == 201
        filler = store / "filler.bin"
        fill_up(filler)
        big = patch_to_bytes(make_patch(tiny_base, task="big", fraction=0.05))
        refused = httpx.put(f"{url}/v1/tasks/big/patch", content=big)
        assert refused.status_code == 507, refused.text
        assert "No space left on device" in refused.json()["error"]["message"]
        checkpoint = write_checkpoint(tiny_base, tmp_path / "ckpt")
        assert upload(url, checkpoint, JOB_SPEC).status_code == 507
        assert sorted(p.name for p in (store / "tasks").iterdir()) == ["kept"], "nothing half-written"
        assert list((store / ".staging").iterdir()) == []
        assert list((store / "uploads").iterdir()) == []
        filler.unlink()
        assert classify(url, "kept").status_code == 200
        assert httpx.put(f"{url}/v1/tasks/big/patch", content=big).status_code == 201, "recovers once space returns"
    finally:
        procs.stop_all()
        subprocess.run(["umount", str(store)], check=False)


@pytest.mark.slow
def test_store_read_only(tmp_path: Path, tiny_base_dir: Path, tiny_base: BaseModel) -> None:
    source = tmp_path / "store-rw"
    save_patch(make_patch(tiny_base, task="kept"), source / "tasks/kept/patch.safetensors")
    for folder in ("jobs", "uploads", ".staging"):
        (source / folder).mkdir(parents=True, exist_ok=True)
    store = tmp_path / "store"
    store.mkdir()
    _mount("--bind", str(source), str(store))
    try:
        _mount("-o", "remount,bind,ro", str(store))
        procs = Processes(_env(tmp_path, tiny_base_dir), tmp_path)
        try:
            url = procs.server()
            assert classify(url, "kept").status_code == 200
            refused = httpx.put(f"{url}/v1/tasks/other/patch", content=patch_to_bytes(make_patch(tiny_base)))
            assert refused.status_code == 507 and "Read-only file system" in refused.json()["error"]["message"]
            assert httpx.delete(f"{url}/v1/tasks/kept").status_code == 507
            assert upload(url, write_checkpoint(tiny_base, tmp_path / "ckpt"), JOB_SPEC).status_code == 507
            assert classify(url, "kept").status_code == 200
        finally:
            procs.stop_all()
    finally:
        subprocess.run(["umount", str(store)], check=False)
    assert sorted(p.name for p in (source / "tasks").iterdir()) == ["kept"]


@pytest.mark.slow
def test_two_uploads_race_for_one_name(tmp_path: Path, tiny_base_dir: Path, tiny_base: BaseModel) -> None:
    procs = Processes(_env(tmp_path, tiny_base_dir), tmp_path)
    try:
        url = procs.server()
        checkpoint = write_checkpoint(tiny_base, tmp_path / "ckpt")
        barrier = threading.Barrier(2)
        statuses: list[int] = []

        def send(rows: int) -> None:
            barrier.wait()
            statuses.append(upload(url, checkpoint, {**JOB_SPEC, "task": "race"}, train=jsonl(rows)).status_code)

        threads = [threading.Thread(target=send, args=(rows,)) for rows in (16, 20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(statuses) == [202, 409], statuses
    finally:
        procs.stop_all()
