"""The graft patch: a versioned safetensors file holding γ⊙θ_ft for the masked entries of the base.

Layout of a patch file (format version 1):

* ``indices/<param>``: int64 flat indices (sorted, unique) of the masked entries of base parameter ``<param>``;
* ``values/<param>``: the fine-tuned values at those indices, in the base parameter's dtype;
* ``head/<name>``: dense tensors for parameters the base lacks (a classifier head);
* safetensors metadata ``skillgraft.format_version`` and ``skillgraft.meta`` (JSON: base fingerprint, task,
  head spec, eligible rule, sparsity, method, source checkpoint hash, creation time, metrics).

Applying a patch writes the fine-tuned values in place and keeps the originals, so restoring writes them back:
the base returns bit-identical (never restored by subtraction, which rounds).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save, save_file

from app.core.files import atomic_write
from app.grafting.base import BaseModel
from app.grafting.heads import Example, HeadError, HeadSpec, Tokenization, label_word_ids, validate_head_tensors
from app.grafting.patch_metadata import PatchMetadataError, parse_patch_metadata

PATCH_FORMAT_VERSION = 1
SUPPORTED_VERSIONS = {1}
INDICES = "indices/"
VALUES = "values/"
HEAD = "head/"


class PatchError(ValueError):
    """A patch file that cannot be used; the message names the problem."""


class BaseMismatchError(PatchError):
    """A well-formed patch made for another base model."""


@dataclass
class GraftPatch:
    task: str
    spec: HeadSpec
    base_fingerprint: str
    # base parameter name -> (sorted unique int64 flat indices, fine-tuned values in the base dtype)
    entries: dict[str, tuple[torch.Tensor, torch.Tensor]]
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    eligible_rule: str = "layers"
    eligible_size: int = 0
    method: str = "manual"
    source_checkpoint_sha256: str | None = None
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = PATCH_FORMAT_VERSION

    @property
    def mask_size(self) -> int:
        return sum(int(indices.numel()) for indices, _ in self.entries.values())

    @property
    def head_entries(self) -> int:
        """Values of the dense head tensors (classifier mode): carried beside the mask, not counted in it."""
        return sum(int(tensor.numel()) for tensor in self.head.values())

    @property
    def sparsity(self) -> float:
        return self.mask_size / self.eligible_size if self.eligible_size else 0.0

    @property
    def nbytes(self) -> int:
        sparse = sum(i.numel() * i.element_size() + v.numel() * v.element_size() for i, v in self.entries.values())
        return sparse + sum(t.numel() * t.element_size() for t in self.head.values())

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "task": self.task,
            "base_fingerprint": self.base_fingerprint,
            "head": self.spec.to_json(),
            "eligible_rule": self.eligible_rule,
            "eligible_size": self.eligible_size,
            "mask_size": self.mask_size,
            "head_entries": self.head_entries,
            "sparsity": self.sparsity,
            "method": self.method,
            "source_checkpoint_sha256": self.source_checkpoint_sha256,
            "created_at": self.created_at,
            "metrics": self.metrics,
            "extra": self.extra,
        }

    def masks(self, shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
        """Dense boolean masks, one per touched parameter, for analysis (overlap, per-layer counts)."""
        out = {}
        for name, (indices, _) in self.entries.items():
            mask = torch.zeros(int(math.prod(shapes[name])), dtype=torch.bool)
            mask[indices] = True
            out[name] = mask.view(shapes[name])
        return out


def build_patch(
    pre: Mapping[str, torch.Tensor],
    ft: Mapping[str, torch.Tensor],
    mask: Mapping[str, torch.Tensor],
    *,
    task: str,
    spec: HeadSpec,
    base_fingerprint: str,
    head: Mapping[str, torch.Tensor] | None = None,
    eligible_rule: str = "layers",
    eligible_size: int | None = None,
    method: str = "manual",
    source_checkpoint_sha256: str | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> GraftPatch:
    """A patch holding ``ft`` at the entries where ``mask`` is true (parameters with an empty mask are omitted)."""
    entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in sorted(mask):
        if name not in pre or name not in ft:
            raise PatchError(f"mask names {name!r}, which the base or the checkpoint lacks")
        if mask[name].shape != pre[name].shape:
            raise PatchError(
                f"mask for {name!r} has shape {tuple(mask[name].shape)}, expected {tuple(pre[name].shape)}"
            )
        indices = torch.nonzero(mask[name].reshape(-1).to("cpu"), as_tuple=False).reshape(-1).to(torch.int64)
        if indices.numel() == 0:
            continue
        values = ft[name].detach().to("cpu").reshape(-1)[indices].to(pre[name].dtype).clone()
        entries[name] = (indices, values)
    return GraftPatch(
        task=task,
        spec=spec,
        base_fingerprint=base_fingerprint,
        entries=entries,
        head={k: v.detach().to("cpu").contiguous().clone() for k, v in (head or {}).items()},
        eligible_rule=eligible_rule,
        eligible_size=eligible_size if eligible_size is not None else sum(pre[n].numel() for n in mask),
        method=method,
        source_checkpoint_sha256=source_checkpoint_sha256,
        metrics=dict(metrics or {}),
        extra=dict(extra or {}),
    )


def _tensors_and_metadata(patch: GraftPatch) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    for name, (indices, values) in patch.entries.items():
        tensors[INDICES + name] = indices.contiguous()
        tensors[VALUES + name] = values.contiguous()
    for name, tensor in patch.head.items():
        tensors[HEAD + name] = tensor.contiguous()
    metadata = {
        "skillgraft.format_version": str(patch.format_version),
        "skillgraft.meta": json.dumps(patch.metadata(), sort_keys=True),
    }
    return tensors, metadata


def save_patch(patch: GraftPatch, path: str | Path) -> Path:
    tensors, metadata = _tensors_and_metadata(patch)
    target = Path(path)
    atomic_write(target, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return target


def patch_to_bytes(patch: GraftPatch) -> bytes:
    """The patch file's bytes, for stores that stage and rename them themselves."""
    tensors, metadata = _tensors_and_metadata(patch)
    return save(tensors, metadata=metadata)


