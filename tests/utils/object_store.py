"""A real S3-compatible HTTP server for tests: moto's, on a loopback port of this process.

Its objects live in this process's memory (moto keeps large ones in spooled temporary files), so ``stop()`` and
``start()`` again on the same port is an outage the data survives, as it would with a real object store.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
from moto.server import ThreadedMotoServer

from tests.utils.http import JOB_SPEC
from tests.utils.processes import free_port

REGION = "us-east-1"
# what boto3 reads in the server and worker processes (and, with monkeypatch, in this one); no profile or instance
# metadata is consulted, so a developer's own AWS configuration never leaks into a test
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": REGION,
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


class MotoS3:
    def __init__(self) -> None:
        self.port = free_port()
        self.server: ThreadedMotoServer | None = None
        # one line per request otherwise
        logging.getLogger("werkzeug").setLevel(logging.ERROR)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def env(self, bucket: str, prefix: str = "store") -> dict[str, str]:
        """Environment of a server or worker process that stores in ``s3://bucket/prefix`` here."""
        return {**AWS_ENV, "AWS_ENDPOINT_URL": self.endpoint, "SKILLGRAFT_STORE_URL": f"s3://{bucket}/{prefix}"}

    def client(self) -> Any:
        import boto3

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        found = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found += [item["Key"] for item in page.get("Contents", ())]
        return sorted(found)

    def sizes(self, bucket: str, prefix: str = "") -> dict[str, int]:
        sizes: dict[str, int] = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            sizes.update({item["Key"]: int(item["Size"]) for item in page.get("Contents", ())})
        return sizes

    def unfinished_uploads(self, bucket: str) -> list[str]:
        """Keys of multipart uploads begun and never completed (invisible as objects, but stored)."""
        response = self.client().list_multipart_uploads(Bucket=bucket)
        return [upload["Key"] for upload in response.get("Uploads", ())]


def bucket_name(label: str) -> str:
    """A fresh bucket name per test (moto's buckets are shared by every server in this process)."""
    return re.sub(r"[^a-z0-9-]", "-", f"sg-{label.lower()}-{time.monotonic_ns() % 10**9}")[:63]


def padded_checkpoint_zip(checkpoint_dir: Path, target: Path, padding_bytes: int) -> Path:
    """A zipped checkpoint folder plus ``padding_bytes`` of incompressible padding (stored, not deflated): a large
    upload whose validation reads only the small model (the unzip takes ``model.safetensors`` and
    ``config.json`` by name), so what a test measures is the upload path."""
    block = os.urandom(1 << 20)
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as archive:
        for file in sorted(checkpoint_dir.iterdir()):
            if file.is_file():
                archive.write(file, f"model/{file.name}")
        with archive.open("model/padding.bin", "w", force_zip64=True) as sink:
            left = padding_bytes
            while left > 0:
                piece = block[: min(len(block), left)]
                sink.write(piece)
                left -= len(piece)
    return target


class RssWatcher:
    """Samples a process's resident set size (VmRSS) every few milliseconds until stopped; ``peak`` in bytes."""

    def __init__(self, pid: int, every_s: float = 0.02) -> None:
        self.pid = pid
        self.every_s = every_s
        self.baseline = self.sample()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        text = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
        return int(match.group(1)) * 1024 if match else 0

    def __enter__(self) -> RssWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.peak = max(self.peak, self.sample())
            except (FileNotFoundError, ProcessLookupError):
                return


def post_streamed_upload(url: str, archive: Path, timeout: float) -> tuple[httpx.Response, float]:
    """POST a (large) zipped checkpoint as a job upload, streamed from disk; returns the response and seconds."""
    tiny_train = b'{"text": "a", "label": "neg"}\n{"text": "b", "label": "pos"}\n'
    with archive.open("rb") as stream:
        started = time.monotonic()
        response = httpx.post(
            f"{url}/v1/tasks",
            files={"checkpoint": ("model.zip", stream, "application/zip"), "train": ("train.jsonl", tiny_train)},
            data={"spec": json.dumps(JOB_SPEC)},
            timeout=timeout,
        )
        return response, time.monotonic() - started
