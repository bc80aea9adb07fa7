"""The Open Inference Protocol (KServe v2) REST front: every task is a model named after it.

A task takes ``TEXT`` (BYTES, [-1]) and optional ``TEXT_PAIR`` (BYTES, [-1]) and returns ``LABEL`` (BYTES, [-1]),
``SCORE`` (FP32, [-1]) and ``PROBABILITIES`` (FP32, [-1, num_labels], columns in the order of the labels listed in
the model metadata). Inference goes through ``InferenceService.classify`` like ``/v1/classify``, so both fronts share
the batcher, the limits and the counters and give the same numbers. JSON values are the engine's probabilities as
they are; binary tensor data (the ``binary_tensor_data`` extension) carries them as float32. A task has one live
patch, so a ``versions/{v}`` path segment is accepted and ignored.

Errors take the protocol's shape ``{"error": "..."}`` (v1 keeps its own): ``V2Route`` answers whatever a v2 route or
its dependencies raise through ``app.api.errors.exception_response``, the one renderer, which picks the shape and the
protocol's statuses by path (no 422: bad input is 400; a name no task can have is an unknown model, 404).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError

from app import __version__
from app.api.deps import ModelName, ServiceDep
from app.api.errors import describe_validation_errors, exception_response
from app.api.limits import ascii_int
from app.api.schemas_v2 import (
    LABEL,
    OUTPUT_NAMES,
    PROBABILITIES,
    SCORE,
    TEXT,
    TEXT_PAIR,
    ErrorV2,
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    ModelReady,
    RequestInput,
    ResponseOutput,
    ServerLive,
    ServerMetadata,
    ServerReady,
    TensorMetadata,
)
from app.core.errors import InvalidInput, TaskUnusable
from app.engine.service import InferenceService, Prediction, TaskInfo, TextInput
from app.grafting.bounded_json import BoundedJSONError, loads_bounded

PLATFORM = "skillgraft"
EXTENSIONS = ["binary_tensor_data"]
HEADER_LENGTH = "Inference-Header-Content-Length"
# A request nests [N, 1] tensor data inside its inputs (5 levels) plus free-form parameters.
MAX_REQUEST_DEPTH = 32


# -- errors in the protocol's shape ------------------------------------------------------------------------------


class V2Route(APIRoute):
    """Answers every error of a v2 route, its dependencies and its parameters as ``{"error": "..."}``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return exception_response(request, exc)

        return handle


router = APIRouter(prefix="/v2", tags=["kserve-v2"], route_class=V2Route)
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorV2, "description": "Malformed request or tensor (the message names it)"},
    404: {"model": ErrorV2, "description": "Unknown model (task)"},
    409: {"model": ErrorV2, "description": "The stored patch cannot serve (another base, or unreadable)"},
    413: {"model": ErrorV2, "description": "Over a configured limit (named in the message)"},
    429: {"model": ErrorV2, "description": "Batcher queue full: retry later"},
    503: {"model": ErrorV2, "description": "Not ready"},
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    # "4XX" also keeps FastAPI from documenting v1's 422 body: v2 answers malformed requests with 400.
    other = {"model": ErrorV2, "description": "Any other client error (401, 403, 405)"}
    return {**{status: ERRORS[status] for status in statuses}, "4XX": other}


# -- server ------------------------------------------------------------------------------------------------------


@router.get("/health/live", summary="Server live")
def server_live() -> ServerLive:
    return ServerLive(live=True)


@router.get(
    "/health/ready",
    summary="Server ready: the base is loaded and the engine runs (400 while not)",
    response_model=ServerReady,
    responses={400: {"model": ServerReady, "description": "Not ready"}},
)
def server_ready(request: Request) -> JSONResponse:
    service: InferenceService | None = getattr(request.app.state, "service", None)
    ready = service is not None and service.ready
    return JSONResponse(ServerReady(ready=ready).model_dump(), status_code=200 if ready else 400)


@router.get("", summary="Server metadata")
def server_metadata() -> ServerMetadata:
    return ServerMetadata(name=PLATFORM, version=__version__, extensions=EXTENSIONS)


# -- models (tasks) ----------------------------------------------------------------------------------------------


