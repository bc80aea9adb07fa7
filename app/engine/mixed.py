"""Mixed batches: one forward pass over rows of many tasks, base weights untouched.

For each row ``n`` of task ``t`` and each patch entry of ``t`` with delta ``d = θ_ft − θ_pre`` at that entry:

* ``nn.Linear`` weight ``W[r, c]``:   ``y[n, :, r] += d · x[n, :, c]``
* ``nn.Linear`` bias ``b[r]``:        ``y[n, :, r] += d``
* ``nn.LayerNorm`` weight ``w[j]``:  ``y[n, :, j] += d · x̂[n, :, j]``   (x̂: the normalised input)
* ``nn.LayerNorm`` bias ``b[j]``:     ``y[n, :, j] += d``
* RMSNorm weight ``w[j]`` (Llama-family decoders): ``y[n, :, j] += d · x̂[n, :, j]``, x̂ = x / rms(x)

which is the grafted layer's output up to float rounding (the sum is ordered differently). The index arrays are
built once per batch for all modules together (:func:`build_plan`); each module then does one gather and one
accumulate. Parameters outside Linear/LayerNorm/RMSNorm modules (e.g. embeddings) cannot be patched this way: a
task touching them is not ``mixable`` and the engine runs it by swapping.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from app.engine import kernel
from app.engine.weights import BaseWeights

LINEAR_WEIGHT, LINEAR_BIAS, NORM_WEIGHT, NORM_BIAS = 0, 1, 2, 3


Normaliser = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Target:
    """One base parameter the mixed path can patch: its owning module and role."""

    slot: int
    param: str
    module: nn.Module
    role: int
    # Row length of a Linear weight (flat index = r · in_features + c); 1 for vectors.
    in_features: int
    # Norm weights: x ↦ x̂, the module's input normalised without its affine weight.
    normalise: Normaliser | None = None
    # Norm weights with an exact 0 somewhere: x̂ cannot be read off y = x̂·w there (checked once, at build; the base
    # is pristine whenever a mixed batch runs, so this never changes, and a per-batch check would sync a GPU)
    has_zero_weight: bool = False


def _output_width(target: Target) -> int:
    """Features of the owning module's output (the last dimension a hook indexes)."""
    module = target.module
    return module.out_features if isinstance(module, nn.Linear) else int(module.weight.numel())


def _layer_norm_without_affine(module: nn.LayerNorm) -> Normaliser:
    return lambda x: functional.layer_norm(x, module.normalized_shape, None, None, module.eps)


def _rms_norm_without_weight(module: nn.Module) -> Normaliser:
    # as LlamaRMSNorm computes it: in float32, then back to the input's dtype
    eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))

    def normalise(x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.float32)
        return (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    return normalise


def _is_rms_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 1
        and getattr(module, "bias", None) is None
    )


class DeltaTargets:
    """The table of patchable parameters of one encoder, in a fixed slot order shared by the registry (which
    stores each entry's slot) and the hooks (which read their slice of a batch plan by slot)."""

    def __init__(self, encoder: nn.Module, weights: BaseWeights) -> None:
        self.weights = weights
        offsets = weights.offsets
        targets: list[Target] = []
        for module_name, module in encoder.named_modules():
            prefix = f"{module_name}." if module_name else ""
            normalise: Normaliser | None = None
            if isinstance(module, nn.Linear):
                roles = (("weight", LINEAR_WEIGHT, module.in_features), ("bias", LINEAR_BIAS, 1))
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                roles = (("weight", NORM_WEIGHT, 1), ("bias", NORM_BIAS, 1))
                normalise = _layer_norm_without_affine(module)
            elif _is_rms_norm(module):
                roles = (("weight", NORM_WEIGHT, 1),)
                normalise = _rms_norm_without_weight(module)
            else:
                continue
            for attr, role, width in roles:
                if getattr(module, attr, None) is not None:
                    norm = normalise if role == NORM_WEIGHT else None
                    zero = role == NORM_WEIGHT and bool((module.weight == 0).any())
                    targets.append(Target(len(targets), prefix + attr, module, role, width, norm, zero))
        self.targets = targets
        self.by_param = {target.param: target for target in targets}
        # Per slot: row width of a Linear weight, and where the parameter starts in the global index space.
        self._tables = torch.tensor(
            [
                [t.in_features for t in targets],
                [offsets[t.param] for t in targets],
                [_output_width(t) for t in targets],
            ],
            dtype=torch.int64,
        )
        # The widest input or output of any patched module: with the batch's rows × length it bounds every flat
        # index a hook computes (int32 where that fits).
        self.max_width = max([max(t.in_features, _output_width(t)) for t in targets], default=1)
        self._tables_on: dict[torch.device, torch.Tensor] = {}
        # Slots of each module, so a hook finds its (at most two) slices without a search.
        self.module_slots: dict[nn.Module, list[Target]] = {}
        for target in targets:
            self.module_slots.setdefault(target.module, []).append(target)

    @classmethod
    def of(cls, encoder: nn.Module, weights: BaseWeights) -> DeltaTargets:
        """The table for ``weights``' index space, built once per encoder and shared by engine and registry."""
        targets = _BY_ENCODER.get(encoder)
        if targets is None or targets.weights is not weights:
            targets = _BY_ENCODER[encoder] = cls(encoder, weights)
        return targets

    def __len__(self) -> int:
        return len(self.targets)

    def tables_on(self, device: torch.device) -> torch.Tensor:
        """``[in_features, param_offset, output_width]`` by slot on ``device``, copied there once (not per batch)."""
        if device not in self._tables_on:
            self._tables_on[device] = self._tables.to(device)
        return self._tables_on[device]

    def slot(self, param: str) -> int | None:
        target = self.by_param.get(param)
        return None if target is None else target.slot


