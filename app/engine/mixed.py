"""Mixed batches: one forward pass over rows of many tasks, base weights untouched.

For each row ``n`` of task ``t`` and each patch entry of ``t`` with delta ``d = θ_ft − θ_pre`` at that entry:

* ``nn.Linear`` weight ``W[r, c]``:   ``y[n, :, r] += d · x[n, :, c]``
* ``nn.Linear`` bias ``b[r]``:        ``y[n, :, r] += d``
* ``nn.LayerNorm`` weight ``w[j]``:  ``y[n, :, j] += d · x̂[n, :, j]``   (x̂: the normalised input)
* ``nn.LayerNorm`` bias ``b[j]``:     ``y[n, :, j] += d``

which is the grafted layer's output up to float rounding (the sum is ordered differently). The index arrays are
built once per batch for all modules together (:func:`build_plan`); each module then does one gather and one
accumulate. Parameters outside Linear/LayerNorm modules (e.g. embeddings) cannot be patched this way: a task
touching them is not ``mixable`` and the engine runs it by swapping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn import functional

LINEAR_WEIGHT, LINEAR_BIAS, NORM_WEIGHT, NORM_BIAS = 0, 1, 2, 3


@dataclass(frozen=True)
class Target:
    """One base parameter the mixed path can patch: its owning module and role."""

    slot: int
    param: str
    module: nn.Module
    role: int
    # Row length of a Linear weight (flat index = r · in_features + c); 1 for vectors.
    in_features: int


class DeltaTargets:
    """The table of patchable parameters of one encoder, in a fixed slot order shared by the registry (which
    stores each entry's slot) and the hooks (which read their slice of a batch plan by slot)."""

    def __init__(self, encoder: nn.Module) -> None:
        targets: list[Target] = []
        for module_name, module in encoder.named_modules():
            prefix = f"{module_name}." if module_name else ""
            if isinstance(module, nn.Linear):
                roles = (("weight", LINEAR_WEIGHT, module.in_features), ("bias", LINEAR_BIAS, 1))
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                roles = (("weight", NORM_WEIGHT, 1), ("bias", NORM_BIAS, 1))
            else:
                continue
            for attr, role, width in roles:
                if getattr(module, attr, None) is not None:
                    targets.append(Target(len(targets), prefix + attr, module, role, width))
        self.targets = targets
        self.by_param = {target.param: target for target in targets}
        self.in_features = torch.tensor([t.in_features for t in targets], dtype=torch.int32)
        # Slots of each module, so a hook finds its (at most two) slices without a search.
        self.module_slots: dict[nn.Module, list[Target]] = {}
        for target in targets:
            self.module_slots.setdefault(target.module, []).append(target)

    def __len__(self) -> int:
        return len(self.targets)

    def slot(self, param: str) -> int | None:
        target = self.by_param.get(param)
        return None if target is None else target.slot


@dataclass
class SlotEntries:
    """One slot's share of a batch plan: rows, output index, input column (Linear weight only) and delta."""

    rows: torch.Tensor
    out: torch.Tensor
    col: torch.Tensor
    delta: torch.Tensor


Plan = dict[int, SlotEntries]


def build_plan(
    row_entries: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], targets: DeltaTargets, device: torch.device
) -> Plan:
    """Index arrays of a whole batch, grouped by slot.

    ``row_entries[n]`` is row ``n``'s task entries ``(slots int16, flat indices int32, deltas)``: the same tensors
    for every row of one task, so the concatenation below is the rows × entries product without a Python loop
    over entries.
    """
    if not row_entries:
        return {}
    counts = torch.tensor([int(entry[0].numel()) for entry in row_entries], device=device)
    slots = torch.cat([entry[0] for entry in row_entries]).to(torch.int64)
    flat = torch.cat([entry[1] for entry in row_entries])
    delta = torch.cat([entry[2] for entry in row_entries])
    rows = torch.repeat_interleave(torch.arange(len(row_entries), device=device), counts)
    order = torch.argsort(slots, stable=True)
    slots, flat, delta, rows = slots[order], flat[order], delta[order], rows[order]
    width = targets.in_features.to(device)[slots]
    out, col = flat // width, flat % width
    per_slot = torch.bincount(slots, minlength=len(targets)).tolist()
    plan: Plan = {}
    start = 0
    for slot, count in enumerate(per_slot):
        if count:
            end = start + count
            plan[slot] = SlotEntries(rows[start:end], out[start:end], col[start:end], delta[start:end])
            start = end
    return plan


class DeltaHooks:
    """Forward hooks on the encoder's Linear and LayerNorm modules that add per-row sparse deltas.

    Inert unless :attr:`plan` is set, which only the engine's inference thread does, around one forward pass
    (``with hooks.active(plan):``); the hooks never write to a parameter.
    """

    def __init__(self, targets: DeltaTargets) -> None:
        self.targets = targets
        self.plan: Plan | None = None
        self._handles = [
            module.register_forward_hook(partial(self._hook, slots)) for module, slots in targets.module_slots.items()
        ]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, slots: list[Target], module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> Any:
        plan = self.plan
        if plan is None:
            return None
        parts = [(target, plan[target.slot]) for target in slots if target.slot in plan]
        if not parts:
            return None
        x = inputs[0]
        batch = output.shape[0]
        y = output.reshape(batch, -1, output.shape[-1])
        positions = torch.arange(y.shape[1], device=y.device)[None, :]
        for target, entries in parts:
            if target.role == LINEAR_WEIGHT:
                source = x.reshape(batch, -1, x.shape[-1])
                # source[rows, :, col] has shape (entries, positions): each entry's input column, per position
                values = source[entries.rows, :, entries.col] * entries.delta[:, None].to(y.dtype)
            elif target.role == NORM_WEIGHT:
                assert isinstance(module, nn.LayerNorm)
                normalised = functional.layer_norm(x, module.normalized_shape, None, None, module.eps)
                source = normalised.reshape(batch, -1, normalised.shape[-1])
                values = source[entries.rows, :, entries.out] * entries.delta[:, None].to(y.dtype)
            else:
                values = entries.delta[:, None].to(y.dtype).expand(-1, y.shape[1])
            y.index_put_((entries.rows[:, None], positions, entries.out[:, None]), values, accumulate=True)
        return y.view(output.shape)