def unservable(service: InferenceService, info: TaskInfo) -> str | None:
    """Why a stored task cannot serve, or None: an unreadable patch, one for another base, or no labels."""
    if info.problem:
        return info.problem
    if info.metadata.get("base_fingerprint") != service.base.fingerprint:
        return f"task {info.name!r} was grafted onto another base model"
    if not labels_of(info):
        return f"task {info.name!r} declares no labels"
    return None


def labels_of(info: TaskInfo) -> list[str]:
    head = info.metadata.get("head")
    labels = head.get("labels") if isinstance(head, dict) else None
    return [str(label) for label in labels] if isinstance(labels, list) else []


async def model_ready(service: InferenceService, model_name: str) -> JSONResponse:
    info = await run_in_threadpool(service.describe_task, model_name)
    ready = unservable(service, info) is None
    return JSONResponse(ModelReady(name=model_name, ready=ready).model_dump(), status_code=200 if ready else 400)


async def model_metadata(service: InferenceService, model_name: str) -> ModelMetadata:
    info = await run_in_threadpool(service.describe_task, model_name)
    problem = unservable(service, info)
    if problem:
        raise TaskUnusable(problem)
    labels = labels_of(info)
    return ModelMetadata(
        name=model_name,
        platform=PLATFORM,
        inputs=[
            TensorMetadata(name=TEXT, datatype="BYTES", shape=[-1]),
            TensorMetadata(name=TEXT_PAIR, datatype="BYTES", shape=[-1], parameters={"optional": True}),
        ],
        outputs=[
            TensorMetadata(name=LABEL, datatype="BYTES", shape=[-1]),
            TensorMetadata(name=SCORE, datatype="FP32", shape=[-1]),
            TensorMetadata(name=PROBABILITIES, datatype="FP32", shape=[-1, len(labels)], parameters={"labels": labels}),
        ],
    )


READY = {
    "summary": "Model ready: the task's patch is stored and fits this base (400 while not)",
    "response_model": ModelReady,
    "responses": {400: {"model": ModelReady, "description": "Not ready"}, **errors(404, 503)},
}
METADATA = {
    "summary": "Model metadata: the task's input and output tensors",
    "description": "`PROBABILITIES` lists the label of each column in its `parameters.labels`.",
    "response_model_exclude_none": True,
    "responses": errors(404, 409, 503),
}


@router.get("/models/{model_name}/ready", **READY)
async def read_model_ready(service: ServiceDep, model_name: ModelName) -> JSONResponse:
    return await model_ready(service, model_name)


@router.get("/models/{model_name}/versions/{model_version}/ready", **READY)
async def read_model_version_ready(service: ServiceDep, model_name: ModelName, model_version: str) -> JSONResponse:
    return await model_ready(service, model_name)


@router.get("/models/{model_name}", **METADATA)
async def read_model_metadata(service: ServiceDep, model_name: ModelName) -> ModelMetadata:
    return await model_metadata(service, model_name)


@router.get("/models/{model_name}/versions/{model_version}", **METADATA)
async def read_model_version_metadata(service: ServiceDep, model_name: ModelName, model_version: str) -> ModelMetadata:
    return await model_metadata(service, model_name)


