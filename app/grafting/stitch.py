"""Localize-and-Stitch (docs/method.md, "Several skills"): several task grafts merged into one multi-skill model.

θ = θ_pre + Σ_i γ'_i⊙δ_i with γ'_i = γ_i / Σ_j γ_j: an entry in one task's mask takes that task's fine-tuned value,
an entry shared by several masks takes the mean of their deltas, every other entry stays θ_pre.

The stitched body is held sparsely, as patch entries over the union of the masks, so it can be served like any
patch: :func:`member_patch` pairs it with one task's head (each task keeps its own label words or classifier), and
:func:`stitched_state_dict` writes it out densely as a plain encoder state dict. Nothing here imports web or queue
code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from app.grafting.patch import GraftPatch, materialize_entries


class StitchError(ValueError):
    """Patches that cannot be stitched together (another base, no tasks, a repeated task)."""


@dataclass
class Stitched:
    """The union mask with the stitched values, and how much of it several tasks share."""

    tasks: list[str]
    base_fingerprint: str
    # base parameter -> (sorted unique flat indices, stitched values in the base dtype)
    entries: dict[str, tuple[torch.Tensor, torch.Tensor]]
    eligible_size: int = 0
    # entries of the union covered by 1, 2, ... masks (key: the count, as a string for JSON)
    coverage: dict[str, int] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(int(indices.numel()) for indices, _ in self.entries.values())

    def masks(self, shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
        """The union mask as dense booleans per touched tensor (e.g. to protect it while fine-tuning)."""
        out = {}
        for param, (indices, _) in self.entries.items():
            mask = torch.zeros(shapes[param], dtype=torch.bool)
            mask.view(-1)[indices] = True
            out[param] = mask
        return out

    def summary(self) -> dict[str, Any]:
        shared = sum(count for times, count in self.coverage.items() if int(times) > 1)
        return {
            "tasks": self.tasks,
            "union_size": self.size,
            "shared_entries": shared,
            "coverage": self.coverage,
            "eligible_size": self.eligible_size,
            "sparsity": self.size / self.eligible_size if self.eligible_size else None,
        }


def stitch(pre: Mapping[str, torch.Tensor], patches: Sequence[GraftPatch]) -> Stitched:
    """θ_pre + Σ_i γ'_i⊙δ_i over the union of the patches' masks (see module doc); ``pre`` is left untouched."""
    if not patches:
        raise StitchError("name at least one task to stitch")
    names = [patch.task for patch in patches]
    if len(set(names)) != len(names):
        raise StitchError(f"a task is named twice: {names}")
    fingerprints = {patch.base_fingerprint for patch in patches}
    if len(fingerprints) > 1:
        raise StitchError("the patches were made for different base models")
    params = sorted({name for patch in patches for name in patch.entries})
    entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    coverage: dict[int, int] = {}
    for param in params:
        if param not in pre:
            raise StitchError(f"a patch touches {param!r}, which the base lacks")
        flat = pre[param].detach().reshape(-1).to("cpu")
        parts = [patch.entries[param] for patch in patches if param in patch.entries]
        indices = torch.cat([idx for idx, _ in parts])
        # δ in float64 so that a mean of several deltas does not round differently from the formula
        deltas = torch.cat([values.to(torch.float64) - flat[idx].to(torch.float64) for idx, values in parts])
        union, inverse = torch.unique(indices, sorted=True, return_inverse=True)
        total = torch.zeros(union.numel(), dtype=torch.float64).index_add_(0, inverse, deltas)
        counts = torch.bincount(inverse, minlength=union.numel())
        values = (flat[union].to(torch.float64) + total / counts).to(flat.dtype)
        entries[param] = (union, values)
        for times, count in zip(*torch.unique(counts, return_counts=True), strict=True):
            coverage[int(times)] = coverage.get(int(times), 0) + int(count)
    return Stitched(
        tasks=names,
        base_fingerprint=patches[0].base_fingerprint,
        entries=entries,
        eligible_size=max(patch.eligible_size for patch in patches),
        coverage={str(k): v for k, v in sorted(coverage.items())},
    )


def member_patch(stitched: Stitched, patch: GraftPatch, name: str, extra: dict[str, Any] | None = None) -> GraftPatch:
    """One task of the stitched model as a servable patch: the stitched body, ``patch``'s own head and labels."""
    return GraftPatch(
        task=name,
        spec=patch.spec,
        base_fingerprint=stitched.base_fingerprint,
        entries={param: (idx.clone(), values.clone()) for param, (idx, values) in stitched.entries.items()},
        head={key: tensor.clone() for key, tensor in patch.head.items()},
        eligible_rule=patch.eligible_rule,
        eligible_size=stitched.eligible_size,
        method="stitch",
        source_checkpoint_sha256=patch.source_checkpoint_sha256,
        extra={"stitch": stitched.summary(), "member": patch.task, **(extra or {})},
    )


def stitched_state_dict(pre: Mapping[str, torch.Tensor], stitched: Stitched) -> dict[str, torch.Tensor]:
    """The stitched body as a dense state dict (bare names, every base tensor; no head)."""
    return materialize_entries(pre, stitched.entries)
