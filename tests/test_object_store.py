"""Tasks, uploads and stitched models in an S3-compatible object store (moto's server over loopback).

In this process: the store behind the registry (two services with their own caches share one bucket), bad
objects written by another tool, uploads and stitched models, and the re-check that catches a missed notice.
With real processes: an upload localized by an RQ worker and served by two API replicas that stay in step through
notices; an object-store outage; a large upload streamed into the bucket with bounded memory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load

from app.config import Settings
from app.core import object_store as object_store_module
from app.core.errors import TaskNotFound, TaskUnusable
from app.core.object_store import FileCache, ObjectTaskStore, S3Location, S3Objects, open_task_store
from app.core.store import LocalTaskStore
from app.core.store_sync import StoreSync, TaskNotice
from app.engine.engine import EngineConfig
from app.engine.service import InferenceService, ServiceLimits, TextInput
from app.grafting.base import BaseModel
from app.grafting.patch import PatchError, patch_to_bytes
from app.jobs.service import connect_redis
from app.main import create_app
from tests.utils.http import JOB_SPEC, classify, upload, wait_job
from tests.utils.object_store import (
    AWS_ENV,
    MotoS3,
    RssWatcher,
    bucket_name,
    padded_checkpoint_zip,
    post_streamed_upload,
)
from tests.utils.processes import Processes
from tests.utils.serving import TEXTS, Reference
from tests.utils.tiny import make_patch
from tests.utils.uploads import write_checkpoint

REDIS_URL = os.environ.get("SKILLGRAFT_TEST_OBJECT_STORE_REDIS_URL", "redis://127.0.0.1:6379/15")
LARGE_UPLOAD_MB = int(os.environ.get("SKILLGRAFT_TEST_LARGE_UPLOAD_MB", "300"))


@pytest.fixture(scope="module")
def s3() -> Iterator[MotoS3]:
    server = MotoS3()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3: MotoS3, request: pytest.FixtureRequest) -> str:
    return s3.create_bucket(bucket_name(request.node.name[:30]))


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch, s3: MotoS3) -> None:
    """boto3 in this process talks to the test server (as the server processes do through their environment)."""
    for key, value in {**AWS_ENV, "AWS_ENDPOINT_URL": s3.endpoint}.items():
        monkeypatch.setenv(key, value)


def object_store(bucket: str, folder: Path, recheck_s: float = 30.0) -> ObjectTaskStore:
    return ObjectTaskStore(S3Objects(S3Location.parse(f"s3://{bucket}/store")), folder, recheck_s=recheck_s)


def service_on(base: BaseModel, store: ObjectTaskStore) -> InferenceService:
    return InferenceService(base, store, ServiceLimits(), EngineConfig(max_batch_wait_ms=1.0), 64 * 2**20, 128)


def logits(service: InferenceService, task: str) -> torch.Tensor:
    rows, _ = service.prepare([task], [TextInput(t) for t in TEXTS])
    return torch.stack(service.engine.run(rows, timeout=60))


# -- the store in this process ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("aws")
def test_replicas_with_their_own_caches_read_one_bucket(
    s3: MotoS3, bucket: str, tiny_base: BaseModel, tmp_path: Path
) -> None:
    first = service_on(tiny_base, object_store(bucket, tmp_path / "a"))
    second = service_on(tiny_base, object_store(bucket, tmp_path / "b"))
    try:
        v1, v2 = make_patch(tiny_base, "t", seed=1), make_patch(tiny_base, "t", "classifier", seed=2)
        info, created = first.put_patch("t", patch_to_bytes(v1))
        assert created and len(info.etag) == 64  # the sha256: the same version name on every machine
        assert s3.keys(bucket) == [f"store/patches/t/{info.etag}.safetensors", "store/tasks/t.json"]
        assert torch.equal(logits(second, "t"), Reference(tiny_base, v1).logits(TEXTS))
        assert (tmp_path / "b/cache/patches/t" / f"{info.etag}.safetensors").is_file(), "downloaded once, kept"
        described = second.describe_task("t")
        assert described.metadata["mask_size"] == v1.mask_size and described.record["source"] == "upload"

        with pytest.raises(PatchError):  # refused before anything reaches the bucket
            first.put_patch("t", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
        assert s3.keys(bucket) == [f"store/patches/t/{info.etag}.safetensors", "store/tasks/t.json"]

        replaced, created = first.put_patch("t", patch_to_bytes(v2))
        assert not created and s3.keys(bucket) == [f"store/patches/t/{replaced.etag}.safetensors", "store/tasks/t.json"]
        # the second replica trusts what it saw for recheck_s (30 s here) until a notice says otherwise
        assert second.registry.get("t").etag == info.etag
        second.task_changed("t")  # what its StoreSync does with a notice: the new version is loaded at once
        assert second.registry.is_cached("t") and second.registry.get("t").etag == replaced.etag
        assert torch.equal(logits(second, "t"), Reference(tiny_base, v2).logits(TEXTS))

        first.delete_task("t")
        assert s3.keys(bucket) == []
        second.task_changed("t")
        assert not second.registry.is_cached("t")
        with pytest.raises(TaskNotFound):
            second.registry.get("t")
    finally:
        first.close()
        second.close()


@pytest.mark.usefixtures("aws")
def test_the_periodic_recheck_catches_a_change_no_notice_announced(
    bucket: str, tiny_base: BaseModel, tmp_path: Path
) -> None:
    writer = object_store(bucket, tmp_path / "writer")
    reader = service_on(tiny_base, object_store(bucket, tmp_path / "reader", recheck_s=0.3))
    sync = StoreSync(reader.store, reader.task_changed, recheck_s=0.3)  # no Redis: the re-check alone
    sync.start()
    try:
        first = writer.write_patch("quiet", patch_to_bytes(make_patch(tiny_base, "quiet", seed=1)), lambda p: None)
        assert reader.registry.get("quiet").etag == first.etag
        second = writer.write_patch("quiet", patch_to_bytes(make_patch(tiny_base, "quiet", seed=3)), lambda p: None)
        deadline = time.monotonic() + 2
        # no request asks meanwhile: the re-check itself (StoreSync → refresh) reloads the replaced task
        while reader.registry.stats["loads"] < 2:
            assert time.monotonic() < deadline, "the re-check never reloaded the replaced task"
            time.sleep(0.02)
        assert reader.registry.get("quiet").etag == second.etag and reader.registry.stats["loads"] == 2
    finally:
        sync.stop()
        reader.close()


@pytest.mark.usefixtures("aws")
def test_objects_another_tool_wrote_badly_make_one_task_unusable(
    s3: MotoS3, bucket: str, tiny_base: BaseModel, tmp_path: Path
) -> None:
    service = service_on(tiny_base, object_store(bucket, tmp_path / "a"))
    try:
        client = s3.client()
        client.put_object(Bucket=bucket, Key="store/tasks/junk.json", Body=b'{"sha256": "../../etc"}')
        with pytest.raises(TaskUnusable, match="junk"):
            service.registry.get("junk")
        stored, _ = service.put_patch("good", patch_to_bytes(make_patch(tiny_base, "good")))
        # a blob changed behind the pointer's back no longer matches its sha256: refused, never served
        client.put_object(Bucket=bucket, Key=f"store/patches/good/{stored.etag}.safetensors", Body=b"tampered")
        other = service_on(tiny_base, object_store(bucket, tmp_path / "b"))
        try:
            with pytest.raises(TaskUnusable, match="sha256"):
                other.registry.get("good")
            problems = {info.name: info.problem for info in other.list_tasks()}
            assert problems["good"] is None and "unreadable" in (problems["junk"] or "")
        finally:
            other.close()
    finally:
        service.close()


@pytest.mark.usefixtures("aws")
def test_uploads_and_stitched_models_live_in_the_bucket(s3: MotoS3, bucket: str, tmp_path: Path) -> None:
    api, worker = object_store(bucket, tmp_path / "api"), object_store(bucket, tmp_path / "worker")
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "checkpoint.safetensors").write_bytes(b"c" * 5000)
    (staged / "train.jsonl").write_text('{"text": "x", "label": "a"}\n')
    api.put_upload("0" * 32, staged)
    assert not staged.exists(), "the staged folder is consumed"
    folder_key = f"store/uploads/{'0' * 32}/"
    names = ["checkpoint.safetensors", "manifest.json", "train.jsonl"]
    assert s3.keys(bucket, "store/uploads/") == [folder_key + name for name in names]
    with worker.open_upload("0" * 32) as folder:
        assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.safetensors", "train.jsonl"]
        assert (folder / "checkpoint.safetensors").read_bytes() == b"c" * 5000
    assert not folder.exists(), "the worker's copy goes with the block"
    assert [name for name, _ in worker.list_uploads()] == ["0" * 32]
    worker.delete_upload("0" * 32)
    assert s3.keys(bucket, "store/uploads/") == []
    with worker.open_upload("f" * 32) as folder:
        assert list(folder.iterdir()) == []

    model = worker.scratch_dir / "model.tmp"
    model.write_bytes(b"m" * 3000)
    worker.put_stitched("combo", model, {"name": "combo", "tasks": ["a", "b"]})
    assert api.stitched_names() == ["combo"] and api.stitched_report("combo") == {"name": "combo", "tasks": ["a", "b"]}
    downloaded = api.stitched_model("combo")
    assert downloaded is not None and downloaded.read_bytes() == b"m" * 3000
    assert api.stitched_model("nothing") is None and api.stitched_report("nothing") is None


# -- real processes --------------------------------------------------------------------------------------------


def processes(tmp_path: Path, name: str, env: dict[str, str]) -> Processes:
    """One process set per replica or worker: each gets its own local folder (cache, staging), as on its own
    machine; only Redis and the bucket are shared."""
    folder = tmp_path / name
    folder.mkdir(parents=True, exist_ok=True)
    return Processes({**env, "SKILLGRAFT_STORE_DIR": str(folder)}, folder)


def put_patch(url: str, patch_bytes: bytes, name: str) -> httpx.Response:
    return httpx.put(f"{url}/v1/tasks/{name}/patch", content=patch_bytes, timeout=30)


def probabilities(response: httpx.Response) -> list[dict[str, float]]:
    return [p["probabilities"] for p in response.json()["results"][0]["predictions"]]


@pytest.mark.slow
def test_a_worker_localizes_and_two_replicas_serve_in_step(
    s3: MotoS3, bucket: str, tmp_path: Path, tiny_base_dir: Path, tiny_base: BaseModel
) -> None:
    redis = connect_redis(REDIS_URL)
    redis.flushdb()
    env = {
        **s3.env(bucket),
        "SKILLGRAFT_BASE_MODEL": str(tiny_base_dir),
        "SKILLGRAFT_REDIS_URL": REDIS_URL,
        "SKILLGRAFT_WORKER_MAINTENANCE_S": "1",
        "SKILLGRAFT_MAX_BATCH_WAIT_MS": "1",
        # a replica trusts what it saw for 30 s: only the notices can make a change show within a second
        "SKILLGRAFT_STORE_RECHECK_S": "30",
    }
    pools = [processes(tmp_path, name, env) for name in ("api-1", "api-2", "worker")]
    try:
        first, second = pools[0].server(), pools[1].server()
        pools[2].worker()
        assert classify(first, "films").status_code == 404 and classify(second, "films").status_code == 404

        response = upload(first, write_checkpoint(tiny_base, tmp_path / "ckpt"), JOB_SPEC)
        assert response.status_code == 202, response.text
        assert s3.keys(bucket, "store/uploads/"), "the upload waits in the bucket for a worker"
        done = wait_job(second, response.json()["id"], pools[2], 120)
        assert done["state"] == "succeeded", (done, *(pool.logs() for pool in pools))
        one, two = classify(first, "films"), classify(second, "films")
        assert one.status_code == two.status_code == 200, (one.text, two.text)
        assert one.json()["results"] == two.json()["results"]
        etag = done["result"]["etag"]
        for replica in ("api-1", "api-2"):  # each replica downloaded the patch into its own cache
            assert (tmp_path / replica / "cache/patches/films" / f"{etag}.safetensors").is_file()
            assert not (tmp_path / replica / "tasks").exists() or not any((tmp_path / replica / "tasks").iterdir())
        assert s3.keys(bucket, "store/uploads/") == [], "a finished job's upload is removed"

        # replaced through one replica: the other serves the new version within a second
        replacement = make_patch(tiny_base, "films", seed=9, labels=("neg", "pos"))
        replaced = put_patch(first, patch_to_bytes(replacement), "films")
        assert replaced.status_code == 200, replaced.text
        changed_at = time.monotonic()
        wanted = probabilities(classify(first, "films"))
        while probabilities(classify(second, "films")) != wanted:
            assert time.monotonic() - changed_at < 1.0, "the other replica still serves the old version"
            time.sleep(0.02)
        assert httpx.get(f"{second}/v1/tasks/films").json()["etag"] == replaced.json()["etag"]

        # deleted through the other one: 404 on both within a second
        assert httpx.delete(f"{second}/v1/tasks/films").status_code == 204
        deleted_at = time.monotonic()
        while classify(first, "films").status_code != 404:
            assert time.monotonic() - deleted_at < 1.0, "the first replica still serves a deleted task"
            time.sleep(0.02)
        assert classify(second, "films").status_code == 404
        assert httpx.get(f"{first}/v1/tasks/films").status_code == 404
        assert s3.keys(bucket, "store/tasks/") == [] and s3.keys(bucket, "store/patches/") == []
    finally:
        for pool in pools:
            pool.stop_all()


@pytest.mark.slow
def test_an_object_store_outage_keeps_cached_tasks_serving(
    tmp_path: Path, tiny_base_dir: Path, tiny_base: BaseModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3 = MotoS3()  # its own server: this test stops it
    s3.start()
    try:
        bucket = s3.create_bucket(bucket_name("outage"))
        for key, value in {**AWS_ENV, "AWS_ENDPOINT_URL": s3.endpoint}.items():
            monkeypatch.setenv(key, value)
        # tasks stored before the replica starts: it finds them by listing the bucket
        earlier = object_store(bucket, tmp_path / "earlier")
        for seed, name in enumerate(("kept", "listed"), 1):
            earlier.write_patch(name, patch_to_bytes(make_patch(tiny_base, name, seed=seed)), lambda p: None)
        env = {
            **s3.env(bucket),
            "SKILLGRAFT_BASE_MODEL": str(tiny_base_dir),
            "SKILLGRAFT_MAX_BATCH_WAIT_MS": "1",
            "SKILLGRAFT_STORE_RECHECK_S": "0.3",
        }
        pool = processes(tmp_path, "api", env)
        try:
            url = pool.server()
            assert [t["name"] for t in httpx.get(f"{url}/v1/tasks").json()["items"]] == ["kept", "listed"]
            served = classify(url, "kept")
            assert served.status_code == 200
            assert httpx.get(f"{url}/ready").json() == {"status": "ready", "store": "reachable"}
            before = s3.keys(bucket)

            s3.stop()
            for _ in range(3):  # past the re-check interval: the replica keeps what it saw
                again = classify(url, "kept")
                assert again.status_code == 200 and again.json() == served.json()
                time.sleep(0.35)
            assert classify(url, "listed").status_code == 503, "never loaded here: its bytes are out of reach"
            never = classify(url, "never-seen")
            assert never.status_code == 503 and never.json()["error"]["code"] == "store_unreachable"
            ready = httpx.get(f"{url}/ready")
            assert ready.status_code == 200 and ready.json()["store"] == "unreachable"
            assert "skillgraft_store_reachable 0.0" in httpx.get(f"{url}/metrics").text
            patch = patch_to_bytes(make_patch(tiny_base, "fresh"))
            assert put_patch(url, patch, "fresh").status_code == 503
            assert httpx.delete(f"{url}/v1/tasks/kept").status_code == 503
            assert upload(url, write_checkpoint(tiny_base, tmp_path / "ckpt"), JOB_SPEC).status_code == 503
            assert [t["name"] for t in httpx.get(f"{url}/v1/tasks").json()["items"]] == ["kept", "listed"]

            s3.start()
            deadline = time.monotonic() + 10
            while httpx.get(f"{url}/ready").json().get("store") != "reachable":
                assert time.monotonic() < deadline, "the replica never saw the store come back"
                time.sleep(0.1)
            assert s3.keys(bucket) == before, "nothing half-written"
            assert s3.unfinished_uploads(bucket) == []
            assert list((tmp_path / "api/.staging").iterdir()) == []
            assert list((tmp_path / "api/uploads").iterdir()) == []
            assert "skillgraft_store_reachable 1.0" in httpx.get(f"{url}/metrics").text
            assert put_patch(url, patch, "fresh").status_code == 201
            assert classify(url, "listed").status_code == 200
        finally:
            pool.stop_all()
    finally:
        s3.stop()


@pytest.mark.slow
def test_a_large_upload_streams_into_the_bucket_with_bounded_memory(
    s3: MotoS3, bucket: str, tmp_path: Path, tiny_base_dir: Path, tiny_base: BaseModel
) -> None:
    redis = connect_redis(REDIS_URL)
    redis.flushdb()  # RQ mode and no worker: the job stays queued, so its upload stays in the bucket to be checked
    env = {**s3.env(bucket), "SKILLGRAFT_BASE_MODEL": str(tiny_base_dir), "SKILLGRAFT_REDIS_URL": REDIS_URL}
    pool = processes(tmp_path, "api", env)
    try:
        url = pool.server()
        write_checkpoint(tiny_base, tmp_path / "ckpt")
        archive = padded_checkpoint_zip(tmp_path / "ckpt", tmp_path / "large.zip", LARGE_UPLOAD_MB * 2**20)
        size = archive.stat().st_size
        with RssWatcher(pool.procs[0].pid) as rss:
            response, seconds = post_streamed_upload(url, archive, timeout=600)
        assert response.status_code == 202, response.text
        job = response.json()["id"]
        assert s3.sizes(bucket, f"store/uploads/{job}/")[f"store/uploads/{job}/checkpoint.zip"] == size
        grown = rss.peak - rss.baseline
        print(
            f"\nupload of {size / 2**20:.0f} MiB into the bucket: {seconds:.1f} s, {size / 2**20 / seconds:.0f} MiB/s, "
            f"server RSS {rss.baseline / 2**20:.0f} MiB → peak {rss.peak / 2**20:.0f} MiB (+{grown / 2**20:.0f})"
        )
        assert grown < min(160 * 2**20, size / 2), f"server RSS grew by {grown / 2**20:.0f} MiB"
    finally:
        pool.stop_all()


# -- settings and notices --------------------------------------------------------------------------------------


def test_store_url_settings(tmp_path: Path) -> None:
    folder = tmp_path / "elsewhere"
    assert Settings(store_url=f"file://{folder}").store_dir == folder  # another way to say SKILLGRAFT_STORE_DIR
    assert Settings(store_url=f"file://{folder}", store_dir=folder).store_dir == folder
    with pytest.raises(ValueError, match="name different folders"):
        Settings(store_url=f"file://{folder}", store_dir=tmp_path / "other")
    settings = Settings(store_url="s3://my-bucket/some/prefix", store_dir=tmp_path / "local")
    assert settings.store_location == "s3://my-bucket/some/prefix"
    assert S3Location.parse(settings.store_url or "") == S3Location("my-bucket", "some/prefix/")
    assert S3Location.parse("s3://my-bucket") == S3Location("my-bucket", "")
    for bad in ("s3://", "s3://user:secret@bucket/x", "s3://Bad_Bucket/x", "ftp://host/x", "file://host/x"):
        with pytest.raises(ValueError):
            Settings(store_url=bad)
    assert isinstance(open_task_store(Settings(store_dir=tmp_path / "plain")), LocalTaskStore)


def test_notices_decode_only_what_a_replica_may_act_on() -> None:
    notice = TaskNotice("films", "deleted", None)
    assert TaskNotice.decode(notice.encode()) == notice
    assert TaskNotice.decode(b'{"task": "films"}') == TaskNotice("films", "written", None)  # the old worker format
    for junk in (b"not json", b"[]", b'{"task": "../x"}', b'{"task": 3}', b"{}"):
        assert TaskNotice.decode(junk) is None


@pytest.mark.usefixtures("aws")
def test_names_asked_for_and_absent_are_remembered_within_a_bound(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(object_store_module, "MAX_ABSENT_REMEMBERED", 8)
    store = object_store(bucket, tmp_path / "a")
    for index in range(30):
        assert store.stat(f"made-up-{index}") is None
    assert len(store._known) <= 8


def test_the_file_cache_keeps_within_its_byte_budget(tmp_path: Path) -> None:
    cache = FileCache(tmp_path / "cache", budget_bytes=2500)

    def add(index: int) -> Path:
        temp = cache.temp()
        temp.write_bytes(b"x" * 1000)
        return cache.admit(temp, cache.path("patches", "t", f"{index}.safetensors"))

    first, second = add(0), add(1)
    os.utime(first, (1000, 1000))
    os.utime(second, (2000, 2000))
    assert cache.get(first) == first  # used again: now the most recent of the two
    third = add(2)  # over budget: the least recently used goes
    assert (first.exists(), second.exists(), third.exists()) == (True, False, True)
    assert cache.size_bytes() == 2000


@pytest.mark.usefixtures("aws")
def test_a_stitch_job_stores_its_model_and_members_in_the_bucket(
    s3: MotoS3, bucket: str, tmp_path: Path, tiny_base_dir: Path, tiny_base: BaseModel
) -> None:
    settings = Settings(
        base_model=tiny_base_dir, store_dir=tmp_path / "local", store_url=f"s3://{bucket}/store", max_batch_wait_ms=1
    )
    with TestClient(create_app(settings)) as client:
        uploaded = {}
        for seed, name in enumerate(("alpha", "beta"), 1):
            uploaded[name] = patch_to_bytes(make_patch(tiny_base, name, fraction=0.2, seed=seed))
            assert client.put(f"/v1/tasks/{name}/patch", content=uploaded[name]).status_code == 201
        assert client.get("/v1/tasks/alpha/patch").content == uploaded["alpha"]
        response = client.post("/v1/stitch", json={"name": "combo", "tasks": ["alpha", "beta"], "eval_limit": 0})
        assert response.status_code == 202, response.text
        deadline = time.monotonic() + 60
        while (job := client.get(response.json()["url"]).json())["state"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        assert job["state"] == "succeeded", job
        assert client.get("/v1/stitch").json()["items"] == ["combo"]
        assert client.get("/v1/stitch/combo").json()["members"] == ["combo.alpha", "combo.beta"]
        model = client.get("/v1/stitch/combo/model")
        assert model.status_code == 200 and len(load(model.content)) > 0
        assert client.post("/v1/classify", json={"task": "combo.beta", "inputs": ["fine"]}).status_code == 200
    keys = s3.keys(bucket)
    assert "store/stitched/combo/model.safetensors" in keys and "store/stitched/combo/report.json" in keys
    assert {"store/tasks/combo.alpha.json", "store/tasks/combo.beta.json"} <= set(keys)
    assert not (tmp_path / "local/stitched").exists() and not (tmp_path / "local/tasks").exists()