# -- inference ---------------------------------------------------------------------------------------------------


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary tensor data after it (the ``binary_tensor_data`` extension)."""
    if header_length is None:
        return body, b""
    length = ascii_int(header_length)
    if length is None or length > len(body):
        raise InvalidInput(f"{HEADER_LENGTH}={header_length[:40]!r} does not fit a body of {len(body)} bytes")
    return body[:length], body[length:]


def parse_request(header: bytes) -> InferenceRequest:
    # Parsed by the bounded reader (depth, strict UTF-8, lone surrogates refused naming the tensor element), then
    # validated: pydantic's own JSON parser would refuse a surrogate escape without saying where it is.
    try:
        raw = loads_bounded(header, max_depth=MAX_REQUEST_DEPTH)
    except BoundedJSONError as exc:
        raise InvalidInput(f"invalid inference request: {exc}") from None
    try:
        return InferenceRequest.model_validate(raw)
    except ValidationError as exc:
        raise InvalidInput("invalid inference request: " + describe_validation_errors(exc.errors())) from None


def unpack_bytes(name: str, raw: bytes) -> list[bytes]:
    """BYTES binary tensor data: each element is a 4-byte little-endian length, then that many bytes."""
    items, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise InvalidInput(f"input {name!r}: binary BYTES data ends inside an element's length")
        (size,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + size > len(raw):
            raise InvalidInput(f"input {name!r}: binary BYTES element of {size} bytes overruns the data")
        items.append(raw[at : at + size])
        at += size
    return items


def flatten(name: str, data: Any) -> list[Any]:
    """Row-major elements of flat or nested JSON tensor data."""
    if not isinstance(data, list):
        raise InvalidInput(f"input {name!r}: 'data' must be an array")
    out: list[Any] = []
    stack: list[Any] = [iter(data)]
    while stack:
        item = next(stack[-1], StopIteration)
        if item is StopIteration:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            out.append(item)
    return out


def decode_texts(tensor: RequestInput, binary: bytes | None) -> list[str]:
    """The texts of a BYTES input of shape [N] (or [N, 1]), checked against its declared shape."""
    name = tensor.name
    if tensor.datatype != "BYTES":
        raise InvalidInput(f"input {name!r} must have datatype BYTES, not {tensor.datatype!r}")
    shape = tensor.shape
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or any(d < 0 for d in shape):
        raise InvalidInput(f"input {name!r} must have shape [N] (or [N, 1]), not {shape}")
    if binary is not None:
        items: list[Any] = []
        for i, raw in enumerate(unpack_bytes(name, binary)):
            try:
                items.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise InvalidInput(f"input {name!r}: element {i} is not UTF-8 text") from None
    else:
        if tensor.data is None:
            raise InvalidInput(f"input {name!r} has neither 'data' nor binary_data_size")
        items = flatten(name, tensor.data)
        if not all(isinstance(item, str) for item in items):
            raise InvalidInput(f"input {name!r}: BYTES data must hold strings")
    if len(items) != shape[0]:
        raise InvalidInput(f"input {name!r} holds {len(items)} elements but its shape {shape} says {shape[0]}")
    return items


def decode_inputs(tensors: Sequence[RequestInput], binary: bytes) -> list[TextInput]:
    """``TEXT`` and optional ``TEXT_PAIR`` as text inputs; binary data is consumed in input order."""
    texts: dict[str, list[str]] = {}
    at = 0
    for tensor in tensors:
        if tensor.name not in (TEXT, TEXT_PAIR):
            raise InvalidInput(f"unknown input {tensor.name!r}: the model takes {TEXT!r} and optional {TEXT_PAIR!r}")
        if tensor.name in texts:
            raise InvalidInput(f"input {tensor.name!r} given twice")
        size = (tensor.parameters or {}).get("binary_data_size")
        chunk = None
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or at + size > len(binary):
                raise InvalidInput(f"input {tensor.name!r}: binary_data_size={size!r} does not fit the binary data")
            if tensor.data is not None:
                raise InvalidInput(f"input {tensor.name!r} has both 'data' and binary_data_size")
            chunk, at = binary[at : at + size], at + size
        texts[tensor.name] = decode_texts(tensor, chunk)
    if at != len(binary):
        raise InvalidInput(f"{len(binary) - at} bytes of binary data belong to no input")
    if TEXT not in texts:
        raise InvalidInput(f"input {TEXT!r} is required")
    pairs = texts.get(TEXT_PAIR)
    if pairs is not None and len(pairs) != len(texts[TEXT]):
        raise InvalidInput(f"{TEXT_PAIR!r} holds {len(pairs)} elements, {TEXT!r} holds {len(texts[TEXT])}")
    return [TextInput(text, pairs[i] if pairs is not None else None) for i, text in enumerate(texts[TEXT])]


def requested_outputs(body: InferenceRequest) -> list[tuple[str, bool]]:
    """(output name, as binary data) in request order; every output when none is named."""
    default_binary = (body.parameters or {}).get("binary_data_output") is True
    if body.outputs is None:
        return [(name, default_binary) for name in OUTPUT_NAMES]
    wanted: list[tuple[str, bool]] = []
    for output in body.outputs:
        if output.name not in OUTPUT_NAMES:
            raise InvalidInput(f"unknown output {output.name!r}: the model gives {', '.join(OUTPUT_NAMES)}")
        if any(output.name == name for name, _ in wanted):
            raise InvalidInput(f"output {output.name!r} requested twice")
        binary = (output.parameters or {}).get("binary_data", default_binary)
        wanted.append((output.name, binary is True))
    return wanted


def output_tensor(name: str, predictions: list[Prediction]) -> tuple[list[Any], str, list[int]]:
    """Flat row-major data, datatype and shape of one output."""
    n = len(predictions)
    if name == LABEL:
        return [p.label for p in predictions], "BYTES", [n]
    if name == SCORE:
        return [p.score for p in predictions], "FP32", [n]
    rows = [list((p.probabilities or {}).values()) for p in predictions]
    return [value for row in rows for value in row], "FP32", [n, len(rows[0]) if rows else 0]


def pack(datatype: str, data: list[Any]) -> bytes:
    if datatype == "FP32":
        return struct.pack(f"<{len(data)}f", *data)
    encoded = [str(item).encode("utf-8") for item in data]
    return b"".join(struct.pack("<I", len(item)) + item for item in encoded)


def inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema with its ``$defs`` written in place (the request is parsed by hand, so OpenAPI lacks them)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return walk(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(value) for value in node]
        return node

    return walk(schema)


INFER = {
    "summary": "Classify TEXT (and optional TEXT_PAIR) with the task",
    "description": "Same engine, batcher, limits and results as `/v1/classify`. Accepts JSON or binary tensor data "
    f"(`{HEADER_LENGTH}`); outputs named in `outputs` come back in that order, all three when none is named.",
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": inline_refs(InferenceRequest.model_json_schema())},
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                    "description": f"The JSON request, then binary tensor data; `{HEADER_LENGTH}` gives its length.",
                },
            },
        }
    },
    "responses": {
        200: {
            "model": InferenceResponse,
            "description": "Outputs; as the JSON header then binary tensor data when any output is asked as binary",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        },
        **errors(400, 404, 409, 413, 429, 503),
    },
}


async def infer(service: InferenceService, model_name: str, request: Request) -> Response:
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise InvalidInput(f"Content-Encoding {encoding!r} is not supported: send the request uncompressed")
    header, binary = split_body(await request.body(), request.headers.get(HEADER_LENGTH))
    body = parse_request(header)
    inputs = decode_inputs(body.inputs, binary)
    wanted = requested_outputs(body)
    results = await service.classify([model_name], inputs, any(name == PROBABILITIES for name, _ in wanted))
    predictions = results[0].predictions
    outputs, blobs = [], []
    for name, as_binary in wanted:
        data, datatype, shape = output_tensor(name, predictions)
        if as_binary:
            blob = pack(datatype, data)
            blobs.append(blob)
            outputs.append(
                ResponseOutput(name=name, shape=shape, datatype=datatype, parameters={"binary_data_size": len(blob)})
            )
        else:
            outputs.append(ResponseOutput(name=name, shape=shape, datatype=datatype, data=data))
    response = InferenceResponse(model_name=model_name, id=body.id, outputs=outputs)
    json_part = response.model_dump_json(exclude_none=True).encode()
    if not blobs:
        return Response(json_part, media_type="application/json")
    return Response(
        json_part + b"".join(blobs),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(json_part))},
    )


@router.post("/models/{model_name}/infer", **INFER)
async def infer_model(service: ServiceDep, model_name: ModelName, request: Request) -> Response:
    return await infer(service, model_name, request)


@router.post("/models/{model_name}/versions/{model_version}/infer", **INFER)
async def infer_model_version(
    service: ServiceDep, model_name: ModelName, model_version: str, request: Request
) -> Response:
    return await infer(service, model_name, request)


@router.api_route(
    "/{path:path}",
    methods=["GET", "POST", "PUT", "DELETE", "PATCH"],
    include_in_schema=False,
)
def unknown_endpoint(request: Request, path: str) -> Response:
    """Any other /v2 request: a protocol-shaped 404 or 405 rather than v1's (``/v2/`` is the server metadata)."""
    if path == "" and request.method == "GET":
        return JSONResponse(server_metadata().model_dump())
    allowed = sorted(
        method
        for route in router.routes
        if isinstance(route, APIRoute)
        and route.endpoint is not unknown_endpoint
        and route.path_regex.fullmatch(request.scope["path"])
        for method in route.methods
    )
    if allowed:
        message = f"{request.method} is not allowed on {request.url.path}: use {', '.join(allowed)}"
        return JSONResponse({"error": message}, status_code=405, headers={"Allow": ", ".join(allowed)})
    return JSONResponse({"error": f"no endpoint {request.method} {request.url.path}"}, status_code=404)