def load_patch(path: str | Path) -> GraftPatch:
    """Parse a patch file and check its internal consistency (not yet against a base: see ``validate_patch``)."""
    file = Path(path)
    try:
        with safe_open(str(file), framework="pt") as handle:
            header = handle.metadata() or {}
            names = list(handle.keys())  # noqa: SIM118 - safe_open is not a mapping
            tensors = {name: handle.get_tensor(name) for name in names}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise PatchError(f"not a readable safetensors file: {exc}") from exc
    version_text = header.get("skillgraft.format_version")
    if version_text is None or "skillgraft.meta" not in header:
        raise PatchError("not a skillgraft patch: metadata 'skillgraft.format_version' is missing")
    try:
        version = int(version_text)
    except ValueError as exc:
        raise PatchError(f"format version {version_text!r} is not an integer") from exc
    if version not in SUPPORTED_VERSIONS:
        raise PatchError(f"unsupported patch format version {version}; this build reads {sorted(SUPPORTED_VERSIONS)}")
    try:
        _, meta = parse_patch_metadata(header["skillgraft.meta"])
    except PatchMetadataError as exc:
        raise PatchError(str(exc)) from exc

    entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    head: dict[str, torch.Tensor] = {}
    for name in names:
        if name.startswith(HEAD):
            head[name[len(HEAD) :]] = tensors[name]
        elif name.startswith(INDICES):
            param = name[len(INDICES) :]
            if VALUES + param not in tensors:
                raise PatchError(f"parameter {param!r} has indices but no values")
            entries[param] = (tensors[name], tensors[VALUES + param])
        elif name.startswith(VALUES):
            if INDICES + name[len(VALUES) :] not in tensors:
                raise PatchError(f"parameter {name[len(VALUES) :]!r} has values but no indices")
        else:
            raise PatchError(f"unexpected tensor {name!r} in patch")
    for param, (indices, values) in entries.items():
        if indices.dtype != torch.int64 or indices.dim() != 1:
            raise PatchError(
                f"indices of {param!r} must be a 1-D int64 tensor, got {indices.dtype} {tuple(indices.shape)}"
            )
        if values.dim() != 1 or values.numel() != indices.numel():
            raise PatchError(f"length mismatch for {param!r}: {indices.numel()} indices but {values.numel()} values")
        if not values.is_floating_point():
            raise PatchError(f"values of {param!r} have dtype {values.dtype}, expected a float dtype")
        if not torch.isfinite(values).all():
            raise PatchError(f"values of {param!r} hold NaN or Inf")
        if indices.numel() and (indices[0] < 0 or (indices[1:] <= indices[:-1]).any()):
            raise PatchError(f"indices of {param!r} must be non-negative, sorted and unique")
    for name, tensor in head.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise PatchError(f"head tensor {name!r} holds NaN or Inf")
    return GraftPatch(
        task=meta.task,
        spec=meta.head.to_spec(),
        base_fingerprint=meta.base_fingerprint,
        entries=dict(sorted(entries.items())),
        head=head,
        eligible_rule=meta.eligible_rule,
        eligible_size=meta.eligible_size,
        method=meta.method,
        source_checkpoint_sha256=meta.source_checkpoint_sha256,
        created_at=meta.created_at or "",
        metrics=dict(meta.metrics),
        extra=dict(meta.extra),
        format_version=version,
    )


