"""The base weights as the engine writes them: one flat buffer, one lock, exact swap and restore.

At start-up every parameter of the encoder is moved into a single contiguous buffer (each ``Parameter`` keeps its
identity and shape; its data becomes a view into the buffer), so a patch touching dozens of tensors is applied
with one gather (save the originals) and one scatter, and restored with one scatter: a handful of kernel launches
per batch instead of several per tensor. Patch entries are therefore stored as *global* indices into that buffer
(parameter offset + flat index). If the parameters do not share one dtype and device, nothing is moved and the
same global indices are applied tensor by tensor.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch
from torch import nn

_BY_ENCODER: weakref.WeakKeyDictionary[nn.Module, BaseWeights] = weakref.WeakKeyDictionary()


@dataclass
class Saved:
    """Originals at the patched entries, written back by :meth:`BaseWeights.restore`."""

    indices: torch.Tensor
    originals: torch.Tensor


class BaseWeights:
    """Single-writer access to the base encoder's parameters.

    ``lock`` is held by whoever has a patch swapped in (the inference thread) and by readers that need pristine
    values (the registry computing deltas), so neither ever sees the other's half-done work.
    """

    def __init__(self, encoder: nn.Module) -> None:
        self.lock = threading.Lock()
        self.parameters: dict[str, nn.Parameter] = dict(encoder.named_parameters())
        self.offsets: dict[str, int] = {}
        total = 0
        for name, param in self.parameters.items():
            self.offsets[name] = total
            total += param.numel()
        self.numel = total
        self.index_dtype = torch.int32 if total < 2**31 else torch.int64
        dtypes = {p.dtype for p in self.parameters.values()}
        devices = {p.device for p in self.parameters.values()}
        self.flat: torch.Tensor | None = None
        if len(dtypes) == 1 and len(devices) == 1 and self.parameters:
            self.flat = self._pack(dtypes.pop(), devices.pop(), total)

    @classmethod
    def of(cls, encoder: nn.Module) -> BaseWeights:
        """The encoder's one ``BaseWeights`` (created on first use): two would each think they own the buffer."""
        # Kept beside the module, not on it: a deepcopy of the encoder must not drag the lock along.
        weights = _BY_ENCODER.get(encoder)
        if weights is None:
            weights = _BY_ENCODER[encoder] = cls(encoder)
        return weights

    def _pack(self, dtype: torch.dtype, device: torch.device, total: int) -> torch.Tensor:
        flat = torch.empty(total, dtype=dtype, device=device)
        with torch.no_grad():
            for name, param in self.parameters.items():
                start = self.offsets[name]
                view = flat[start : start + param.numel()].view(param.shape)
                view.copy_(param.data)
                param.data = view
        return flat

    def read(self, indices: torch.Tensor) -> torch.Tensor:
        """Current values at global indices (take ``lock`` first if pristine values are needed). Without a flat
        buffer the values come back as float64, which holds every narrower float exactly."""
        if self.flat is not None:
            return self.flat.index_select(0, indices)
        out = torch.empty(indices.numel(), dtype=torch.float64, device=indices.device)
        for flat, local, where in self._segments(indices):
            out[where] = flat[local].to(torch.float64)
        return out

    def apply(self, indices: torch.Tensor, values: torch.Tensor) -> Saved:
        """Write ``values`` at global ``indices`` (caller holds ``lock``); returns what restores the base exactly.

        All or nothing: if the write fails part-way (the per-tensor path can, after some tensors were written),
        the originals are written back before the error propagates."""
        with torch.no_grad():
            saved = Saved(indices, self.read(indices))
            try:
                self._write(indices, values)
            except BaseException:
                self.restore(saved)
                raise
            return saved

    def restore(self, saved: Saved) -> None:
        with torch.no_grad():
            self._write(saved.indices, saved.originals)

    def _write(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        if self.flat is not None:
            self.flat[indices] = values.to(self.flat.dtype)
            return
        for flat, local, where in self._segments(indices):
            flat[local] = values[where].to(flat.dtype)

    def _segments(self, indices: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(flat parameter view, its local indices, their positions in ``indices``) per touched parameter."""
        names = list(self.parameters)
        bounds = torch.tensor([self.offsets[n] for n in names], device=indices.device)
        owner = torch.searchsorted(bounds, indices.to(torch.int64), right=True) - 1
        out = []
        for i in owner.unique().tolist():
            where = owner == i
            local = indices[where].to(torch.int64) - self.offsets[names[i]]
            out.append((self.parameters[names[i]].data.view(-1), local, where))
        return out
