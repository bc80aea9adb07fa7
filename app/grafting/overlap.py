"""Where several tasks' masks meet: pairwise overlap of graft patches, overall and per encoder layer.

For masks γ_i, γ_j (sets of base entries) the report gives, as matrices indexed [i][j]:

* ``containment``: |γ_i ∩ γ_j| / |γ_j| (docs/method.md, "Several skills"; the diagonal is 1);
* ``jaccard``: |γ_i ∩ γ_j| / |γ_i ∪ γ_j|;
* ``intersection``: |γ_i ∩ γ_j| in entries;
* ``sign_agreement``: on the shared entries, the fraction where δ_i = θ_i − θ_pre and δ_j have the same sign
  (None where the masks share nothing): stitching averages deltas there, which only adds up when signs agree.

Masks are read from the patches' sorted index lists, never expanded to dense tensors over the eligible set, so the
cost is linear in the mask sizes. Nothing here imports web, queue or plotting code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from app.grafting.base import layer_of
from app.grafting.patch import GraftPatch


class OverlapError(ValueError):
    """Patches that cannot be compared (another base, or fewer than one task)."""


@dataclass
class _Pair:
    shared: int = 0
    same_sign: int = 0


def patch_deltas(patch: GraftPatch, pre: Mapping[str, torch.Tensor]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per parameter: (sorted flat indices, δ = fine-tuned value − base value) as numpy arrays."""
    out = {}
    for name, (indices, values) in patch.entries.items():
        base_values = pre[name].detach().reshape(-1)[indices].to("cpu", torch.float64)
        out[name] = (indices.numpy(), (values.to(torch.float64) - base_values).numpy())
    return out


def _layer_key(name: str) -> str:
    layer = layer_of(name)
    return "none" if layer is None else str(layer)


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def _matrices(sizes: Sequence[int], pairs: Mapping[tuple[int, int], _Pair]) -> dict[str, list[list[Any]]]:
    n = len(sizes)
    containment: list[list[Any]] = [[None] * n for _ in range(n)]
    jaccard: list[list[Any]] = [[None] * n for _ in range(n)]
    intersection = [[0] * n for _ in range(n)]
    sign: list[list[Any]] = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i == j:
                shared, agree = sizes[i], sizes[i]
            else:
                pair = pairs.get((min(i, j), max(i, j)), _Pair())
                shared, agree = pair.shared, pair.same_sign
            intersection[i][j] = shared
            containment[i][j] = _ratio(shared, sizes[j])
            jaccard[i][j] = _ratio(shared, sizes[i] + sizes[j] - shared)
            sign[i][j] = _ratio(agree, shared)
    return {"containment": containment, "jaccard": jaccard, "intersection": intersection, "sign_agreement": sign}


def overlap_report(patches: Mapping[str, GraftPatch], pre: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Pairwise overlap of the masks of ``patches`` (task name -> patch), overall and per layer (see module doc)."""
    if not patches:
        raise OverlapError("name at least one task")
    fingerprints = {patch.base_fingerprint for patch in patches.values()}
    if len(fingerprints) > 1:
        raise OverlapError("the patches were made for different base models: their masks cannot be compared")
    names = list(patches)
    deltas = [patch_deltas(patches[name], pre) for name in names]
    sizes = [sum(len(idx) for idx, _ in d.values()) for d in deltas]
    layers = sorted({_layer_key(p) for d in deltas for p in d}, key=lambda k: (len(k), k))
    layer_sizes = {key: [0] * len(names) for key in layers}
    for t, d in enumerate(deltas):
        for param, (idx, _) in d.items():
            layer_sizes[_layer_key(param)][t] += len(idx)
    overall: dict[tuple[int, int], _Pair] = {}
    per_layer: dict[str, dict[tuple[int, int], _Pair]] = {key: {} for key in layers}
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            for param in deltas[i].keys() & deltas[j].keys():
                idx_i, delta_i = deltas[i][param]
                idx_j, delta_j = deltas[j][param]
                _, at_i, at_j = np.intersect1d(idx_i, idx_j, assume_unique=True, return_indices=True)
                if not len(at_i):
                    continue
                same = int((np.sign(delta_i[at_i]) == np.sign(delta_j[at_j])).sum())
                for bucket in (overall, per_layer[_layer_key(param)]):
                    pair = bucket.setdefault((i, j), _Pair())
                    pair.shared += len(at_i)
                    pair.same_sign += same
    return {
        "tasks": names,
        "sizes": dict(zip(names, sizes, strict=True)),
        **_matrices(sizes, overall),
        "per_layer": {
            key: {
                "sizes": dict(zip(names, layer_sizes[key], strict=True)),
                **_matrices(layer_sizes[key], per_layer[key]),
            }
            for key in layers
        },
    }


def mean_off_diagonal(
    matrix: Sequence[Sequence[float | None]], rows: Sequence[int], cols: Sequence[int]
) -> float | None:
    """Mean of ``matrix[i][j]`` over i in ``rows``, j in ``cols``, i != j, ignoring None (for group comparisons)."""
    values = [matrix[i][j] for i in rows for j in cols if i != j and matrix[i][j] is not None]
    return float(sum(values) / len(values)) if values else None  # type: ignore[arg-type]