def validate_patch(
    patch: GraftPatch, parameters: Mapping[str, torch.Tensor], fingerprint: str, hidden_size: int
) -> None:
    """Check a parsed patch against a base's tensors: fingerprint, parameter names, index ranges, dtypes, head
    shapes. ``validate_for_base`` adds the checks that need the tokenizer; prefer it where a base is at hand."""
    if patch.base_fingerprint != fingerprint:
        raise BaseMismatchError(
            f"patch was made for base {patch.base_fingerprint[:23]}…, this server runs {fingerprint[:23]}…"
        )
    for name, (indices, values) in patch.entries.items():
        if name not in parameters:
            raise PatchError(f"unknown parameter {name!r}: the base has no such tensor")
        target = parameters[name]
        if indices.numel() and int(indices[-1]) >= target.numel():
            raise PatchError(f"index {int(indices[-1])} out of range for {name!r} with {target.numel()} entries")
        if values.dtype != target.dtype:
            raise PatchError(f"dtype mismatch for {name!r}: patch has {values.dtype}, base has {target.dtype}")
    try:
        validate_head_tensors(patch.spec, patch.head, hidden_size)
    except HeadError as exc:
        raise PatchError(str(exc)) from exc


def validate_for_base(patch: GraftPatch, base: BaseModel, max_length: int = 128) -> GraftPatch:
    """Everything a patch must pass before it is stored, served, stitched or evaluated on ``base``: the tensor
    checks of ``validate_patch``, label words the base's vocabulary can score, and a head that can tokenize a
    short input within ``max_length`` tokens (a template longer than that would fail every request).
    Raises ``BaseMismatchError`` or ``PatchError``; returns the patch for chaining."""
    validate_patch(patch, base.parameters, base.fingerprint, base.hidden_size)
    try:
        tokenization = Tokenization(base.tokenizer, patch.spec, max_length, base.family)
        tokenization.encode(Example("a", 0, "a"))
        if patch.spec.mode == "prompt":
            label_word_ids(base.tokenizer, patch.spec.label_words or (), base.family)
    except HeadError as exc:
        raise PatchError(str(exc)) from exc
    return patch


@dataclass
class AppliedPatch:
    """Originals saved while writing values into live parameters; ``restore`` writes them back exactly."""

    saved: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]  # (flat view, indices or None, originals)

    def restore(self) -> None:
        with torch.no_grad():
            for flat, indices, originals in reversed(self.saved):
                if indices is None:
                    flat.copy_(originals)
                else:
                    flat[indices] = originals
        self.saved = []


# What to write into one parameter: (flat indices, values at them), or (None, a whole new tensor).
Writes = Mapping[str, tuple[torch.Tensor | None, torch.Tensor]]


def write_saving(parameters: Mapping[str, torch.Tensor], writes: Writes) -> AppliedPatch:
    """The one way grafting code writes into live parameters outside the engine (whose flat buffer has its own
    ``BaseWeights``): originals are kept for an exact restore, and a failure part-way restores what was written."""
    applied = AppliedPatch([])
    with torch.no_grad():
        try:
            for name, (indices, values) in writes.items():
                flat = parameters[name].data.view(-1)
                source = values.to(flat.device, flat.dtype).reshape(-1)
                if indices is None:
                    applied.saved.append((flat, None, flat.clone()))
                    flat.copy_(source)
                else:
                    idx = indices.to(flat.device)
                    applied.saved.append((flat, idx, flat[idx].clone()))
                    flat[idx] = source
        except BaseException:
            applied.restore()
            raise
    return applied


def apply_patch(parameters: Mapping[str, torch.Tensor], patch: GraftPatch) -> AppliedPatch:
    """Scatter the patch's fine-tuned values into live parameters, keeping the originals for an exact restore."""
    return write_saving(parameters, patch.entries)


@contextmanager
def restored_after(applied: AppliedPatch) -> Iterator[None]:
    try:
        yield
    finally:
        applied.restore()


def grafted(parameters: Mapping[str, torch.Tensor], patch: GraftPatch) -> contextlib.AbstractContextManager[None]:
    """``with grafted(params, patch):`` runs the block on θ_pre + γ⊙δ and restores the base even on error."""
    return restored_after(apply_patch(parameters, patch))


def swapped_weights(
    parameters: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]
) -> contextlib.AbstractContextManager[None]:
    """Run a block with whole tensors ``values`` written into the live parameters (e.g. θ_ft's body); originals
    written back exactly after. Only tensors that differ are swapped (a fine-tune leaves the embeddings alone)."""
    moved = {name: value.to(parameters[name].device, parameters[name].dtype) for name, value in values.items()}
    writes = {name: (None, value) for name, value in moved.items() if not torch.equal(value, parameters[name])}
    return restored_after(write_saving(parameters, writes))


def materialize_entries(
    pre: Mapping[str, torch.Tensor], entries: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """A dense state dict: every base tensor, with ``entries`` (flat indices, values) written in."""
    out = {name: tensor.detach().to("cpu").clone() for name, tensor in pre.items()}
    for name, (indices, values) in entries.items():
        out[name].view(-1)[indices] = values
    return out


def materialize(pre: Mapping[str, torch.Tensor], patch: GraftPatch) -> dict[str, torch.Tensor]:
    """A full grafted state dict: base tensors with the patch's entries written in, plus the head tensors."""
    out = materialize_entries(pre, patch.entries)
    out.update({name: tensor.clone() for name, tensor in patch.head.items()})
    return out
