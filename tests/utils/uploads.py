"""Upload factories for job tests: a tiny fine-tuned checkpoint and JSONL data written like a client would."""

from __future__ import annotations

import io
import json
from pathlib import Path

from app.grafting.base import BaseModel
from app.grafting.checkpoint import save_checkpoint
from app.grafting.heads import HeadSpec, init_classifier_head
from app.jobs.models import TaskSpec
from app.jobs.service import JobService, Staging
from tests.utils.tiny import random_finetune

PROMPT = HeadSpec("prompt", ("neg", "pos"), "{text} It was {mask} .", ("terrible", "great"))


def write_checkpoint(base: BaseModel, folder: Path, mode: str = "prompt", seed: int = 1) -> Path:
    body = random_finetune(base, seed=seed)
    if mode == "prompt":
        save_checkpoint(folder, base, body, PROMPT)
    else:
        spec = HeadSpec("classifier", ("neg", "pos"), classifier_kind="bert-pooler")
        head = init_classifier_head("bert-pooler", 2, base.hidden_size, base.extra_weights, seed)
        save_checkpoint(folder, base, body, spec, head)
    return folder / "model.safetensors"


def jsonl(rows: int = 16, labels: tuple[str, ...] = ("neg", "pos")) -> bytes:
    words = ("awful", "great")
    return "\n".join(
        json.dumps({"text": f"a {words[i % 2]} film, take {i}", "label": labels[i % len(labels)]}) for i in range(rows)
    ).encode()


def stage(
    service: JobService,
    checkpoint: bytes | Path,
    train: bytes,
    dev: bytes | None = None,
    checkpoint_name: str = "checkpoint.safetensors",
) -> Staging:
    staging = service.staging()
    data = checkpoint.read_bytes() if isinstance(checkpoint, Path) else checkpoint
    staging.save(checkpoint_name, io.BytesIO(data))
    staging.save("train.jsonl", io.BytesIO(train))
    if dev is not None:
        staging.save("dev.jsonl", io.BytesIO(dev))
    return staging


def spec(task: str = "tiny", **fields: object) -> TaskSpec:
    """A spec for a bare safetensors upload (no config.json), so the prompt head is spelled out."""
    defaults: dict[str, object] = {"steps": 2, "sparsity": 0.01}
    if fields.get("mode", "prompt") == "prompt":
        defaults.update(mode="prompt", template=PROMPT.template, label_words=list(PROMPT.label_words or ()))
    return TaskSpec(task=task, **{**defaults, **fields})  # type: ignore[arg-type]
