"""Fuzzing, bounded for CI: schemathesis against the app's own OpenAPI schema on a real uvicorn (no 5xx, responses
and status codes as documented, auth enforced, invalid inputs refused with a 4xx), and hypothesis on the patch loader
and the upload validation. Patch metadata is fuzzed through the API in ``tests/test_patch_metadata.py``."""

from __future__ import annotations

import contextlib
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from app.grafting.base import BaseModel
from app.grafting.patch import PatchError, load_patch, patch_to_bytes, save_patch, validate_patch
from app.jobs.inputs import UploadError, UploadPaths, load_job_inputs
from tests.utils.processes import Processes
from tests.utils.tiny import make_patch
from tests.utils.uploads import jsonl, spec

ADMIN = "fuzz-admin-key-0123456789"
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "ignored_auth",
        "missing_required_header",
        "unsupported_method",
    ]
)
# Negative mode sends what the schema forbids (wrong types, missing fields, bad names): it must be refused with a
# documented 4xx, never a 5xx and never accepted.
NEGATIVE_CHECKS = CHECKS + ",negative_data_rejection"


@pytest.mark.slow
def test_schemathesis_against_openapi(tiny_base: BaseModel, tiny_base_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    save_patch(make_patch(tiny_base, task="sst2"), store / "tasks/sst2/patch.safetensors")
    save_patch(make_patch(tiny_base, task="cls", mode="classifier"), store / "tasks/cls/patch.safetensors")
    procs = Processes(
        {
            "SKILLGRAFT_STORE_DIR": str(store),
            "SKILLGRAFT_BASE_MODEL": str(tiny_base_dir),
            "SKILLGRAFT_ADMIN_KEYS": ADMIN,
            "SKILLGRAFT_MAX_BATCH_WAIT_MS": "1",
        },
        tmp_path,
    )
    cli = shutil.which("st", path=str(Path(sys.executable).parent)) or "st"
    summaries = []
    try:
        url = procs.server()
        # negative cases go to parameters and bodies; the key header is sent as given (auth has its own check)
        for mode, checks, extra in (
            ("positive", CHECKS, []),
            ("negative", NEGATIVE_CHECKS, ["--generation-with-security-parameters", "false"]),
        ):
            result = subprocess.run(
                [
                    cli,
                    "run",
                    f"{url}/openapi.json",
                    "-H",
                    f"Authorization: Bearer {ADMIN}",
                    "--mode",
                    mode,
                    "--checks",
                    checks,
                    "--max-examples",
                    "8",
                    "--seed",
                    "1",
                    "--request-timeout",
                    "20",
                    "--wait-for-schema",
                    "30",
                    *extra,
                ],
                capture_output=True,
                text=True,
                timeout=600,
            )
            summary = result.stdout[result.stdout.rfind("SUMMARY") :]
            summaries.append(f"--- {mode}\n{summary}")
            assert result.returncode == 0, f"{mode}:\n" + result.stdout[-6000:] + procs.logs()
            assert "passed" in summary and "failures" not in summary.split("Test cases:")[-1], summary
    finally:
        procs.stop_all()
        print("\n".join(summaries))


@pytest.fixture(scope="module")
def good_patch_bytes(tiny_base: BaseModel) -> bytes:
    return patch_to_bytes(make_patch(tiny_base, task="fz", mode="classifier", fraction=0.002))


def _load_or_refuse(data: bytes, folder: Path, base: BaseModel) -> None:
    path = folder / "p.safetensors"
    path.write_bytes(data)
    # refused with a PatchError (a message) is the only acceptable failure; anything else fails the test
    with contextlib.suppress(PatchError):
        validate_patch(load_patch(path), base.parameters, base.fingerprint, base.hidden_size)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_patch_bytes_are_refused_cleanly(
    good_patch_bytes: bytes, tiny_base: BaseModel, tmp_path: Path, data: st.DataObject
) -> None:
    raw = bytearray(good_patch_bytes)
    header_len = struct.unpack("<Q", raw[:8])[0]
    for _ in range(data.draw(st.integers(1, 8))):
        # bias flips towards the header, where a corruption changes meaning rather than just values
        limit = data.draw(st.sampled_from([8 + header_len, len(raw)]))
        position = data.draw(st.integers(0, limit - 1))
        raw[position] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    _load_or_refuse(bytes(raw), tmp_path, tiny_base)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(declared=st.integers(0, 2**64 - 1), body=st.binary(max_size=64))
def test_huge_or_bogus_declared_header_sizes(tiny_base: BaseModel, tmp_path: Path, declared: int, body: bytes) -> None:
    _load_or_refuse(struct.pack("<Q", declared) + body, tmp_path, tiny_base)


FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.uint8]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    special=st.sampled_from([float("nan"), float("inf"), -float("inf")]),
    dtype=st.sampled_from(FLOAT_DTYPES),
    which=st.sampled_from(["values", "head", "dtype"]),
)
def test_non_finite_and_wrong_dtype_patches(
    tiny_base: BaseModel, tmp_path: Path, special: float, dtype: torch.dtype, which: str
) -> None:
    patch = make_patch(tiny_base, task="nf", mode="classifier", fraction=0.002)
    name = next(iter(patch.entries))
    indices, values = patch.entries[name]
    if which == "values":
        values = values.clone()
        values[0] = special
        patch.entries[name] = (indices, values)
    elif which == "head":
        patch.head["classifier.bias"] = patch.head["classifier.bias"].clone()
        patch.head["classifier.bias"][0] = special
    else:
        patch.entries[name] = (indices, values.to(dtype))
    path = tmp_path / "p.safetensors"
    path.write_bytes(patch_to_bytes(patch))
    with pytest.raises(PatchError):
        validate_patch(load_patch(path), tiny_base.parameters, tiny_base.fingerprint, tiny_base.hidden_size)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_checkpoint_uploads_raise_upload_errors_only(
    tiny_base: BaseModel, tmp_path: Path, data: st.DataObject
) -> None:
    tensors = {k: v.clone() for k, v in tiny_base.parameters.items()}
    raw = bytearray(save(tensors))
    for _ in range(data.draw(st.integers(1, 6))):
        position = data.draw(st.integers(0, min(len(raw), 4096) - 1))
        raw[position] = data.draw(st.integers(0, 255))
    folder = tmp_path / f"upload-{data.draw(st.integers(0, 10**9))}"
    folder.mkdir()
    (folder / "checkpoint.safetensors").write_bytes(bytes(raw))
    (folder / "train.jsonl").write_bytes(data.draw(st.sampled_from([jsonl(), b"", b"{", b'{"text": 1, "label": 2}'])))
    with contextlib.suppress(UploadError):
        load_job_inputs(UploadPaths(folder), spec(), tiny_base, folder / "x")
    shutil.rmtree(folder)
