"""A synthetic task whose whole skill sits in a known set of weights, hidden behind a larger decoy movement: the
localization tests (the algorithm, and the same through the job path) check that a learned mask finds it."""

from __future__ import annotations

import random

import torch

from app.grafting.base import BaseModel
from app.grafting.heads import Example, HeadSpec, TaskModel, Tokenization, label_word_ids
from app.grafting.inference import predict_logits

SPEC = HeadSpec("prompt", ("negative", "positive"), "{text} It was {mask} .", ("terrible", "great"))
WORDS = ("the", "a", "film", "story", "plot", "actor", "scene", "music", "long", "short", "old", "new", "day", "road")


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def planted_task(base: BaseModel, n: int = 24) -> tuple[dict[str, torch.Tensor], set[tuple[str, int]], list[Example]]:
    """A task whose whole skill sits in one known set A of weights, hidden behind a larger decoy movement B.

    A = the last layer's output LayerNorm bias: moving it along the label-word direction turns every prediction
    into "great". B = rows of the last FFN's input matrix whose neurons the output matrix ignores (zero columns):
    they move 5× more than A, so top-|δ| picks them, yet they cannot change any output.
    """
    params = base.parameters
    last = max(int(n.split(".")[2]) for n in params if n.startswith("encoder.layer."))
    width = base.hidden_size
    torch.manual_seed(0)
    signs = torch.randint(0, 2, (width,)).double() * 2 - 1
    terrible, great = label_word_ids(base.tokenizer, ["terrible", "great"])
    dead = list(range(16))
    with torch.no_grad():
        table = base.word_embeddings
        table[terrible] = -0.05 * signs.to(table.dtype)
        table[great] = 0.05 * signs.to(table.dtype)
        params[f"encoder.layer.{last}.output.dense.weight"][:, dead] = 0.0
    ft = {name: tensor.detach().clone() for name, tensor in params.items()}
    skill = f"encoder.layer.{last}.output.LayerNorm.bias"
    decoy = f"encoder.layer.{last}.intermediate.dense.weight"
    texts = sentences(n, seed=1)
    model = TaskModel(base.encoder, SPEC, base.tokenizer)
    tokenization = Tokenization(base.tokenizer, SPEC)
    encoded = tokenization.encode_many([Example(t, 0) for t in texts])
    margins = predict_logits(model, tokenization, encoded) @ torch.tensor([-1.0, 1.0])
    # each of the `width` entries adds the same step to every margin; sized so that the hardest example needs
    # all but one of them: the planted set can only be found whole
    step = float(-margins.min()) / (width - 1.5)
    ft[skill] += step / 0.1 * signs.to(ft[skill].dtype)  # label-word rows differ by 0.1·signs
    ft[decoy][dead] += 5.0 * step / 0.1
    planted = {(skill, i) for i in range(width)}
    examples = [Example(t, 1) for t in texts]
    return ft, planted, examples


def entries(mask: dict[str, torch.Tensor]) -> set[tuple[str, int]]:
    return {(name, int(i)) for name, m in mask.items() for i in torch.nonzero(m.reshape(-1)).reshape(-1)}
