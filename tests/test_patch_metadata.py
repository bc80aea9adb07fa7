"""The one schema of patch metadata: what our writers put there passes, wrong types do not, and whatever JSON a
patch carries in any field, the API answers 2xx or 4xx and keeps listing the other tasks."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from app.config import Settings
from app.grafting.base import BaseModel
from app.grafting.calibration import reliability_bins
from app.grafting.evaluate import mask_breakdown, patch_counts
from app.grafting.patch import load_patch, patch_to_bytes
from app.grafting.patch_metadata import (
    MAX_METADATA_DEPTH,
    PatchMetadataError,
    parse_patch_metadata,
    validate_patch_metadata,
)
from app.main import create_app
from tests.utils.tiny import make_patch

OCTET = {"Content-Type": "application/octet-stream"}


def with_change(meta: dict[str, Any], dotted: str, value: object) -> dict[str, Any]:
    """A deep copy of ``meta`` with ``value`` at ``dotted`` (``head.labels``, ``metrics.mask.per_layer``, …)."""
    changed = json.loads(json.dumps(meta))
    *path, last = dotted.split(".")
    target = changed
    for key in path:
        if not isinstance(target.get(key), dict):
            target[key] = {}
        target = target[key]
    target[last] = value
    return changed


def nested(depth: int) -> object:
    value: object = "leaf"
    for _ in range(depth - 1):
        value = {"a": value}
    return value


@pytest.fixture(scope="module")
def written(tiny_base: BaseModel) -> dict[str, Any]:
    """Metadata as the writers write it: ``GraftPatch.metadata`` with an evaluation report's metrics and a job's
    extras (reliability rows with nulls, the mask layout, a NaN, a stitched member's list)."""
    import torch

    patch = make_patch(tiny_base, "written", mode="classifier", fraction=0.002)
    patch.metrics = {
        "acc_pre": 0.5,
        "acc_ft": 0.75,
        "ratio": float("nan"),
        "evaluated_on": "dev",
        "reliability": {"ft": reliability_bins(torch.randn(8, 2), [0, 1] * 4)},
        "mask": {
            **mask_breakdown(patch_counts(patch)),
            "eligible_size": patch.eligible_size,
            "sparsity": patch.sparsity,
        },
        "stitched_from": ["a", "b"],
    }
    patch.extra = {"job": "0" * 32, "localize": {"method": "learned", "timings": {"step": 0.1}, "config": {"k": 1}}}
    patch.source_checkpoint_sha256 = "ab" * 32
    return json.loads(json.dumps(patch.metadata()))


def test_what_the_writers_write_passes(written: dict[str, Any], tiny_base: BaseModel, tmp_path: Path) -> None:
    checked = validate_patch_metadata(written)
    assert checked.head.to_spec().mode == "classifier" and checked.metrics["evaluated_on"] == "dev"
    raw, parsed = parse_patch_metadata(json.dumps(written))
    assert raw["metrics"]["mask"] == written["metrics"]["mask"] and math.isnan(parsed.metrics["ratio"])  # type: ignore[arg-type]
    # older or foreign writers: optional fields absent, unknown keys kept
    minimal = {key: written[key] for key in ("task", "base_fingerprint", "head")} | {"future_field": [1]}
    assert validate_patch_metadata(minimal).eligible_rule == "layers"
    assert parse_patch_metadata(json.dumps(minimal))[0]["future_field"] == [1]
    # a patch written by the library round-trips through load_patch
    path = tmp_path / "roundtrip.safetensors"
    path.write_bytes(patch_to_bytes(make_patch(tiny_base, "rt")))
    assert load_patch(path).task == "rt"


@pytest.mark.parametrize(
    ("dotted", "value", "where"),
    [
        ("mask_size", "12", "mask_size"),
        ("mask_size", True, "mask_size"),
        ("sparsity", "0.1", "sparsity"),
        ("eligible_size", -1, "eligible_size"),
        ("source_checkpoint_sha256", {"sha": 1}, "source_checkpoint_sha256"),
        ("head.labels", [1, 2], "head.labels.0"),
        ("head.labels", ["same", "same"], "distinct"),
        ("head.mode", "regression", "head.mode"),
        ("head", ["classifier"], "head"),
        ("metrics", ["acc", 1], "metrics"),
        ("metrics.mask", "layer 3", "mask"),
        ("metrics.mask.per_layer", {"0": "many"}, "mask.per_layer.0"),
        ("metrics.mask.per_module_type", [1, 2], "mask.per_module_type"),
        ("extra", nested(MAX_METADATA_DEPTH + 5), "nested deeper"),
        ("task", None, "task"),
        ("created_at", 20261127, "created_at"),
        ("method", ["learned"], "method"),
    ],
)
def test_wrong_types_are_refused_naming_the_field(
    written: dict[str, Any], dotted: str, value: object, where: str
) -> None:
    with pytest.raises(PatchMetadataError, match="malformed") as caught:
        validate_patch_metadata(with_change(written, dotted, value))
    assert where in str(caught.value)


def test_non_objects_and_deep_or_huge_text_are_refused() -> None:
    for text in ("[]", "5", '"meta"', "null", "[" * 100_000, "{" * 50 + "}" * 50, '{"task": "\\ud800"}'):
        with pytest.raises(PatchMetadataError):
            parse_patch_metadata(text)
    with pytest.raises(PatchMetadataError, match="bytes"):
        parse_patch_metadata('{"pad": "' + "x" * (5 * 2**20) + '"}')


# -- fuzzing through the API --------------------------------------------------------------------------------------

FIELDS = [
    "format_version",
    "task",
    "base_fingerprint",
    "head",
    "head.mode",
    "head.labels",
    "head.template",
    "head.label_words",
    "head.classifier_kind",
    "eligible_rule",
    "eligible_size",
    "mask_size",
    "sparsity",
    "method",
    "source_checkpoint_sha256",
    "created_at",
    "metrics",
    "metrics.acc_graft",
    "metrics.mask",
    "metrics.mask.per_layer",
    "metrics.mask.per_module_type",
    "metrics.mask.size",
    "extra",
    "extra.localize",
]
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["\ud800", "{text} {mask}", "prompt", "classifier", "0"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=16,
) | st.integers(1, 60).map(nested)


@pytest.fixture(scope="module")
def api(tiny_base: BaseModel, tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """A service holding one good task ("ok"), which must stay listed and usable whatever "fz" holds."""
    store = tmp_path_factory.mktemp("fuzz-store")
    app = create_app(Settings(base_model=tiny_base_dir, store_dir=store, max_batch_wait_ms=1.0))  # type: ignore[arg-type]
    with TestClient(app) as client:
        good = patch_to_bytes(make_patch(tiny_base, "ok", fraction=0.002))
        assert client.put("/v1/tasks/ok/patch", content=good, headers=OCTET).status_code == 201
        yield client


@pytest.fixture(scope="module")
def tensors_and_meta(tiny_base: BaseModel) -> tuple[dict[str, Any], dict[str, Any]]:
    patch = make_patch(tiny_base, "fz", fraction=0.002)
    tensors = {}
    for name, (indices, values) in patch.entries.items():
        tensors[f"indices/{name}"], tensors[f"values/{name}"] = indices, values
    return tensors, json.loads(json.dumps(patch.metadata()))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=JSON_VALUES, bypass=st.booleans())
def test_any_json_in_any_metadata_field_is_never_a_server_error(
    api: TestClient,
    tensors_and_meta: tuple[dict[str, Any], dict[str, Any]],
    field: str,
    value: object,
    bypass: bool,
) -> None:
    tensors, meta = tensors_and_meta
    text = json.dumps(with_change(meta, field, value))
    data = save(tensors, metadata={"skillgraft.format_version": "1", "skillgraft.meta": text})
    if bypass:  # written by another process, past the upload check
        folder = Path(api.app.state.settings.store_dir) / "tasks" / "fz"  # type: ignore[attr-defined]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "patch.safetensors").write_bytes(data)
    else:
        put = api.put("/v1/tasks/fz/patch", content=data, headers=OCTET)
        assert put.status_code in (200, 201, 400, 409), put.text
    listing = api.get("/v1/tasks")
    assert listing.status_code == 200, listing.text
    assert "ok" in [item["name"] for item in listing.json()["items"]]
    infer = {"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["fine"]}]}
    for response in (
        api.get("/v1/tasks/fz"),
        api.post("/v1/classify", json={"task": "fz", "inputs": ["fine"]}),
        api.get("/v1/skills/fz/mask"),
        api.get("/v2/models/fz"),
        api.post("/v2/models/fz/infer", json=infer),
    ):
        assert response.status_code < 500, (field, value, response.text)
    assert api.post("/v1/classify", json={"task": "ok", "inputs": ["fine"]}).status_code == 200
