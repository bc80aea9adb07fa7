"""Real processes for end-to-end tests: uvicorn servers and RQ workers started on loopback, stopped after."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Processes:
    """Starts ``skillgraft serve`` / ``skillgraft worker`` subprocesses with a shared environment."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        # the servers under test serve with the torch operators: compiling the mixed-path kernel in each would cost
        # a minute of CPU apiece (tests/test_serving_engine.py checks the kernel in process)
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "SKILLGRAFT_MIXED_KERNEL": "false", **env}
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def _start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", *args], env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        )
        self.procs.append(proc)
        return proc

    def worker(self) -> subprocess.Popen[bytes]:
        return self._start("worker", "worker")

    def server(self, timeout: float = 90) -> str:
        port = free_port()
        proc = self._start("server", "serve", "--port", str(port), "--log-level", "warning")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.logs()}")

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:] for p in sorted(self.log_dir.glob("*.log"))
        )
