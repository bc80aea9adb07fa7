"""Hostile input: no request makes the service answer 5xx, and a client without a key costs it nothing.

Keys are checked before any body is read (a real uvicorn over loopback, bodies streamed by hand); uploads are
unpacked and parsed within limits; malformed names, ids, headers and texts are refused at the HTTP boundary with a
4xx naming the problem, in the shape of the API they were sent to, and no message shows a server path.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import select
import socket
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save

from app.api.deps import JOB_ID_PATTERN
from app.api.limits import ascii_int
from app.config import Settings
from app.core.errors import InvalidTaskName
from app.engine.service import InferenceService
from app.grafting.base import BaseModel
from app.grafting.checkpoint import looks_pickled
from app.grafting.heads import HeadError, HeadSpec
from app.grafting.patch import build_patch, patch_to_bytes, save_patch
from app.jobs.models import job_id_for
from app.jobs.store import FileJobStore
from app.main import create_app
from tests.utils.processes import Processes
from tests.utils.tiny import make_patch, random_finetune, random_mask
from tests.utils.uploads import jsonl, spec, write_checkpoint

READ = "read-key-0123456789abcdef"
ADMIN = "admin-key-0123456789abcdef"
OCTET = {"Content-Type": "application/octet-stream"}
SPEC = spec(task="zipped").model_dump_json(exclude_none=True)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def app_client(base_dir: Path, store: Path, **overrides: object) -> TestClient:
    values: dict[str, object] = {"base_model": base_dir, "store_dir": store, "max_batch_wait_ms": 2.0, **overrides}
    return TestClient(create_app(Settings(**values)))  # type: ignore[arg-type]


@pytest.fixture
def client(tiny_base_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    """An open service (no keys) with small upload limits, so that the limits are cheap to exceed."""
    with app_client(
        tiny_base_dir,
        tmp_path / "store",
        max_request_bytes=64 * 1024,
        max_uncompressed_bytes=8 * 2**20,
        max_zip_members=20,
        max_json_bytes=256 * 1024,
    ) as test_client:
        yield test_client


@pytest.fixture
def keyed(tiny_base_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    with app_client(tiny_base_dir, tmp_path / "store", read_keys=[READ], admin_keys=[ADMIN]) as test_client:
        yield test_client


def store_of(client: TestClient) -> Path:
    return Path(client.app.state.settings.store_dir)  # type: ignore[attr-defined]


def error_message(response: httpx.Response) -> str:
    """The message of either error shape: v1 ``{"error": {"code", "message"}}`` or v2 ``{"error": "..."}``."""
    error = response.json()["error"]
    return error if isinstance(error, str) else error["message"]


# -- A1: the key is checked before any body is read --------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory, tiny_base_dir: Path) -> Iterator[tuple[str, Path, Path]]:
    root = tmp_path_factory.mktemp("preauth")
    store, spool = root / "store", root / "tmp"
    spool.mkdir()
    procs = Processes(
        {
            "SKILLGRAFT_STORE_DIR": str(store),
            "SKILLGRAFT_BASE_MODEL": str(tiny_base_dir),
            "SKILLGRAFT_READ_KEYS": READ,
            "SKILLGRAFT_ADMIN_KEYS": ADMIN,
            # where the server would spool a multipart body (Starlette's temporary files)
            "TMPDIR": str(spool),
        },
        root,
    )
    try:
        yield procs.server(), store, spool
    finally:
        procs.stop_all()


def files_under(*folders: Path) -> list[str]:
    return [str(p) for folder in folders if folder.exists() for p in folder.rglob("*") if p.is_file()]


def stream_until_answered(
    url: str, head: bytes, chunk: bytes, most_chunks: int, folders: list[Path]
) -> tuple[bytes, int]:
    """Send ``head``, then body chunks until the server answers (or ``most_chunks`` are sent); returns the raw
    response head and the body bytes sent. ``folders`` (where the server would spool or stage the body) are looked
    at while the connection is still open: they must be empty."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=10) as sock:
        sock.sendall(head)
        sent = 0
        for _ in range(most_chunks):
            if select.select([sock], [], [], 0)[0]:
                break  # answered: stop sending
            try:
                sock.sendall(chunk)
            except OSError:  # the server closed after answering
                break
            sent += len(chunk)
        assert files_under(*folders) == [], f"the server spooled or staged the body after {sent} bytes"
        # a server that reads the body would still be waiting for the rest of it: no answer would come
        assert select.select([sock], [], [], 10)[0], f"no answer after {sent} body bytes: the server reads the body"
        response = b""
        try:
            while b"\r\n\r\n" not in response and (data := sock.recv(65536)):
                response += data
        except ConnectionResetError:  # closed with our unread body in its buffer: what arrived before stays
            pass
        return response, sent


