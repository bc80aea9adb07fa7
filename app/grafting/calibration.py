"""Reliability diagrams: per confidence bin, how often the prediction is right (the data behind the ECE)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from app.grafting.evaluate import ECE_BINS


def reliability_bins(
    logits: torch.Tensor, labels: Sequence[int] | torch.Tensor, bins: int = ECE_BINS
) -> list[dict[str, Any]]:
    """One row per equal-width bin (lo, hi] of max-probability confidence: count, mean confidence, accuracy.

    Binned exactly as ``expected_calibration_error`` bins, so Σ (count/n)·|accuracy − confidence| is the ECE.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    confidence, predicted = probs.max(dim=-1)
    correct = (predicted == torch.as_tensor(labels)).float()
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    rows = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        rows.append(
            {
                "lo": b / bins,
                "hi": (b + 1) / bins,
                "count": count,
                "confidence": float(confidence[members].mean()) if count else None,
                "accuracy": float(correct[members].mean()) if count else None,
            }
        )
    return rows
