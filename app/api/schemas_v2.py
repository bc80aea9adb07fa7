"""Bodies of the Open Inference Protocol (KServe v2) REST API, as the protocol names its JSON objects.

Fields the protocol marks optional default to ``None`` and are left out of responses when unset.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# A task's tensors: texts (and optional second texts) in; the label, its probability and every label's out.
TEXT, TEXT_PAIR = "TEXT", "TEXT_PAIR"
LABEL, SCORE, PROBABILITIES = "LABEL", "SCORE", "PROBABILITIES"
OUTPUT_NAMES = (LABEL, SCORE, PROBABILITIES)


class ErrorV2(BaseModel):
    error: str = Field(description="What went wrong.", examples=["task 'sst2' not found"])


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class ServerMetadata(BaseModel):
    name: str = Field(examples=["skillgraft"])
    version: str = Field(examples=["0.1.0"])
    extensions: list[str] = Field(description="Protocol extensions supported.", examples=[["binary_tensor_data"]])


class TensorMetadata(BaseModel):
    name: str
    datatype: str = Field(examples=["BYTES"])
    shape: list[int] = Field(description="-1 marks a dimension of any size.", examples=[[-1]])
    parameters: dict[str, Any] | None = None


class ModelMetadata(BaseModel):
    name: str = Field(examples=["sst2"])
    versions: list[str] | None = None
    platform: str = Field(examples=["skillgraft"])
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class RequestInput(BaseModel):
    name: str = Field(examples=[TEXT])
    shape: list[int] = Field(examples=[[2]])
    datatype: str = Field(examples=["BYTES"])
    parameters: dict[str, Any] | None = None
    data: Any = Field(None, description="Row-major, flat or nested; absent when sent as binary tensor data.")


class RequestOutput(BaseModel):
    name: str = Field(examples=[LABEL])
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = Field(None, description="Outputs to return; all of them when absent.")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "42",
                    "inputs": [
                        {
                            "name": TEXT,
                            "shape": [2],
                            "datatype": "BYTES",
                            "data": ["a gripping, beautiful film", "dull and far too long"],
                        }
                    ],
                    "outputs": [{"name": LABEL}, {"name": PROBABILITIES}],
                }
            ]
        }
    )


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(None, description="Row-major and flat; absent when sent as binary tensor data.")


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_name": "sst2",
                    "id": "42",
                    "outputs": [
                        {"name": LABEL, "shape": [2], "datatype": "BYTES", "data": ["positive", "negative"]},
                        {"name": PROBABILITIES, "shape": [2, 2], "datatype": "FP32", "data": [0.07, 0.93, 0.81, 0.19]},
                    ],
                }
            ]
        }
    )
