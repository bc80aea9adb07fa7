"""Graft patch format: exact apply/restore, materialize, and refusal of every malformed patch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from app.grafting.base import BaseModel
from app.grafting.heads import HeadSpec
from app.grafting.patch import (
    BaseMismatchError,
    PatchError,
    apply_patch,
    build_patch,
    grafted,
    load_patch,
    materialize,
    save_patch,
    validate_patch,
)
from tests.utils.tiny import make_patch, random_finetune, random_mask

SPEC = HeadSpec("prompt", ("negative", "positive"), "{text} It was {mask} .", ("terrible", "great"))


def _snapshot(base: BaseModel) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in base.parameters.items()}


def test_apply_gives_masked_finetune_and_restore_is_bit_exact(tiny_base: BaseModel) -> None:
    pre = _snapshot(tiny_base)
    ft = random_finetune(tiny_base, seed=3)
    mask = random_mask(tiny_base, 0.05, seed=4)
    patch = build_patch(pre, ft, mask, task="t", spec=SPEC, base_fingerprint=tiny_base.fingerprint)
    live = tiny_base.parameters
    applied = apply_patch(live, patch)
    try:
        for name, tensor in live.items():
            expected = torch.where(mask[name], ft[name], pre[name]) if name in mask else pre[name]
            assert torch.equal(tensor, expected), name
    finally:
        applied.restore()
    for name, tensor in live.items():
        assert torch.equal(tensor, pre[name]), name
    assert patch.mask_size == sum(int(m.sum()) for m in mask.values())


def test_grafted_restores_on_exception(tiny_base: BaseModel) -> None:
    pre = _snapshot(tiny_base)
    patch = make_patch(tiny_base, fraction=0.1)
    with pytest.raises(RuntimeError, match="boom"), grafted(tiny_base.parameters, patch):
        assert not all(torch.equal(t, pre[n]) for n, t in tiny_base.parameters.items())
        raise RuntimeError("boom")
    assert all(torch.equal(t, pre[n]) for n, t in tiny_base.parameters.items())


def test_materialize_matches_live_graft(tiny_base: BaseModel) -> None:
    patch = make_patch(tiny_base, mode="classifier", fraction=0.02)
    state = materialize(tiny_base.parameters, patch)
    with grafted(tiny_base.parameters, patch):
        for name, tensor in tiny_base.parameters.items():
            assert torch.equal(state[name], tensor)
    assert set(patch.head) <= set(state)


def test_save_load_round_trip(tiny_base: BaseModel, tmp_path: Path) -> None:
    patch = make_patch(tiny_base, task="rt", mode="classifier")
    patch.metrics = {"graft_accuracy": 0.9}
    path = save_patch(patch, tmp_path / "p.safetensors")
    loaded = load_patch(path)
    validate_patch(loaded, tiny_base.parameters, tiny_base.fingerprint, tiny_base.hidden_size)
    assert loaded.task == "rt" and loaded.spec == patch.spec and loaded.metrics == {"graft_accuracy": 0.9}
    assert loaded.mask_size == patch.mask_size and loaded.eligible_size == patch.eligible_size
    for name, (indices, values) in patch.entries.items():
        assert torch.equal(loaded.entries[name][0], indices) and torch.equal(loaded.entries[name][1], values)
    assert all(torch.equal(loaded.head[n], t) for n, t in patch.head.items())
    assert not list(tmp_path.glob(".*tmp")), "no temporary file left behind"


def _rewrite(path: Path, edit_tensors=None, edit_meta=None) -> Path:  # type: ignore[no-untyped-def]
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        metadata = dict(handle.metadata())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(metadata)
    out = path.with_name("edited.safetensors")
    save_file(tensors, str(out), metadata=metadata)
    return out


def _first(tensors: dict[str, torch.Tensor], prefix: str) -> str:
    return next(k for k in sorted(tensors) if k.startswith(prefix))


def _set_meta(key: str, value: object):  # type: ignore[no-untyped-def]
    def edit(metadata: dict[str, str]) -> None:
        meta = json.loads(metadata["skillgraft.meta"])
        meta[key] = value
        metadata["skillgraft.meta"] = json.dumps(meta)

    return edit


def _out_of_range(t: dict[str, torch.Tensor]) -> None:
    key = _first(t, "indices/")
    t[key] = t[key].clone()
    t[key][-1] = 10**9


def _wrong_dtype(t: dict[str, torch.Tensor]) -> None:
    key = _first(t, "values/")
    t[key] = t[key].double()


def _length(t: dict[str, torch.Tensor]) -> None:
    key = _first(t, "values/")
    t[key] = t[key][:-1].clone()


def _nan(t: dict[str, torch.Tensor]) -> None:
    key = _first(t, "values/")
    t[key] = t[key].clone()
    t[key][0] = float("nan")


def _unknown(t: dict[str, torch.Tensor]) -> None:
    key = _first(t, "indices/")
    name = key[len("indices/") :]
    t["indices/encoder.layer.9.bogus.weight"] = t.pop(key)
    t["values/encoder.layer.9.bogus.weight"] = t.pop("values/" + name)


def _unsorted(t: dict[str, torch.Tensor]) -> None:
    key = max((k for k in t if k.startswith("indices/")), key=lambda k: t[k].numel())
    t[key] = t[key].flip(0).clone()


def _orphan_values(t: dict[str, torch.Tensor]) -> None:
    t.pop(_first(t, "indices/"))


def _float_indices(t: dict[str, torch.Tensor]) -> None:
    key = _first(t, "indices/")
    t[key] = t[key].float()


def _stray(t: dict[str, torch.Tensor]) -> None:
    t["weights"] = torch.zeros(2)


def _bad_version(m: dict[str, str]) -> None:
    m["skillgraft.format_version"] = "99"


def _no_meta(m: dict[str, str]) -> None:
    del m["skillgraft.meta"]
    del m["skillgraft.format_version"]


def _bad_json(m: dict[str, str]) -> None:
    m["skillgraft.meta"] = "{oops"


MALFORMED = [
    ("out of range", _out_of_range, None, "index 1000000000 out of range"),
    ("dtype", _wrong_dtype, None, "dtype mismatch"),
    ("length", _length, None, "length mismatch"),
    ("nan", _nan, None, "NaN or Inf"),
    ("unknown", _unknown, None, "unknown parameter 'encoder.layer.9.bogus.weight'"),
    ("unsorted", _unsorted, None, "sorted and unique"),
    ("orphan values", _orphan_values, None, "has values but no indices"),
    ("float indices", _float_indices, None, "1-D int64"),
    ("stray tensor", _stray, None, "unexpected tensor 'weights'"),
    ("version", None, _bad_version, "unsupported patch format version 99"),
    ("no metadata", None, _no_meta, "not a skillgraft patch"),
    ("bad json", None, _bad_json, "metadata is malformed"),
    ("bad head spec", None, _set_meta("head", {"mode": "prompt", "labels": ["a"]}), "metadata is malformed"),
]


@pytest.mark.parametrize(("case", "edit_tensors", "edit_meta", "message"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_patch_is_refused(  # type: ignore[no-untyped-def]
    tiny_base: BaseModel, tmp_path: Path, case, edit_tensors, edit_meta, message
) -> None:
    good = save_patch(make_patch(tiny_base), tmp_path / "good.safetensors")
    bad = _rewrite(good, edit_tensors, edit_meta)
    with pytest.raises(PatchError, match=message):
        patch = load_patch(bad)
        validate_patch(patch, tiny_base.parameters, tiny_base.fingerprint, tiny_base.hidden_size)


def test_classifier_head_shape_is_checked(tiny_base: BaseModel, tmp_path: Path) -> None:
    good = save_patch(make_patch(tiny_base, mode="classifier"), tmp_path / "good.safetensors")

    def shrink(t: dict[str, torch.Tensor]) -> None:
        t["head/classifier.weight"] = t["head/classifier.weight"][:, :-1].clone()

    patch = load_patch(_rewrite(good, shrink))
    with pytest.raises(PatchError, match="'classifier.weight' has shape"):
        validate_patch(patch, tiny_base.parameters, tiny_base.fingerprint, tiny_base.hidden_size)


def test_other_base_fingerprint_is_refused(tiny_base: BaseModel, tmp_path: Path) -> None:
    patch = load_patch(
        _rewrite(
            save_patch(make_patch(tiny_base), tmp_path / "p.safetensors"),
            edit_meta=_set_meta("base_fingerprint", "sha256:" + "0" * 64),
        )
    )
    with pytest.raises(BaseMismatchError, match="made for base"):
        validate_patch(patch, tiny_base.parameters, tiny_base.fingerprint, tiny_base.hidden_size)


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, b"\xff" * 8 + b"{}", b"not a patch at all, just text"])
def test_garbage_files_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(content)
    with pytest.raises(PatchError, match="not a readable safetensors file"):
        load_patch(path)