_BY_ENCODER: weakref.WeakKeyDictionary[nn.Module, DeltaTargets] = weakref.WeakKeyDictionary()


@dataclass
class Plan:
    """A batch's delta entries grouped by slot: slot ``s`` owns ``[ranges[s][0], ranges[s][1])`` of each array.

    For entry ``e`` of row ``n`` at output feature ``r`` (input column ``c`` for a Linear weight), position ``t``
    of the module's flat output is ``y_base[e] + t · width_out`` and of its flat input ``x_base[e] + t · width_in``,
    with ``y_base = n · length · width_out + r`` and ``x_base = n · length · width_in + c``: computed here for the
    whole batch at once instead of per hook.
    """

    length: int
    out: torch.Tensor
    y_base: torch.Tensor
    x_base: torch.Tensor
    delta: torch.Tensor
    ranges: dict[int, tuple[int, int]]


RowEntries = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def build_plan(row_entries: Sequence[RowEntries], targets: DeltaTargets, device: torch.device, length: int) -> Plan:
    """Index arrays of a whole batch of ``length`` positions, grouped by slot, without a sort.

    ``row_entries[n]`` is row ``n``'s task entries ``(slots, global indices, values, per-slot counts)``, sorted by
    slot (the registry stores them so), and the same tensors for every row of one task: concatenating them is the
    rows × entries product without a Python loop over entries. Each entry's place in the slot-grouped order is
    computed from the per-slot counts (a counting sort): start of its slot + entries of earlier rows in that slot +
    its rank within its own row's slot segment.
    """
    counts = torch.stack([entry[3] for entry in row_entries])  # rows × slots
    slots = torch.cat([entry[0] for entry in row_entries]).to(torch.int64)
    flat = torch.cat([entry[1] for entry in row_entries]).to(torch.int64)
    values = torch.cat([entry[2] for entry in row_entries])
    # δ = θ_ft − θ_pre, read now from the base, which is pristine outside swap batches (same thread, no patch in).
    delta = values - targets.weights.read(flat).to(values.dtype)
    per_row = counts.sum(1)
    rows = torch.repeat_interleave(torch.arange(len(row_entries), device=device), per_row)
    slot_total = counts.sum(0)
    # destination = start of the slot + entries of earlier rows in that slot + rank within the row's segment,
    # with rank = position in the concatenation − start of the row − entries of earlier slots in the row.
    # Everything but the position depends only on (row, slot): computed on the small rows × slots table.
    table = (
        (torch.cumsum(slot_total, 0) - slot_total)[None, :]
        + (torch.cumsum(counts, 0) - counts)
        - (torch.cumsum(counts, 1) - counts)
        - (torch.cumsum(per_row, 0) - per_row)[:, None]
    )
    key = rows * counts.shape[1] + slots
    # index_select / scatter_ on 1-D tensors: several times faster than advanced indexing and index_put
    destination = table.view(-1).index_select(0, key) + torch.arange(flat.numel(), device=device)
    tables = targets.tables_on(device)
    local = flat - tables[1].index_select(0, slots)
    width_in = tables[0].index_select(0, slots)
    width_out = tables[2].index_select(0, slots)
    out = local // width_in
    ints = torch.stack([out, rows * (length * width_out) + out, rows * (length * width_in) + local % width_in])
    index_dtype = _index_dtype(len(row_entries) * length * targets.max_width)
    grouped = torch.empty_like(ints).scatter_(1, destination.expand(3, -1), ints).to(index_dtype)
    grouped_delta = torch.empty_like(delta).scatter_(0, destination, delta)
    ranges = {}
    start = 0
    for slot, count in enumerate(slot_total.tolist()):
        if count:
            ranges[slot] = (start, start + count)
            start += count
    return Plan(length, grouped[0], grouped[1], grouped[2], grouped_delta, ranges)


