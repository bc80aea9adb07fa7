"""The job system below HTTP: submission checks, the in-process runner end to end, cancellation, Redis store."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from app.config import Settings
from app.core.errors import LimitExceeded
from app.core.store import LocalTaskStore
from app.grafting.base import BaseModel, EligibleRule
from app.grafting.checkpoint import save_checkpoint
from app.grafting.localize import LocalizeConfig
from app.grafting.patch import load_patch, validate_patch
from app.jobs.context import JobContext
from app.jobs.errors import CheckpointFromOtherBase, InvalidUpload, TaskExists, UnsupportedUpload
from app.jobs.models import JobRecord, JobState, TaskSpec
from app.jobs.runner import InProcessRunner
from app.jobs.service import JobService, build_job_service, connect_redis
from app.jobs.store import FileJobStore, RedisJobStore
from tests.utils.planted import SPEC, planted_task
from tests.utils.tiny import load_tiny
from tests.utils.uploads import jsonl, spec, stage, write_checkpoint

REDIS_URL = os.environ.get("SKILLGRAFT_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")


@pytest.fixture
def service(tiny_base: BaseModel, tiny_base_dir: Path, tmp_path: Path) -> JobService:
    settings = Settings(base_model=tiny_base_dir, store_dir=tmp_path / "store", max_upload_bytes=20 * 2**20)
    svc = build_job_service(settings, tiny_base, LocalTaskStore(settings.store_dir))
    yield svc
    svc.runner.close()


@pytest.fixture
def checkpoint(tiny_base: BaseModel, tmp_path: Path) -> Path:
    return write_checkpoint(tiny_base, tmp_path / "ckpt")


def wait_for(service: JobService, job_id: str, timeout: float = 60) -> JobRecord:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = service.get(job_id)
        if record.state.finished:
            return record
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {service.get(job_id).state} after {timeout}s")


def leftovers(service: JobService) -> list[str]:
    return [p.name for p in service.uploads_dir.iterdir()]


def leftovers_after_success(service: JobService, timeout: float = 10) -> list[str]:
    """Uploads left once a succeeded job has cleaned up: the job removes its upload just after it records success,
    so a test that saw the success may look before that moment on a loaded machine."""
    deadline = time.monotonic() + timeout
    while (left := leftovers(service)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def test_in_process_job_end_to_end(service: JobService, checkpoint: Path, tiny_base: BaseModel) -> None:
    record, created = service.submit(stage(service, checkpoint, jsonl(), jsonl(8)), spec())
    assert created and record.state == JobState.queued
    done = wait_for(service, record.id)
    assert done.state == JobState.succeeded, done.error
    assert done.result and done.result["task"] == "tiny" and done.result["mask_size"] > 0
    assert set(done.timings) >= {"load", "localize", "evaluate", "write"}
    assert done.progress.phase == "succeeded"
    patch = load_patch(service.tasks.patch_path("tiny"))
    validate_patch(patch, tiny_base.parameters, tiny_base.fingerprint, tiny_base.hidden_size)
    # 16 + 8 uploaded examples are too few to hold any out: the figures say they are selection-set figures
    assert patch.metrics["evaluated_on"] == "selection" and "evaluation_note" in patch.metrics
    assert patch.metrics["examples"] == 24 and "acc_graft" in patch.metrics
    assert patch.extra["job"] == record.id
    assert leftovers_after_success(service) == [], "the upload is removed after success"
    # resubmitting the same content returns the existing job, not a new one
    again, created = service.submit(stage(service, checkpoint, jsonl(), jsonl(8)), spec(replace=True))
    assert (again.id, created) == (record.id, False)


def test_name_taken_needs_replace(service: JobService, checkpoint: Path) -> None:
    first, _ = service.submit(stage(service, checkpoint, jsonl()), spec("taken"))
    assert wait_for(service, first.id).state == JobState.succeeded
    with pytest.raises(TaskExists, match="replace=true"):
        service.submit(stage(service, checkpoint, jsonl(20)), spec("taken"))
    second, created = service.submit(stage(service, checkpoint, jsonl(20)), spec("taken", replace=True))
    assert created and wait_for(service, second.id).state == JobState.succeeded
    assert leftovers_after_success(service) == []


def _checkpoint_with(base: BaseModel, tmp_path: Path, name: str, edit) -> Path:  # type: ignore[no-untyped-def]
    tensors = {k: v.clone() for k, v in base.parameters.items()}
    edit(tensors)
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path))
    return path


def test_bad_uploads_are_refused_and_leave_nothing(
    service: JobService, checkpoint: Path, tiny_base: BaseModel, tmp_path: Path
) -> None:
    def shape(t: dict[str, torch.Tensor]) -> None:
        t["encoder.layer.0.output.dense.weight"] = torch.zeros(2, 2)

    def nan(t: dict[str, torch.Tensor]) -> None:
        t["encoder.layer.1.output.dense.bias"][0] = float("nan")

    def dtype(t: dict[str, torch.Tensor]) -> None:
        t["encoder.layer.1.output.dense.bias"] = t["encoder.layer.1.output.dense.bias"].double()

    cases = [
        (
            UnsupportedUpload,
            "pickle",
            stage(service, b"\x80\x02}q\x00.", jsonl(), checkpoint_name="checkpoint.safetensors"),
        ),
        (
            InvalidUpload,
            r"output.dense.weight: shape \(2, 2\)",
            stage(service, _checkpoint_with(tiny_base, tmp_path, "s", shape), jsonl()),
        ),
        (InvalidUpload, "NaN or Inf", stage(service, _checkpoint_with(tiny_base, tmp_path, "n", nan), jsonl())),
        (
            InvalidUpload,
            "dtype torch.float64",
            stage(service, _checkpoint_with(tiny_base, tmp_path, "d", dtype), jsonl()),
        ),
        (InvalidUpload, "train: .*no examples", stage(service, checkpoint, b"")),
        (InvalidUpload, "train: .*line 1: not valid JSON", stage(service, checkpoint, b"{oops")),
        (
            InvalidUpload,
            "train: .*label 'maybe' is not one of",
            stage(service, checkpoint, jsonl(labels=("neg", "maybe"))),
        ),
        (InvalidUpload, "dev: .*'label' is missing", stage(service, checkpoint, jsonl(), b'{"text": "x"}')),
    ]
    for error, message, staged in cases:
        with pytest.raises(error, match=message):
            service.submit(staged, spec(labels=["neg", "pos"]))
    with pytest.raises(InvalidUpload, match="label words|label word"):
        service.submit(stage(service, checkpoint, jsonl()), spec(label_words=["terrible", "zzzqqq"]))
    with pytest.raises(LimitExceeded, match="max_upload_bytes"):
        stage(service, b"x" * (21 * 2**20), jsonl())
    assert [p for p in leftovers(service) if not p.startswith(".incoming")] == []
    assert service.tasks.list_names() == []
    assert service.list() == []


def test_classifier_head_must_match_labels(service: JobService, tiny_base: BaseModel, tmp_path: Path) -> None:
    ckpt = write_checkpoint(tiny_base, tmp_path / "cls", mode="classifier")
    with pytest.raises(InvalidUpload, match="2 outputs, but 3 labels"):
        service.submit(
            stage(service, ckpt, jsonl(labels=("a", "b", "c"))), spec(mode="classifier", labels=["a", "b", "c"])
        )
    record, _ = service.submit(stage(service, ckpt, jsonl()), spec("cls", mode="classifier"))
    done = wait_for(service, record.id)
    assert done.state == JobState.succeeded, done.error
    assert load_patch(service.tasks.patch_path("cls")).spec.mode == "classifier"


def test_cancel_a_running_job(service: JobService, checkpoint: Path) -> None:
    record, _ = service.submit(stage(service, checkpoint, jsonl(64)), spec("slow", steps=400))
    deadline = time.monotonic() + 30
    while service.get(record.id).state != JobState.running and time.monotonic() < deadline:
        time.sleep(0.05)
    cancelled = service.cancel(record.id)
    assert cancelled.state == JobState.cancelled
    assert wait_for(service, record.id).state == JobState.cancelled
    time.sleep(0.5)
    assert service.get(record.id).state == JobState.cancelled
    assert service.tasks.stat("slow") is None


@pytest.fixture
def redis_store() -> RedisJobStore:
    redis = connect_redis(REDIS_URL)
    try:
        redis.ping()
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.fail(f"Redis at {REDIS_URL} is not answering ({exc}); scripts/test.sh starts one")
    redis.flushdb()
    return RedisJobStore(redis)


def test_redis_job_store_round_trip(redis_store: RedisJobStore) -> None:
    record = JobRecord(id="abc123", task="t", spec=spec("t"))
    assert redis_store.create(record) and not redis_store.create(record)
    redis_store.update("abc123", state=JobState.running, progress={"step": 3, "total": 10})
    got = redis_store.get("abc123")
    assert got is not None and got.state == JobState.running and got.progress.step == 3
    redis_store.update("abc123", state=JobState.cancelled)
    redis_store.update("abc123", state=JobState.running, progress={"step": 4})  # a late report: ignored
    got = redis_store.get("abc123")
    assert got is not None and got.state == JobState.cancelled and got.progress.step == 3
    assert [r.id for r in redis_store.list()] == ["abc123"]
    assert redis_store.list(JobState.running) == []
    redis_store.delete("abc123")
    assert redis_store.get("abc123") is None


def test_concurrent_uploads_of_one_name(service: JobService, checkpoint: Path) -> None:
    """Two different uploads race for one task name: exactly one job, the other gets TaskExists (409)."""
    import threading

    barrier = threading.Barrier(2)
    outcomes: list[object] = []

    def submit(rows: int) -> None:
        staged = stage(service, checkpoint, jsonl(rows))
        barrier.wait()
        try:
            outcomes.append(service.submit(staged, spec("race", steps=50))[0])
        except TaskExists as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=submit, args=(rows,)) for rows in (16, 18)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    records = [o for o in outcomes if isinstance(o, JobRecord)]
    refused = [o for o in outcomes if isinstance(o, TaskExists)]
    assert len(records) == 1 and len(refused) == 1, outcomes
    assert wait_for(service, records[0].id).state == JobState.succeeded
    assert [r.id for r in service.list()] == [records[0].id]


def test_queued_job_limit(tiny_base: BaseModel, tiny_base_dir: Path, tmp_path: Path, checkpoint: Path) -> None:
    from app.core.errors import Overloaded

    settings = Settings(base_model=tiny_base_dir, store_dir=tmp_path / "store", max_queued_jobs=1)
    svc = build_job_service(settings, tiny_base, LocalTaskStore(settings.store_dir))
    try:
        first, _ = svc.submit(stage(svc, checkpoint, jsonl(64)), spec("one", steps=300))
        deadline = time.monotonic() + 30
        while svc.get(first.id).state != JobState.running and time.monotonic() < deadline:
            time.sleep(0.02)
        second, _ = svc.submit(stage(svc, checkpoint, jsonl(64)), spec("two", steps=300))
        with pytest.raises(Overloaded, match="max_queued_jobs=1"):
            svc.submit(stage(svc, checkpoint, jsonl(64)), spec("three", steps=300))
        for record in (first, second):
            svc.cancel(record.id)
    finally:
        svc.runner.close()


def test_a_learned_job_with_default_settings_finds_the_planted_skill(tiny_base_dir: Path, tmp_path: Path) -> None:
    """Through the job path (upload → validation → runner → pipeline → store) with the spec's default localization
    settings: the learned mask leaves top-k, which holds only a decoy, and scores at least as well."""
    base = load_tiny(tiny_base_dir)
    ft, planted, examples = planted_task(base)
    eligible = sum(base.parameters[n].numel() for n in EligibleRule().select(base.parameters))
    sparsity = (16 * base.hidden_size + 0.5) / eligible  # γ_base = exactly the decoy rows
    folder = save_checkpoint(tmp_path / "ckpt", base, ft, SPEC)
    settings = Settings(base_model=tiny_base_dir, store_dir=tmp_path / "store")
    tasks = LocalTaskStore(settings.store_dir)
    jobs = FileJobStore(settings.store_dir / "jobs")
    context = JobContext(lambda: base, tasks, jobs, settings.store_dir / "uploads")
    service = JobService(settings, base, tasks, jobs, InProcessRunner(context))
    rows = [{"text": e.text, "label": SPEC.labels[e.label]} for e in examples]
    train = "\n".join(json.dumps(r) for r in rows[:16]).encode()
    dev = "\n".join(json.dumps(r) for r in rows[16:]).encode()
    try:
        records = {}
        for method in ("learned", "topk"):
            upload = stage(service, folder / "model.safetensors", train, dev)
            task_spec = TaskSpec(
                task=method,
                mode="prompt",
                labels=list(SPEC.labels),
                template=SPEC.template,
                label_words=list(SPEC.label_words or ()),
                method=method,
                sparsity=sparsity,
            )
            assert task_spec.steps == LocalizeConfig().steps and task_spec.max_step == LocalizeConfig().max_step
            records[method] = wait_for(service, service.submit(upload, task_spec)[0].id)
            assert records[method].state == JobState.succeeded, records[method].error
    finally:
        service.runner.close()
    learned, topk = (load_patch(tasks.patch_path(name)) for name in ("learned", "topk"))
    learned_entries = {(n, int(i)) for n, (idx, _) in learned.entries.items() for i in idx}
    topk_entries = {(n, int(i)) for n, (idx, _) in topk.entries.items() for i in idx}
    assert learned_entries != topk_entries and learned_entries - topk_entries <= planted
    assert learned.metrics["acc_graft"] >= topk.metrics["acc_graft"]
    assert learned.metrics["acc_graft"] == 1.0 and topk.metrics["acc_graft"] < 1.0


def test_a_checkpoint_from_another_base_is_a_409_naming_both(
    service: JobService, tiny_base: BaseModel, tmp_path: Path
) -> None:
    folder = tmp_path / "other"
    write_checkpoint(tiny_base, folder)
    config = json.loads((folder / "config.json").read_text())
    config["skillgraft"]["base_fingerprint"] = "sha256:" + "ab" * 32
    (folder / "config.json").write_text(json.dumps(config))
    archive = shutil.make_archive(str(tmp_path / "other"), "zip", folder)
    with pytest.raises(CheckpointFromOtherBase, match="sha256:abab.*this server runs sha256:"):
        service.submit(stage(service, Path(archive), jsonl(), checkpoint_name="checkpoint.zip"), spec())
    assert leftovers(service) == []
