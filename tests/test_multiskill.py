"""Several skills: overlap maths on hand-made masks, stitching against its formula, protected fine-tuning, and the
stitch job end to end through the API on the tiny model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load

from app.cli import main
from app.config import Settings
from app.grafting.base import BaseModel
from app.grafting.checkpoint import load_checkpoint, split_for_base
from app.grafting.data import default_data_dir
from app.grafting.finetune import FinetuneConfig, finetune
from app.grafting.heads import Example, HeadSpec
from app.grafting.overlap import overlap_report
from app.grafting.patch import GraftPatch, load_patch, patch_to_bytes, save_patch
from app.grafting.stitch import stitch, stitched_state_dict
from app.main import create_app
from tests.conftest import REQUIRE_DATA
from tests.utils.tiny import make_patch, random_mask

SPEC = HeadSpec("prompt", ("negative", "positive"), "{text} It was {mask} .", ("terrible", "great"))
Q0 = "encoder.layer.0.attention.self.query.weight"
B1 = "encoder.layer.1.output.dense.bias"


def hand_patch(task: str, pre: dict[str, torch.Tensor], deltas: dict[str, dict[int, float]]) -> GraftPatch:
    entries = {}
    for name, by_index in deltas.items():
        indices = torch.tensor(sorted(by_index), dtype=torch.int64)
        values = pre[name].reshape(-1)[indices] + torch.tensor([by_index[i] for i in sorted(by_index)])
        entries[name] = (indices, values)
    return GraftPatch(task, SPEC, "sha256:x", entries, eligible_size=20)


def test_overlap_on_hand_made_masks() -> None:
    pre = {Q0: torch.linspace(-1, 1, 10), B1: torch.zeros(10)}
    a = hand_patch("a", pre, {Q0: {0: 1, 1: 1, 2: 0.5, 3: 0.5}, B1: {0: 1, 1: -1}})
    b = hand_patch("b", pre, {Q0: {2: 0.1, 3: -0.1, 4: 1}, B1: {1: -2, 5: 1, 6: 1, 7: 1}})
    c = hand_patch("c", pre, {Q0: {9: 1}})
    report = overlap_report({"a": a, "b": b, "c": c}, pre)
    assert report["tasks"] == ["a", "b", "c"] and report["sizes"] == {"a": 6, "b": 7, "c": 1}
    # a ∩ b = {Q0: 2, 3} ∪ {B1: 1}: 3 entries; |a| = 6, |b| = 7
    assert report["intersection"][0][1] == report["intersection"][1][0] == 3
    assert report["containment"][0][1] == pytest.approx(3 / 7) and report["containment"][1][0] == pytest.approx(3 / 6)
    assert report["jaccard"][0][1] == pytest.approx(3 / 10) == report["jaccard"][1][0]
    assert report["containment"][0][0] == 1.0 and report["jaccard"][2][2] == 1.0
    # signs on the shared entries: Q0[2] +/+, Q0[3] +/−, B1[1] −/−
    assert report["sign_agreement"][0][1] == pytest.approx(2 / 3)
    assert report["containment"][0][2] == 0.0 and report["sign_agreement"][0][2] is None
    layer0, layer1 = report["per_layer"]["0"], report["per_layer"]["1"]
    assert layer0["sizes"] == {"a": 4, "b": 3, "c": 1} and layer1["sizes"] == {"a": 2, "b": 4, "c": 0}
    assert layer0["containment"][0][1] == pytest.approx(2 / 3) and layer0["jaccard"][0][1] == pytest.approx(2 / 5)
    assert layer1["containment"][0][1] == pytest.approx(1 / 4) and layer1["jaccard"][0][1] == pytest.approx(1 / 5)
    assert layer1["sign_agreement"][0][1] == 1.0 and layer1["containment"][2][0] == 0.0
    assert layer1["containment"][0][2] is None  # c has nothing in layer 1: no ratio to give


def test_stitch_equals_the_formula(tiny_base: BaseModel) -> None:
    patches = [make_patch(tiny_base, f"t{i}", fraction=0.3, seed=i + 1) for i in range(3)]
    pre = {n: p.detach().clone() for n, p in tiny_base.parameters.items()}
    state = stitched_state_dict(tiny_base.parameters, stitch(tiny_base.parameters, patches))
    shapes = {n: t.shape for n, t in pre.items()}
    masks = [patch.masks(shapes) for patch in patches]
    for name, base_tensor in pre.items():
        total = torch.zeros_like(base_tensor, dtype=torch.float64)
        count = torch.zeros_like(base_tensor, dtype=torch.float64)
        for patch, mask in zip(patches, masks, strict=True):
            if name in mask:
                ft = base_tensor.clone()
                ft.view(-1)[patch.entries[name][0]] = patch.entries[name][1]
                total += mask[name] * (ft.double() - base_tensor.double())
                count += mask[name]
        expected = (base_tensor.double() + total / count.clamp(min=1)).float()
        torch.testing.assert_close(state[name], expected, rtol=0, atol=1e-7)
        assert torch.equal(state[name][count == 0], base_tensor[count == 0])  # outside every mask: θ_pre exactly
    assert all(torch.equal(p, pre[n]) for n, p in tiny_base.parameters.items())  # the base is untouched


def test_protected_entries_do_not_move(tiny_base: BaseModel) -> None:
    protect = random_mask(tiny_base, 0.2, seed=5)
    train = [Example("a great, moving film", 1), Example("dull and awful", 0)] * 4
    # weight decay moves zero-gradient entries too: the values must be written back, not only the gradient zeroed
    config = FinetuneConfig(lr=0.5, epochs=2, batch_size=4, weight_decay=0.1)
    result = finetune(tiny_base, SPEC, train, config=config, protect=protect)
    plain = finetune(tiny_base, SPEC, train, config=config)
    for name, mask in protect.items():
        base_tensor = tiny_base.parameters[name]
        assert torch.equal(result.body[name][mask], base_tensor[mask]), name
    moved = sum(int((result.body[n][~m] != tiny_base.parameters[n][~m]).sum()) for n, m in protect.items())
    moved_plain = sum(int((plain.body[n][m] != tiny_base.parameters[n][m]).sum()) for n, m in protect.items())
    assert moved > 0 and moved_plain > 0


def wait_job(client: TestClient, url: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(url).json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job not finished after {timeout}s: {job}")


def test_stitch_job_end_to_end(tiny_base: BaseModel, tiny_base_dir: Path, tmp_path: Path) -> None:
    settings = Settings(base_model=tiny_base_dir, store_dir=tmp_path / "store", max_batch_wait_ms=1)
    alpha, beta = (
        make_patch(tiny_base, "alpha", fraction=0.2, seed=1),
        make_patch(tiny_base, "beta", fraction=0.2, seed=7),
    )
    with TestClient(create_app(settings)) as client:
        for patch in (alpha, beta):
            assert client.put(f"/v1/tasks/{patch.task}/patch", content=patch_to_bytes(patch)).status_code == 201
        overlap = client.get("/v1/skills/overlap", params={"tasks": "alpha,beta"}).json()
        assert overlap["tasks"] == ["alpha", "beta"] and 0 < overlap["containment"][0][1] < 1
        assert client.get("/v1/skills/overlap", params={"tasks": "alpha,nope"}).status_code == 404
        mask = client.get("/v1/skills/alpha/mask").json()
        assert mask["source"] == "patch" and mask["mask"]["size"] == alpha.mask_size

        body = {"name": "combo", "tasks": ["alpha", "beta"], "datasets": {"alpha": "sst2"}, "eval_limit": 16}
        response = client.post("/v1/stitch", json=body)
        assert response.status_code == 202, response.text
        job = wait_job(client, response.json()["url"])
        assert job["state"] == "succeeded" and job["kind"] == "stitch", job
        assert client.post("/v1/stitch", json=body).status_code == 200  # identical submission: the same job
        assert client.post("/v1/stitch", json={**body, "eval_limit": 8}).status_code == 409  # name taken

        report = client.get("/v1/stitch/combo").json()
        assert report["members"] == ["combo.alpha", "combo.beta"] and report["union_size"] > alpha.mask_size
        if default_data_dir().is_dir() or REQUIRE_DATA:
            scores = report["accuracy"]["alpha"]
            assert scores["evaluated"] and scores["examples"] == 16 and 0 <= scores["acc_stitched"] <= 1
        assert report["accuracy"]["beta"] == {"evaluated": False, "reason": "no dataset known for task"}
        model = client.get("/v1/stitch/combo/model")
        assert model.status_code == 200
        downloaded = load(model.content)
        expected = stitched_state_dict(tiny_base.parameters, stitch(tiny_base.parameters, [alpha, beta]))
        assert set(downloaded) == set(expected)
        assert all(torch.equal(downloaded[n], expected[n]) for n in expected)

        # each member serves with its own head on the stitched body
        (tmp_path / "member.safetensors").write_bytes(client.get("/v1/tasks/combo.alpha/patch").content)
        member = load_patch(tmp_path / "member.safetensors")
        assert member.method == "stitch" and member.spec == alpha.spec
        result = client.post("/v1/classify", json={"tasks": ["combo.alpha", "combo.beta"], "inputs": ["a fine film"]})
        assert result.status_code == 200 and len(result.json()["results"]) == 2
        assert client.get("/v1/stitch/nothing").status_code == 404


def test_cli_overlap_and_protected_finetune(tiny_base: BaseModel, tiny_base_dir: Path, tmp_path: Path) -> None:
    alpha, beta = (
        make_patch(tiny_base, "alpha", fraction=0.1, seed=1),
        make_patch(tiny_base, "beta", fraction=0.1, seed=7),
    )
    files = [save_patch(p, tmp_path / f"{p.task}.safetensors") for p in (alpha, beta)]
    tasks = ",".join(str(f) for f in files)
    assert (
        main(["overlap", "--base-model", str(tiny_base_dir), "--tasks", tasks, "--out", str(tmp_path / "o.json")]) == 0
    )
    report = json.loads((tmp_path / "o.json").read_text())
    assert report["tasks"] == ["alpha", "beta"] and (tmp_path / "o.png").stat().st_size > 1000

    train = tmp_path / "train.jsonl"
    rows = [{"text": "a great film", "label": "positive"}, {"text": "an awful film", "label": "negative"}] * 4
    train.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "ckpt"
    argv = ["finetune", "--base-model", str(tiny_base_dir), "--train", str(train), "--template", SPEC.template]
    argv += ["--label-words", "terrible,great", "--epochs", "1", "--protect", tasks, "--out", str(out)]
    assert main(argv) == 0
    body = split_for_base(load_checkpoint(out), tiny_base).body
    start = stitched_state_dict(tiny_base.parameters, stitch(tiny_base.parameters, [alpha, beta]))
    for patch in (alpha, beta):
        for name, (indices, _) in patch.entries.items():
            assert torch.equal(body[name].reshape(-1)[indices], start[name].reshape(-1)[indices]), name