class DeltaHooks:
    """Forward hooks on the base's Linear and LayerNorm/RMSNorm modules that add per-row sparse deltas.

    Inert unless :attr:`plan` is set, which only the engine's inference thread does, around one forward pass;
    the hooks never write to a parameter.
    """

    def __init__(self, targets: DeltaTargets, use_kernel: bool = True) -> None:
        self.targets = targets
        # take the compiled kernel for Linear modules once this process has it (app.engine.kernel)
        self.use_kernel = use_kernel
        self.plan: Plan | None = None
        self._steps_cache: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._handles = [
            module.register_forward_hook(partial(self._hook, slots)) for module, slots in targets.module_slots.items()
        ]

    def __deepcopy__(self, memo: dict[int, Any]) -> DeltaHooks:
        # A deep copy of the encoder (e.g. to materialize a graft) copies its hooks: the copy's must stay inert.
        inert = DeltaHooks.__new__(DeltaHooks)
        inert.targets, inert.plan, inert._handles, inert._steps_cache = self.targets, None, [], {}
        inert.use_kernel = self.use_kernel
        return inert

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, slots: list[Target], module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> Any:
        plan = self.plan
        if plan is None:
            return None
        parts = [(target, plan.ranges[target.slot]) for target in slots if target.slot in plan.ranges]
        if not parts:
            return None
        x = inputs[0]
        batch, width_out = output.shape[0], output.shape[-1]
        # Flat, contiguous views and 1-D index_select / index_add_: several times faster than advanced indexing
        # over (row, :, column) on the 3-D tensors.
        y = output.reshape(batch, -1, width_out)
        length = plan.length
        if y.shape[1] != length:
            raise ValueError(f"a mixed plan for {length} positions met a module output of {y.shape[1]}")
        flat_y = y.view(-1)
        fused = kernel.compiled() if self.use_kernel else None
        if fused is not None and isinstance(module, nn.Linear) and kernel.usable(y, x, plan.y_base, plan.delta):
            # Linear: nothing reads y here, so each part is added in place as it comes (app.engine.kernel)
            for target, (start, end) in parts:
                if target.role == LINEAR_WEIGHT:
                    fused.linear_delta(
                        flat_y,
                        x,
                        plan.y_base[start:end],
                        plan.x_base[start:end],
                        plan.delta[start:end],
                        length,
                        width_out,
                        x.shape[-1],
                    )
                else:
                    fused.bias_delta(flat_y, plan.y_base[start:end], plan.delta[start:end], length, width_out)
            return y.view(output.shape)
        steps = self._steps(length, y.device, plan.y_base.dtype)
        additions = []
        # Index grids are position-major (positions × entries): consecutive entries of one row and slot are
        # sorted by flat index, so each position's gathers and adds walk memory forwards (with index_select and
        # int32 indices: Linear hooks 160 → 109 ms per 32-row SmolLM2 batch in benchmarks/mixed_profile.py).
        # Every addition is computed before any is applied: a norm weight's x̂ is read off the module's output.
        for target, (start, end) in parts:
            delta = plan.delta[None, start:end].to(y.dtype)
            destination = (plan.y_base[None, start:end] + steps * width_out).view(-1)
            if target.role == LINEAR_WEIGHT:
                source = (plan.x_base[None, start:end] + steps * x.shape[-1]).view(-1)
                values = x.reshape(-1).index_select(0, source).view(length, -1)
                values *= delta
            elif target.role == NORM_WEIGHT:
                values = self._normalised(target, x, flat_y, destination, plan.out[start:end]).view(length, -1)
                values *= delta
            else:
                values = delta.expand(length, -1)
            additions.append((destination, values.reshape(-1)))
        for destination, values in additions:
            flat_y.index_add_(0, destination, values)
        return y.view(output.shape)

    def _steps(self, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``[[0], [1], …, [length−1]]``, made once per batch shape rather than once per hook."""
        key = (length, device, dtype)
        steps = self._steps_cache.get(key)
        if steps is None:
            steps = self._steps_cache[key] = torch.arange(length, device=device, dtype=dtype)[:, None]
        return steps

    def _normalised(
        self, target: Target, x: torch.Tensor, flat_y: torch.Tensor, destination: torch.Tensor, features: torch.Tensor
    ) -> torch.Tensor:
        """x̂ at the patched features (flat, position-major like ``destination``), read off the module's output
        y = x̂·w (+ b) where the base weight is nonzero: a gather instead of a second normalisation pass over the
        whole input."""
        module = target.module
        weight = module.weight[features]
        if target.has_zero_weight and bool((weight == 0).any()):
            # y carries no information about x̂ there: normalise the input again (exact, slower).
            assert target.normalise is not None
            return target.normalise(x).reshape(-1).index_select(0, destination)
        shifted = flat_y.index_select(0, destination).view(-1, features.numel())
        bias = getattr(module, "bias", None)
        if bias is not None:
            shifted = shifted - bias[features][None, :]
        return (shifted / weight[None, :]).view(-1)


def _index_dtype(largest: int) -> torch.dtype:
    """int32 flat indices where the largest tensor they address fits (less memory traffic), else int64."""
    return torch.int32 if largest < 2**31 else torch.int64
