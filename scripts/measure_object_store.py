"""Measure the object-store path (the figures in docs/operations.md, "Running across machines").

    python scripts/measure_object_store.py [--base all-minilm-l6-v2] [--upload-mb 540] [--jobs 3]

Everything runs on this machine over loopback: moto's S3 server (in this process), Redis at
``$SKILLGRAFT_TEST_OBJECT_STORE_REDIS_URL`` (db 15 by default, flushed), two API replicas and one RQ worker on the
tiny test BERT. It prints one JSON object:

* ``job_to_other_replica_s``: from the moment a job reads "succeeded" (polled every 10 ms through replica 2) to
  the first classify on replica 2 answered 200 (it fetches the pointer and the patch from the bucket);
* ``cold_load``: ``TaskRegistry.get`` of a patch not cached in memory, from a local folder vs from the bucket with
  an empty file cache vs from the bucket with the patch in the file cache, for patches of the ``--base`` model;
* ``upload``: a ``--upload-mb`` synthetic checkpoint (a zipped tiny checkpoint padded with random bytes) POSTed
  through the API into the bucket, with the server's VmRSS before and at its peak, and ``put_upload`` alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from app.core.object_store import ObjectTaskStore, S3Location, S3Objects  # noqa: E402
from app.core.store import LocalTaskStore  # noqa: E402
from app.engine.engine import EngineConfig  # noqa: E402
from app.engine.service import InferenceService, ServiceLimits  # noqa: E402
from app.grafting.base import load_base  # noqa: E402
from app.grafting.patch import patch_to_bytes  # noqa: E402
from app.jobs.service import connect_redis  # noqa: E402
from tests.utils.http import JOB_SPEC, classify, upload  # noqa: E402
from tests.utils.object_store import (  # noqa: E402
    AWS_ENV,
    MotoS3,
    RssWatcher,
    bucket_name,
    padded_checkpoint_zip,
    post_streamed_upload,
)
from tests.utils.processes import Processes  # noqa: E402
from tests.utils.tiny import load_tiny, make_patch, make_tiny_bert  # noqa: E402
from tests.utils.uploads import write_checkpoint  # noqa: E402

REDIS_URL = os.environ.get("SKILLGRAFT_TEST_OBJECT_STORE_REDIS_URL", "redis://127.0.0.1:6379/15")


def timed(call: object, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return times


def summary(times: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(times) * 1000, 2), "max_ms": round(max(times) * 1000, 2)}


def cold_load(s3: MotoS3, base_name: str, work: Path, repeats: int) -> dict[str, object]:
    base = load_base(base_name)
    bucket = s3.create_bucket(bucket_name("cold"))
    results: dict[str, object] = {"base": base.name}
    for fraction in (1e-4, 1e-2):
        patch = make_patch(base, "cold", fraction=fraction)
        data = patch_to_bytes(patch)
        local = LocalTaskStore(work / f"local-{fraction}")
        remote = ObjectTaskStore(S3Objects(S3Location.parse(f"s3://{bucket}/f{fraction}")), work / f"remote-{fraction}")
        row: dict[str, object] = {"patch_bytes": len(data), "entries": patch.mask_size}
        for label, store in (("local_disk", local), ("object_store", remote)):
            store.write_patch("cold", data, lambda path: None)
            service = InferenceService(base, store, ServiceLimits(), EngineConfig(), 1 << 30, 128)
            try:
                registry = service.registry

                def load(registry: object = registry, store: object = store) -> None:
                    registry._forget("cold")  # type: ignore[attr-defined]
                    if isinstance(store, ObjectTaskStore):
                        shutil.rmtree(store.cache.root / "patches", ignore_errors=True)
                        store.invalidate("cold")
                    registry.get("cold")  # type: ignore[attr-defined]

                row[label] = summary(timed(load, repeats))
                if isinstance(store, ObjectTaskStore):

                    def from_file_cache(registry: object = registry) -> None:
                        registry._forget("cold")  # type: ignore[attr-defined]
                        registry.get("cold")  # type: ignore[attr-defined]

                    row["object_store_file_cached"] = summary(timed(from_file_cache, repeats))
            finally:
                service.close()
        results[f"fraction_{fraction:g}"] = row
    return results


def replicas_in_step(s3: MotoS3, tiny_dir: Path, work: Path, jobs: int) -> dict[str, object]:
    redis = connect_redis(REDIS_URL)
    redis.flushdb()
    bucket = s3.create_bucket(bucket_name("step"))
    env = {
        **s3.env(bucket),
        "SKILLGRAFT_BASE_MODEL": str(tiny_dir),
        "SKILLGRAFT_REDIS_URL": REDIS_URL,
        "SKILLGRAFT_MAX_BATCH_WAIT_MS": "1",
    }
    pools = []
    for name in ("api-1", "api-2", "worker"):
        (work / name).mkdir(parents=True, exist_ok=True)
        pools.append(Processes({**env, "SKILLGRAFT_STORE_DIR": str(work / name)}, work / name))
    tiny = load_tiny(tiny_dir)
    try:
        first, second = pools[0].server(), pools[1].server()
        pools[2].worker()
        checkpoint = write_checkpoint(tiny, work / "ckpt")
        delays, warm = [], []
        for index in range(jobs):
            response = upload(first, checkpoint, {**JOB_SPEC, "task": f"films-{index}"})
            job_url = f"{second}/v1/jobs/{response.json()['id']}"
            while (state := httpx.get(job_url).json()["state"]) not in ("succeeded", "failed"):
                time.sleep(0.01)
            succeeded_at = time.perf_counter()
            assert state == "succeeded"
            answer = classify(second, f"films-{index}")
            assert answer.status_code == 200, answer.text
            delays.append(time.perf_counter() - succeeded_at)
            warm.append(min(timed(lambda index=index: classify(second, f"films-{index}"), 5)))
        return {
            "job_to_other_replica_s": [round(d, 3) for d in delays],
            "warm_classify_s": [round(w, 3) for w in warm],
        }
    finally:
        for pool in pools:
            pool.stop_all()


def large_upload(s3: MotoS3, tiny_dir: Path, work: Path, megabytes: int) -> dict[str, object]:
    redis = connect_redis(REDIS_URL)
    redis.flushdb()
    bucket = s3.create_bucket(bucket_name("upload"))
    env = {**s3.env(bucket), "SKILLGRAFT_BASE_MODEL": str(tiny_dir), "SKILLGRAFT_REDIS_URL": REDIS_URL}
    (work / "api").mkdir(parents=True, exist_ok=True)
    pool = Processes({**env, "SKILLGRAFT_STORE_DIR": str(work / "api")}, work / "api")
    tiny = load_tiny(tiny_dir)
    write_checkpoint(tiny, work / "ckpt-large")
    archive = padded_checkpoint_zip(work / "ckpt-large", work / "large.zip", megabytes * 2**20)
    size = archive.stat().st_size
    try:
        url = pool.server()
        with RssWatcher(pool.procs[0].pid) as rss:
            response, seconds = post_streamed_upload(url, archive, timeout=1800)
        assert response.status_code == 202, response.text
    finally:
        pool.stop_all()
    # the bucket leg alone: put_upload of the same file from this process
    store = ObjectTaskStore(S3Objects(S3Location.parse(f"s3://{bucket}/direct")), work / "direct")
    folder = work / "direct-upload"
    folder.mkdir()
    shutil.copy(archive, folder / "checkpoint.zip")
    started = time.perf_counter()
    store.put_upload("f" * 32, folder)
    direct = time.perf_counter() - started
    return {
        "bytes": size,
        "through_api_s": round(seconds, 2),
        "through_api_mib_s": round(size / 2**20 / seconds, 1),
        "server_rss_baseline_mib": round(rss.baseline / 2**20),
        "server_rss_peak_mib": round(rss.peak / 2**20),
        "put_upload_only_s": round(direct, 2),
        "put_upload_only_mib_s": round(size / 2**20 / direct, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="all-minilm-l6-v2", help="base for the cold-load patches")
    parser.add_argument("--upload-mb", type=int, default=540)
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    os.environ.update({**AWS_ENV})
    s3 = MotoS3()
    s3.start()
    os.environ["AWS_ENDPOINT_URL"] = s3.endpoint
    work = Path(tempfile.mkdtemp(prefix="measure-object-store-"))
    try:
        tiny_dir = make_tiny_bert(work / "tiny")
        os.environ.setdefault("SKILLGRAFT_BASE_MODEL", str(tiny_dir))
        report = {
            "cold_load": cold_load(s3, args.base, work / "cold", args.repeats),
            "replicas": replicas_in_step(s3, tiny_dir, work / "step", args.jobs),
            "upload": large_upload(s3, tiny_dir, work / "upload", args.upload_mb),
        }
        print(json.dumps(report, indent=2))
    finally:
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
