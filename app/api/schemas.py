"""Request and response bodies, named by role (``…Request``, ``…Public``, ``…sPublic`` for lists)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from app.core.store import TASK_NAME_PATTERN
from app.grafting.bounded_json import SURROGATE

FINGERPRINT_EXAMPLE = "sha256:3f1c0a3e5b6d…"
# A task name in a body: checked here, at the HTTP boundary, with the store's own pattern.
TaskNameField = Annotated[str, StringConstraints(pattern=TASK_NAME_PATTERN.pattern)]


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable error code.", examples=["task_not_found"])
    message: str = Field(description="What went wrong, naming the limit or the offending field.")


class ErrorResponse(BaseModel):
    error: ErrorDetail

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"error": {"code": "task_not_found", "message": "task 'sst2' not found"}}]}
    )


class HealthPublic(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyPublic(BaseModel):
    status: Literal["ready"] = "ready"
    # only with a shared object store: a replica that cannot reach it still serves what it has cached
    store: Literal["reachable", "unreachable"] | None = Field(
        None, description="Object store reachability (absent for a local store)."
    )
    store_detail: str | None = Field(None, description="Why the object store is unreachable.")


class BasePublic(BaseModel):
    name: str = Field(examples=["SmolLM2-135M-Instruct"])
    family: Literal["encoder", "decoder"] = Field(
        description="encoder (BERT family: prompts read at a mask token) or decoder (Llama family: next word)"
    )
    model_type: str = Field(examples=["llama"])
    num_parameters: int = Field(examples=[134515008])
    eligible_size: int = Field(
        description="Entries of the default eligible set (every tensor of the transformer layers); sparsity is "
        "counted against it.",
        examples=[106202880],
    )
    hidden_size: int = Field(examples=[576])
    fingerprint: str = Field(description="SHA-256 over the base's parameters; patches must name the same.")


class LimitsPublic(BaseModel):
    max_batch_size: int
    max_batch_wait_ms: float
    max_queue: int
    max_inputs_per_request: int
    max_tasks_per_request: int
    max_text_chars: int
    max_length: int = Field(description="Token length inputs are truncated to.")
    max_patch_bytes: int
    patch_cache_bytes: int


class InfoPublic(BaseModel):
    base: BasePublic
    device: str = Field(examples=["cpu"])
    limits: LimitsPublic
    engine: dict[str, Any] = Field(description="Batching policy and counters.")
    cache: dict[str, int] = Field(description="Patch cache occupancy and hit/load/eviction counters.")


class HeadPublic(BaseModel):
    mode: Literal["prompt", "classifier"]
    labels: list[str]
    template: str | None = None
    label_words: list[str] | None = None
    classifier_kind: str | None = None


class TaskPublic(BaseModel):
    name: str = Field(examples=["sst2"])
    etag: str = Field(description="Changes whenever the stored patch file is replaced.")
    size_bytes: int
    modified_at: str
    cached: bool = Field(description="Whether the patch is loaded in the in-memory cache now.")
    head: HeadPublic | None = None
    base_fingerprint: str | None = None
    method: str | None = Field(None, examples=["learned"])
    mask_size: int | None = Field(None, description="Number of grafted base entries.")
    sparsity: float | None = Field(None, description="mask_size / eligible_size.")
    eligible_rule: str | None = None
    eligible_size: int | None = None
    created_at: str | None = None
    source_checkpoint_sha256: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict, description="Metrics recorded when the patch was made.")
    stored: dict[str, Any] = Field(default_factory=dict, description="Upload record: sha256, time, source.")
    problem: str | None = Field(None, description="Why a stored patch cannot be read, if it cannot.")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "sst2",
                    "etag": "1a2b3c-17f0a9b2c3d4e5f6-4f10",
                    "size_bytes": 20240,
                    "modified_at": "2026-11-27T21:00:00+00:00",
                    "cached": True,
                    "head": {
                        "mode": "prompt",
                        "labels": ["negative", "positive"],
                        "template": "{text} It was {mask} .",
                        "label_words": ["terrible", "great"],
                    },
                    "base_fingerprint": FINGERPRINT_EXAMPLE,
                    "method": "learned",
                    "mask_size": 1063,
                    "sparsity": 0.0001,
                    "metrics": {"acc_graft": 0.86, "acc_ft": 0.88},
                }
            ]
        }
    )


class TasksPublic(BaseModel):
    items: list[TaskPublic]
    count: int


class TextPairInput(BaseModel):
    text: str = Field(examples=["A man is playing a guitar."])
    text_pair: str | None = Field(None, examples=["Someone plays music."])

    model_config = ConfigDict(extra="forbid")


class ClassifyRequest(BaseModel):
    """Name one ``task`` or several ``tasks`` (each input is classified by each task)."""

    task: TaskNameField | None = Field(None, description="One task name.", examples=["sst2"])
    tasks: list[TaskNameField] | None = Field(None, description="Several task names, instead of `task`.", min_length=1)
    inputs: list[str | TextPairInput] = Field(
        min_length=1, description="Texts, or objects with `text` and optional `text_pair`."
    )
    return_probabilities: bool = Field(False, description="Also return every label's probability.")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"task": "sst2", "inputs": ["a gripping, beautiful film", "dull and far too long"]},
                {
                    "tasks": ["sst2", "subj"],
                    "inputs": ["a gripping, beautiful film"],
                    "return_probabilities": True,
                },
                {"task": "rte", "inputs": [{"text": "A man plays a guitar.", "text_pair": "A man plays music."}]},
            ]
        },
    )

    @field_validator("inputs")
    @classmethod
    def _unicode_text(cls, inputs: list[str | TextPairInput]) -> list[str | TextPairInput]:
        # JSON can escape a lone surrogate (\ud800): a valid Python str, but no text a tokenizer can encode
        for i, item in enumerate(inputs):
            texts = [item] if isinstance(item, str) else [item.text, item.text_pair or ""]
            if any(SURROGATE.search(text) for text in texts):
                raise ValueError(f"inputs[{i}] holds a lone surrogate (\\ud800-\\udfff): not valid Unicode text")
        return inputs

    @model_validator(mode="after")
    def _one_of_task_tasks(self) -> ClassifyRequest:
        if (self.task is None) == (self.tasks is None):
            raise ValueError("give exactly one of 'task' or 'tasks'")
        return self

    def task_names(self) -> list[str]:
        return [self.task] if self.task is not None else list(self.tasks or [])


class PredictionPublic(BaseModel):
    label: str = Field(examples=["positive"])
    score: float = Field(description="Probability of `label`.", examples=[0.93])
    probabilities: dict[str, float] | None = Field(None, description="Every label's probability, on request.")
    truncated: bool = Field(
        False, description="True when the input was longer than the model's token limit and its end was cut off."
    )


class TaskPredictionsPublic(BaseModel):
    task: str
    predictions: list[PredictionPublic] = Field(description="One per input, in input order.")


class ClassifyResponse(BaseModel):
    results: list[TaskPredictionsPublic] = Field(description="One per task, in request order.")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "results": [
                        {
                            "task": "sst2",
                            "predictions": [
                                {"label": "positive", "score": 0.93},
                                {"label": "negative", "score": 0.81},
                            ],
                        }
                    ]
                }
            ]
        }
    )