def test_keys_are_checked_before_any_body_is_read(keyed_server: tuple[str, Path, Path]) -> None:
    url, store, spool = keyed_server
    host = urlsplit(url).netloc
    declared = 1 << 30  # a 1 GiB body, under the 2 GiB upload limit: only a key check can refuse it early
    chunk = b"x" * 65536
    multipart = f"multipart/form-data; boundary={'b' * 16}"
    cases = [
        # (request line and headers, status)
        (f"POST /v1/tasks HTTP/1.1\r\nHost: {host}\r\nContent-Type: {multipart}\r\n", 401),
        (f"PUT /v1/tasks/t/patch HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {READ}\r\n", 403),
        (f"POST /v1/classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n", 401),
        (f"POST /v2/models/t/infer HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer nope-not-a-key\r\n", 401),
    ]
    for start, status in cases:
        body_head = (
            f'--{"b" * 16}\r\nContent-Disposition: form-data; name="checkpoint"; filename="m.safetensors"\r\n\r\n'
        )
        for framing in (f"Content-Length: {declared}\r\n", "Transfer-Encoding: chunked\r\n"):
            chunked = framing.startswith("Transfer")
            piece = (b"%x\r\n" % len(chunk)) + chunk + b"\r\n" if chunked else chunk
            head = (start + framing + "\r\n").encode() + (b"" if chunked else body_head.encode())
            response, sent = stream_until_answered(url, head, piece, 48, [spool, store / "uploads"])
            status_line = response.split(b"\r\n", 1)[0].decode()
            assert status_line.split()[1] == str(status), (start, framing, response[:300])
            assert b"connection: close" in response.lower()
            assert sent < 4 * 2**20


