"""The one schema of a patch's JSON metadata (``skillgraft.meta``), checked wherever a patch is read.

Applied when a patch is parsed (``load_patch``: uploads, jobs, the engine) and when only its header is read (the
task store, for listings), so a patch that another process wrote with wrong types is refused as malformed instead of
failing later, far from the cause, in a response model or a tokenizer.

Strict on what the service reads back (types of the fields it shows or uses: no string where a number belongs, no
integer labels), liberal where writers differ: unknown top-level keys are kept, ``metrics`` and ``extra`` are free-form
JSON (``GraftPatch.metadata`` and the job/evaluation writers put numbers, strings, lists and objects there), except
that ``metrics.mask``, when present, must have the layout ``GET /v1/skills/{name}/mask`` serves.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    NonNegativeInt,
    ValidationError,
    field_validator,
    model_validator,
)

from app.grafting.bounded_json import BoundedJSONError, check_tree, loads_bounded
from app.grafting.heads import HeadSpec

# Our writers nest about six levels (metrics.reliability.ft[i].field); anything far deeper is not a patch of ours.
MAX_METADATA_DEPTH = 20
# Our metadata is a few KiB; listings return it for every task, so a huge one is refused rather than served.
MAX_METADATA_BYTES = 4 * 2**20
# Problems named in one error message (the rest are summarised by their count).
MAX_PROBLEMS_SHOWN = 3


class PatchMetadataError(ValueError):
    """Metadata that does not fit the schema; the message names the offending fields."""


class HeadMetadata(BaseModel):
    """The head as ``HeadSpec.to_json`` writes it; the spec's own rules (label words per label, template markers,
    distinct labels) are checked by building the spec."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    mode: Literal["prompt", "classifier"]
    labels: list[str] = Field(min_length=2)
    template: str | None = None
    label_words: list[str] | None = None
    classifier_kind: str | None = None

    def to_spec(self) -> HeadSpec:
        return HeadSpec.from_json(self.model_dump())

    @model_validator(mode="after")
    def _valid_spec(self) -> HeadMetadata:
        # HeadError is a ValueError: pydantic reports it as a validation error of the head
        self.to_spec()
        return self


class MaskLayout(BaseModel):
    """``metrics.mask`` as the evaluator writes it (``mask_breakdown`` plus eligible size and sparsity)."""

    model_config = ConfigDict(strict=True, extra="allow")

    size: NonNegativeInt | None = None
    per_layer: dict[str, NonNegativeInt] | None = None
    per_module_type: dict[str, NonNegativeInt] | None = None
    eligible_size: NonNegativeInt | None = None
    sparsity: float | None = None


class PatchMetadata(BaseModel):
    """What ``GraftPatch.metadata`` writes. ``task``, ``base_fingerprint`` and ``head`` are required."""

    model_config = ConfigDict(strict=True, extra="allow")

    format_version: int | None = None
    task: str
    base_fingerprint: str
    head: HeadMetadata
    eligible_rule: str = "layers"
    eligible_size: NonNegativeInt = 0
    mask_size: NonNegativeInt | None = None
    sparsity: float | None = None
    method: str = "manual"
    source_checkpoint_sha256: str | None = None
    created_at: str | None = None
    metrics: dict[str, JsonValue] = Field(default_factory=dict)
    extra: dict[str, JsonValue] = Field(default_factory=dict)

    @field_validator("metrics")
    @classmethod
    def _mask_layout(cls, metrics: dict[str, JsonValue]) -> dict[str, JsonValue]:
        if "mask" in metrics:
            try:
                MaskLayout.model_validate(metrics["mask"])
            except ValidationError as exc:
                raise ValueError(_problems(exc, "mask")) from None
        return metrics


def _problems(exc: ValidationError, prefix: str = "") -> str:
    errors = exc.errors(include_url=False, include_input=False)
    shown = []
    for error in errors[:MAX_PROBLEMS_SHOWN]:
        where = ".".join(str(part) for part in (prefix, *error.get("loc", ())) if part != "") or "metadata"
        shown.append(f"{where}: {error.get('msg', 'invalid')}")
    if len(errors) > MAX_PROBLEMS_SHOWN:
        shown.append(f"and {len(errors) - MAX_PROBLEMS_SHOWN} more")
    return "; ".join(shown)


def head_spec_from_json(raw: Any) -> HeadSpec:
    """A head description (a patch's ``head``, a checkpoint's ``skillgraft.head``) checked by the same schema."""
    try:
        return HeadMetadata.model_validate(raw).to_spec()
    except ValidationError as exc:
        raise PatchMetadataError(f"head description is malformed: {_problems(exc)}") from None


def validate_patch_metadata(raw: Any) -> PatchMetadata:
    """``raw`` (already parsed JSON) checked against the schema, or :class:`PatchMetadataError`."""
    try:
        check_tree(raw, MAX_METADATA_DEPTH)
    except BoundedJSONError as exc:
        raise PatchMetadataError(f"patch metadata is malformed: {exc}") from None
    if not isinstance(raw, dict):
        raise PatchMetadataError(f"patch metadata must be a JSON object, not {_json_type(raw)}")
    try:
        return PatchMetadata.model_validate(raw)
    except ValidationError as exc:
        raise PatchMetadataError(f"patch metadata is malformed: {_problems(exc)}") from None


def parse_patch_metadata(text: str | bytes) -> tuple[dict[str, Any], PatchMetadata]:
    """The metadata JSON as written (for display) and as checked (for use), or :class:`PatchMetadataError`."""
    try:
        raw = loads_bounded(text, max_depth=MAX_METADATA_DEPTH, max_bytes=MAX_METADATA_BYTES)
    except BoundedJSONError as exc:
        raise PatchMetadataError(f"patch metadata is malformed: {exc}") from None
    return raw, validate_patch_metadata(raw)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")
