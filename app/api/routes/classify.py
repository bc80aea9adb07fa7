"""Classification: texts (or text pairs) by one task or several."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import ServiceDep
from app.api.errors import responses
from app.api.schemas import ClassifyRequest, ClassifyResponse, PredictionPublic, TaskPredictionsPublic
from app.engine.service import TextInput

router = APIRouter(prefix="/v1", tags=["classify"])


@router.post(
    "/classify",
    summary="Classify inputs with one or several tasks",
    description="Each input is a string or `{text, text_pair}`. With `tasks`, every input is classified by every "
    "task in one call. Each prediction holds the label and its probability; `return_probabilities` adds all.",
    responses=responses(404, 409, 413, 422, 429, 503),
)
async def classify(service: ServiceDep, body: ClassifyRequest) -> ClassifyResponse:
    inputs = [
        TextInput(item) if isinstance(item, str) else TextInput(item.text, item.text_pair) for item in body.inputs
    ]
    results = await service.classify(body.task_names(), inputs, body.return_probabilities)
    return ClassifyResponse(
        results=[
            TaskPredictionsPublic(
                task=result.task,
                predictions=[
                    PredictionPublic(label=p.label, score=p.score, probabilities=p.probabilities, truncated=p.truncated)
                    for p in result.predictions
                ],
            )
            for result in results
        ]
    )