def test_keys_and_scopes_refuse_without_parsing(keyed: TestClient) -> None:
    # invalid JSON without a key: the key is missing, whatever the body
    response = keyed.post("/v1/classify", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"
    # a /v2 route answers in the protocol's shape
    response = keyed.post("/v2/models/t/infer", content=b"{not json")
    assert response.status_code == 401 and isinstance(response.json()["error"], str)
    response = keyed.post("/v1/tasks", headers=auth(READ), files={"checkpoint": ("m.safetensors", b"x" * 4096)})
    assert response.status_code == 403 and "'admin' scope" in error_message(response)
    # probes stay open; a valid key passes through to the route
    assert keyed.get("/v2/health/ready").status_code == 200
    assert keyed.post("/v1/classify", content=b"{not json", headers=auth(READ)).status_code == 422


# -- A2, A5: uploads unpacked and parsed within limits ------------------------------------------------------------


def zipped(files: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model_files(tiny_base: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("ckpt")
    write_checkpoint(tiny_base, folder)
    return {name: (folder / name).read_bytes() for name in ("model.safetensors", "config.json")}


def submit_zip(client: TestClient, archive: bytes, train: bytes | None = None) -> httpx.Response:
    files = {
        "checkpoint": ("ckpt.zip", archive, "application/zip"),
        "train": ("train.jsonl", jsonl() if train is None else train, "application/jsonl"),
    }
    return client.post("/v1/tasks", files=files, data={"spec": SPEC})


def assert_refused(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    message = error_message(response)
    for word in words:
        assert word in message, message


def test_zip_bombs_and_oversized_members_are_refused_before_extraction(
    client: TestClient, model_files: dict[str, bytes]
) -> None:
    uploads = store_of(client) / "uploads"
    bomb = zipped({**model_files, "padding.bin": bytes(64 * 2**20)})  # 64 MiB of zeros in ~64 KiB
    assert len(bomb) - len(zipped(model_files)) < 2**20
    assert_refused(submit_zip(client, bomb), 422, "checkpoint", "max_uncompressed_bytes")
    many = zipped({**model_files, **{f"extra/{i}.txt": b"" for i in range(30)}})
    assert_refused(submit_zip(client, many), 422, "checkpoint", "max_zip_members")
    big_config = json.dumps({"padding": "x" * 300_000}).encode()
    assert_refused(submit_zip(client, zipped({**model_files, "config.json": big_config})), 422, "max_json_bytes")
    assert files_under(uploads) == []
    # the same checkpoint, zipped plainly (in a folder, as zip -r makes it), is accepted
    folder = {f"run/{name}": data for name, data in model_files.items()}
    assert submit_zip(client, zipped(folder)).status_code == 202


def lie_about_size(archive: bytes, member: str, size: int) -> bytes:
    """The zip with ``member``'s uncompressed size in the central directory replaced by ``size``."""
    data = bytearray(archive)
    at = data.find(b"PK\x01\x02")
    while at != -1:
        name_length = struct.unpack_from("<H", data, at + 28)[0]
        if data[at + 46 : at + 46 + name_length].decode() == member:
            struct.pack_into("<I", data, at + 24, size)
        at = data.find(b"PK\x01\x02", at + 4)
    return bytes(data)


def test_a_member_that_lies_about_its_size_is_cut_off(client: TestClient, model_files: dict[str, bytes]) -> None:
    config = model_files["config.json"] + b" " * 200_000  # expands past max_json_bytes, declares 1 KiB
    liar = lie_about_size(zipped({**model_files, "config.json": config}), "config.json", 1024)
    assert_refused(submit_zip(client, liar), 422, "checkpoint")
    assert files_under(store_of(client) / "uploads") == []


@pytest.mark.parametrize(
    "config",
    [
        b'{"a": ' * 100_000 + b"1" + b"}" * 100_000,  # deeply nested
        b"[1, 2, 3]",  # a list, not an object
        b'{"model_type": "bert", "name": "caf\xe9"}',  # Latin-1, not UTF-8
        b'{"skillgraft": {"head": 5}}',  # the head description of the wrong type
        b'{"skillgraft": {"head": {"mode": "prompt", "labels": [1, 2], "template": "{text} {mask}"}}}',
        b'{"skillgraft": []}',
        b'{"id2label": ["neg", "pos"]}',
        b'{"label": "\\ud800"}',  # a lone surrogate
    ],
)
def test_malformed_config_json_is_a_422_naming_the_file(
    client: TestClient, model_files: dict[str, bytes], config: bytes
) -> None:
    assert_refused(submit_zip(client, zipped({**model_files, "config.json": config})), 422, "checkpoint", "config.json")


@pytest.mark.parametrize(
    "line",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"text": "' + b"[" * 50 + b'", "label": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
    ],
)
def test_deeply_nested_training_lines_are_a_422_naming_the_file(
    client: TestClient, model_files: dict[str, bytes], line: bytes
) -> None:
    response = submit_zip(client, zipped(model_files), train=jsonl() + b"\n" + line)
    assert_refused(response, 422, "train", "train.jsonl line 17", "nested")


# -- A3: patch metadata is checked by one schema at upload and at load -------------------------------------------


def patch_with_metadata(base: BaseModel, change: dict[str, object]) -> bytes:
    """A valid patch for ``base`` whose metadata has ``change`` applied (dotted keys reach into objects)."""
    patch = make_patch(base, task="meta", fraction=0.002)
    meta = patch.metadata()
    for dotted, value in change.items():
        *path, last = dotted.split(".")
        target = meta
        for key in path:
            target = target.setdefault(key, {})
        target[last] = value
    tensors = {}
    for name, (indices, values) in patch.entries.items():
        tensors[f"indices/{name}"], tensors[f"values/{name}"] = indices, values

    return save(tensors, metadata={"skillgraft.format_version": "1", "skillgraft.meta": json.dumps(meta)})


def nested(depth: int) -> object:
    value: object = 0
    for _ in range(depth):
        value = [value]
    return value


BAD_METADATA = [
    {"mask_size": "12"},
    {"source_checkpoint_sha256": {"a": 1}},
    {"head.labels": [1, 2]},
    {"metrics.mask": "everywhere"},
    {"metrics.mask": {"per_layer": {"0": "many"}}},
    {"metrics": ["acc", 0.9]},
    {"head": ["prompt"]},
    {"eligible_size": "lots"},
    {"eligible_size": 1.5},
    {"extra": nested(200)},
    {"created_at": 7},
]


@pytest.mark.parametrize("change", BAD_METADATA, ids=[next(iter(c)) + "-" + str(i) for i, c in enumerate(BAD_METADATA)])
def test_patch_metadata_of_the_wrong_type_is_a_400(client: TestClient, tiny_base: BaseModel, change: dict) -> None:
    response = client.put("/v1/tasks/meta/patch", content=patch_with_metadata(tiny_base, change), headers=OCTET)
    assert_refused(response, 400, "metadata")
    assert response.json()["error"]["code"] == "invalid_patch"
    assert client.get("/v1/tasks").status_code == 200
    assert client.get("/v1/tasks/meta").status_code == 404


def test_a_stored_patch_with_bad_metadata_is_left_out_and_unusable_for_itself(
    client: TestClient, tiny_base: BaseModel, caplog: pytest.LogCaptureFixture
) -> None:
    store = store_of(client)
    good = client.put("/v1/tasks/good/patch", content=patch_to_bytes(make_patch(tiny_base, "good")), headers=OCTET)
    assert good.status_code == 201
    for name, change in (("intlabels", {"head.labels": [0, 1]}), ("badmask", {"metrics.mask": "s"})):
        folder = store / "tasks" / name
        folder.mkdir(parents=True)
        # written by another process, past the upload check
        (folder / "patch.safetensors").write_bytes(patch_with_metadata(tiny_base, change))
    listing = client.get("/v1/tasks")
    assert listing.status_code == 200 and [t["name"] for t in listing.json()["items"]] == ["good"]
    assert "left out of the listing" in caplog.text
    for name in ("intlabels", "badmask"):
        assert client.get(f"/v1/tasks/{name}").json()["error"]["code"] == "task_unusable"
        response = client.post("/v1/classify", json={"task": name, "inputs": ["fine"]})
        assert response.status_code == 409 and response.json()["error"]["code"] == "task_unusable"
        assert client.get(f"/v1/skills/{name}/mask").status_code == 409
        infer = {"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["fine"]}]}
        response = client.post(f"/v2/models/{name}/infer", json=infer)
        assert response.status_code == 409 and isinstance(response.json()["error"], str)
        assert client.get(f"/v2/models/{name}").status_code == 409
        assert client.get(f"/v2/models/{name}/ready").json()["ready"] is False
    assert client.post("/v1/classify", json={"task": "good", "inputs": ["fine"]}).status_code == 200
    assert client.get("/v1/skills/good/mask").status_code == 200


# -- A4: a head that fails while a request is tokenized -----------------------------------------------------------


def test_a_head_error_at_request_time_is_a_clear_error(
    tiny_base: BaseModel, tiny_base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "store"
    long_template = "{text} " + "and then it was all over the place , " * 4 + "{mask} ."
    spec = HeadSpec("prompt", ("negative", "positive"), long_template, ("terrible", "great"))
    patch = build_patch(
        tiny_base.parameters,
        random_finetune(tiny_base),
        random_mask(tiny_base, 0.002),
        task="long",
        spec=spec,
        base_fingerprint=tiny_base.fingerprint,
    )
    save_patch(patch, store / "tasks" / "long" / "patch.safetensors")  # written past any upload-time check
    body = {"task": "long", "inputs": ["fine"]}
    infer = {"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["fine"]}]}
    with app_client(tiny_base_dir, store, max_length=8) as client:
        response = client.post("/v1/classify", json=body)
        assert response.status_code == 409 and "longer than the maximum sequence length" in error_message(response)
        response = client.post("/v2/models/long/infer", json=infer)
        assert response.status_code == 409 and "maximum sequence length" in response.json()["error"]

        # whatever head error the tokenizer or the scorer raises is answered as the task's fault, never a 500
        def broken(*args: object) -> None:
            raise HeadError("the head cannot read this input")

        monkeypatch.setattr(InferenceService, "prepare", broken)
        client.put("/v1/tasks/ok/patch", content=patch_to_bytes(make_patch(tiny_base, "ok")), headers=OCTET)
        response = client.post("/v1/classify", json={"task": "ok", "inputs": ["fine"]})
        assert response.status_code == 409 and response.json()["error"]["code"] == "task_unusable"
        response = client.post("/v2/models/ok/infer", json=infer)
        assert response.status_code == 409 and response.json() == {"error": "the head cannot read this input"}


# -- A6, A7: texts and headers -------------------------------------------------------------------------------------


def test_lone_surrogates_are_refused_naming_the_input(client: TestClient, tiny_base: BaseModel) -> None:
    client.put("/v1/tasks/t/patch", content=patch_to_bytes(make_patch(tiny_base, "t")), headers=OCTET)
    json_header = {"Content-Type": "application/json"}
    body = b'{"task": "t", "inputs": ["fine", "bad \\ud800 text"]}'
    response = client.post("/v1/classify", content=body, headers=json_header)
    assert_refused(response, 422, "inputs[1]", "surrogate")
    pair = b'{"task": "t", "inputs": [{"text": "ok", "text_pair": "\\udfff"}]}'
    assert_refused(client.post("/v1/classify", content=pair, headers=json_header), 422, "inputs[0]")
    infer = b'{"inputs": [{"name": "TEXT", "shape": [2], "datatype": "BYTES", "data": ["fine", "\\ud83d"]}]}'
    response = client.post("/v2/models/t/infer", content=infer, headers=json_header)
    assert_refused(response, 400, "inputs[0].data[1]", "surrogate")


def test_v2_header_length_is_ascii_digits_only(client: TestClient, tiny_base: BaseModel) -> None:
    client.put("/v1/tasks/t/patch", content=patch_to_bytes(make_patch(tiny_base, "t")), headers=OCTET)
    body = json.dumps({"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}).encode()
    for value in (b"\xb2", b"\xd9\xa3", b"-1", b"1e3", b" 12", b"9" * 40):  # '²' (Latin-1), Arabic-Indic 3, …
        response = client.post("/v2/models/t/infer", content=body, headers={"Inference-Header-Content-Length": value})
        assert response.status_code == 400, (value, response.text)
        assert "Inference-Header-Content-Length" in response.json()["error"]
    response = client.post(
        "/v2/models/t/infer", content=body, headers={"Inference-Header-Content-Length": b"%d" % len(body)}
    )
    assert response.status_code == 200
    assert ascii_int("²") is None and ascii_int("١٢") is None and ascii_int("12") == 12 and ascii_int(None) is None


# -- A8: job ids and server paths ----------------------------------------------------------------------------------


def test_job_ids_are_checked_at_the_boundary(client: TestClient) -> None:
    for job_id in ("a" * 300, "A" * 32, "0" * 31, "ab-cd", "g" * 32, "0" * 33, "0" * 31 + "é"):
        for method in ("GET", "DELETE"):
            response = client.request(method, f"/v1/jobs/{job_id}")
            assert response.status_code == 404, (job_id, response.text)
            assert response.json()["error"]["code"] == "job_not_found"
            assert "retry-after" not in response.headers
    assert client.get("/v1/jobs/" + "0" * 32).status_code == 404
    assert JOB_ID_PATTERN.fullmatch(job_id_for("a" * 64, "b" * 64, None, spec()))


def test_no_error_message_shows_a_server_path(
    client: TestClient, tiny_base: BaseModel, model_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_of(client)
    secrets = {str(store), str(store.resolve()), str(Path(os.getcwd()).resolve()), str(store.parent)}
    folder = store / "tasks" / "broken"
    folder.mkdir(parents=True)
    (folder / "patch.safetensors").write_bytes(b"not a patch at all")
    responses = [
        client.get("/v1/jobs/" + "a" * 300),
        client.get("/v1/tasks/broken"),
        client.get("/v1/tasks/nope"),
        client.get("/v1/tasks/Not-A-Name"),
        client.get("/v1/skills/broken/mask"),
        client.get("/v1/skills/overlap?tasks=broken,nope"),
        client.post("/v1/classify", json={"task": "broken", "inputs": ["x"]}),
        client.put("/v1/tasks/p/patch", content=b"\x08" + bytes(7) + b"{}" + bytes(6), headers=OCTET),
        client.put("/v1/tasks/p/patch", content=pickle.dumps({"a": 1}), headers=OCTET),
        submit_zip(client, b"PK\x03\x04 not really a zip"),
        submit_zip(client, zipped({"config.json": model_files["config.json"]})),
        client.post("/v2/models/broken/infer", json={"inputs": []}),
        client.get("/v2/models/broken"),
    ]

    # a job store that fails with an OSError naming its file (as the file store's do)
    def unavailable(self: FileJobStore, job_id: str) -> None:
        raise OSError(5, "Input/output error", str(store / "jobs" / f"{job_id}.json"))

    monkeypatch.setattr(FileJobStore, "get", unavailable)
    responses.append(client.get("/v1/jobs/" + "0" * 32))
    assert responses[-1].status_code == 503
    for response in responses:
        assert 400 <= response.status_code < 600 and response.status_code != 500, response.text
        message = error_message(response)
        assert not any(secret in message for secret in secrets), message


# -- A9: pickles ---------------------------------------------------------------------------------------------------


def test_a_pickled_patch_is_415_like_a_pickled_checkpoint(client: TestClient) -> None:
    saved = io.BytesIO()
    torch.save({"values": torch.zeros(3)}, saved)
    for data in (pickle.dumps({"values": [0.0] * 3}, protocol=4), pickle.dumps([1], protocol=2), saved.getvalue()):
        response = client.put("/v1/tasks/p/patch", content=data, headers=OCTET)
        assert_refused(response, 415, "pickle")
        assert response.json()["error"]["code"] == "unsupported_upload"
    # a safetensors header whose length happens to start with the pickle marker is not a pickle
    assert not looks_pickled(struct.pack("<Q", 0x0280) + b'{"__metadata__": {}}')
    assert looks_pickled(pickle.dumps(1, protocol=5))


# -- B: one error renderer; names checked once at the boundary ---------------------------------------------------


def test_limits_answer_in_the_shape_of_the_api(client: TestClient) -> None:
    big = b"x" * (70 * 1024)
    response = client.post("/v2/models/t/infer", content=big)
    assert response.status_code == 413 and isinstance(response.json()["error"], str)
    assert "max_request_bytes" in response.json()["error"]
    response = client.post("/v1/classify", content=big, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "limit_exceeded"


def test_task_names_are_checked_at_the_http_boundary(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: object) -> None:
        raise AssertionError("a malformed name reached the service")

    monkeypatch.setattr(InferenceService, "classify", never)
    monkeypatch.setattr(InferenceService, "describe_task", never)
    for body in ({"task": "Not A Name", "inputs": ["x"]}, {"tasks": ["ok", "../etc"], "inputs": ["x"]}):
        response = client.post("/v1/classify", json=body)
        assert response.status_code == 422 and response.json()["error"]["code"] == "validation_error"
    assert client.get("/v1/tasks/Not%20A%20Name").status_code == 422
    response = client.get("/v2/models/Not%20A%20Name")
    assert response.status_code == 404 and isinstance(response.json()["error"], str)
    assert client.get("/v1/skills/overlap?tasks=ok,..").status_code == 422
    with pytest.raises(InvalidTaskName):  # the store keeps its own check as the last line of defence
        store_tasks = client.app.state.service.store  # type: ignore[attr-defined]
        store_tasks.task_dir("../escape")
