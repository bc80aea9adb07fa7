"""Batched scoring of encoded examples with a ``TaskModel``: shared by fine-tuning, localization and evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from app.grafting.heads import Encoded, TaskModel, Tokenization


def length_sorted_batches(encoded: Sequence[Encoded], batch_size: int) -> list[list[int]]:
    """Index batches of similar length, so padding stays small; results are put back in input order."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def predict_logits(
    model: TaskModel, tokenization: Tokenization, encoded: Sequence[Encoded], batch_size: int = 64
) -> torch.Tensor:
    """Logits for every encoded example (eval mode, no autograd), in input order, as float32 on the CPU."""
    if not encoded:
        return torch.zeros((0, model.spec.num_labels))
    was_training = model.training
    model.eval()
    device = next(model.encoder.parameters()).device
    out = torch.empty((len(encoded), model.spec.num_labels))
    try:
        for indices in length_sorted_batches(encoded, batch_size):
            batch = tokenization.collate([encoded[i] for i in indices]).to(device)
            out[torch.tensor(indices)] = model(batch).float().cpu()
    finally:
        model.train(was_training)
    return out


def accuracy(logits: torch.Tensor, labels: Sequence[int]) -> float:
    if len(labels) == 0:
        return float("nan")
    return float((logits.argmax(dim=-1) == torch.tensor(list(labels))).float().mean())
