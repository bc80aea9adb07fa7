"""API keys and scopes, and request-body limits, through the real app (lifespan included)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.api.auth import KeyRing, required_scope
from app.config import Settings
from app.main import create_app

READ = "read-key-0123456789abcdef"
ADMIN = "admin-key-0123456789abcdef"


@pytest.fixture
def client(tiny_base_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        base_model=tiny_base_dir,
        store_dir=tmp_path,
        read_keys=[READ],
        admin_keys=[ADMIN],
        max_request_bytes=64 * 1024,
        max_upload_bytes=128 * 1024,
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_scope_table() -> None:
    assert required_scope("GET", "/") is None
    assert required_scope("GET", "/health") is None and required_scope("GET", "/v2/health/ready") is None
    assert required_scope("GET", "/v1/tasks") == "read"
    assert required_scope("POST", "/v1/classify") == "read"
    assert required_scope("POST", "/v2/models/sst2/infer") == "read"
    assert required_scope("POST", "/v2/models/sst2/versions/1/infer") == "read"
    for method, path in [
        ("POST", "/v1/tasks"),
        ("DELETE", "/v1/tasks/a"),
        ("PUT", "/v1/tasks/a/patch"),
        ("DELETE", "/v1/jobs/x"),
        ("POST", "/v1/stitch"),
        ("POST", "/v1/some-new-route"),
    ]:
        assert required_scope(method, path) == "admin", (method, path)


def test_key_ring() -> None:
    ring = KeyRing.from_settings([READ], [ADMIN])
    assert ring.scopes_of(READ) == {"read"}
    assert ring.scopes_of(ADMIN) == {"read", "admin"}
    assert ring.scopes_of("nope") == set()
    assert not KeyRing.from_settings([], []).enabled


def test_keys_and_scopes(client: TestClient) -> None:
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 200
    missing = client.get("/v1/tasks")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["code"] == "unauthorized"
    assert client.get("/v1/tasks", headers=auth("not-a-real-key-at-all")).status_code == 401
    assert client.get("/v1/tasks", headers={"Authorization": f"Basic {READ}"}).status_code == 401
    assert client.get("/v1/tasks", headers=auth(READ)).status_code == 200
    assert client.post("/v1/classify", json={"task": "nope", "inputs": ["x"]}, headers=auth(READ)).status_code == 404
    for method, path in [("DELETE", "/v1/tasks/nope"), ("PUT", "/v1/tasks/nope/patch"), ("DELETE", "/v1/jobs/nope")]:
        denied = client.request(method, path, headers=auth(READ), content=b"x")
        assert denied.status_code == 403, (method, path, denied.text)
        assert "'admin' scope" in denied.json()["error"]["message"]
    assert client.delete("/v1/tasks/nope", headers=auth(ADMIN)).status_code == 404
    assert client.get("/v1/tasks", headers=auth(ADMIN)).status_code == 200


def test_open_without_keys(tiny_base_dir: Path, tmp_path: Path) -> None:
    with TestClient(create_app(Settings(base_model=tiny_base_dir, store_dir=tmp_path))) as open_client:
        assert open_client.get("/v1/tasks").status_code == 200


def test_body_limits(client: TestClient) -> None:
    big = {"task": "t", "inputs": ["x" * 70_000]}
    response = client.post("/v1/classify", json=big, headers=auth(READ))
    assert response.status_code == 413 and "max_request_bytes=65536" in response.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must still hold
        for _ in range(40):
            yield b"x" * 8192

    upload = client.post(
        "/v1/tasks", content=chunks(), headers={**auth(ADMIN), "content-type": "multipart/form-data; boundary=b"}
    )
    assert upload.status_code == 413 and "max_upload_bytes" in upload.json()["error"]["message"]


def test_keys_are_checked_before_limits_and_bodies(client: TestClient) -> None:
    """Key first, then limits, then the body: an unauthenticated oversized or malformed request learns nothing."""
    huge = {"content-length": str(10 * 2**30), "content-type": "multipart/form-data; boundary=b"}
    assert client.post("/v1/tasks", headers=huge, content=b"").status_code == 401
    assert client.post("/v1/tasks", headers={**huge, **auth(READ)}, content=b"").status_code == 403
    assert client.post("/v1/tasks", headers={**huge, **auth(ADMIN)}, content=b"").status_code == 413
    bad_json = {"content-type": "application/json"}
    assert client.post("/v1/classify", headers=bad_json, content=b"{oops").status_code == 401
    assert client.post("/v1/classify", headers={**bad_json, **auth(READ)}, content=b"{oops").status_code == 422
    # the same policy table decides, whichever way the key is misspelt
    for header in ({"Authorization": "Bearer"}, {"Authorization": f"Token {ADMIN}"}, {"Authorization": ADMIN}):
        assert client.delete("/v1/tasks/x", headers=header).status_code == 401
