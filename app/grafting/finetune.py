"""Fine-tuning the base on a task, in either head mode, with embeddings frozen.

SGD is the default: it is the paper's main regime and, on the packaged base, the one whose task vector δ is
heavy-tailed enough to localize (AdamW spreads δ almost uniformly). An optional ℓ1 pull λ·Σ|θ − θ_pre| keeps the
fine-tuned weights near the base, as in the paper's code.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch

from app.grafting.base import BaseModel, EligibleRule
from app.grafting.heads import Example, HeadSpec, TaskModel, Tokenization, default_classifier_kind, init_classifier_head
from app.grafting.inference import accuracy, predict_logits

# SGD learning rates that train k-shot tasks on each family without diverging: on SmolLM2, SST-2 (k=64) collapsed
# to chance after one epoch at 2e-2 and reached dev 0.88 at 1e-2 (benchmarks/results/paper, chosen on dev).
DEFAULT_LR = {"encoder": 2e-2, "decoder": 1e-2}


@dataclass(frozen=True)
class FinetuneConfig:
    optimizer: Literal["sgd", "adamw"] = "sgd"
    # None: DEFAULT_LR for the base's family, resolved in finetune()
    lr: float | None = None
    epochs: int = 10
    batch_size: int = 8
    weight_decay: float = 0.0
    l1: float = 0.0
    seed: int = 0
    max_length: int = 128
    # which encoder tensors train (the paper trains every encoder-layer tensor; embeddings stay frozen)
    trainable: str = "layers"

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if (self.lr is not None and self.lr <= 0) or self.epochs <= 0 or self.batch_size <= 0:
            raise ValueError("lr, epochs and batch_size must be positive")
        if self.l1 < 0:
            raise ValueError("l1 must be >= 0")
        EligibleRule.parse(self.trainable)


@dataclass
class FinetuneResult:
    body: dict[str, torch.Tensor]  # every encoder tensor after fine-tuning (bare names)
    head: dict[str, torch.Tensor]  # classifier head tensors (empty in prompt mode)
    metrics: dict[str, Any]
    config: FinetuneConfig

    def training_record(self) -> dict[str, Any]:
        return {**asdict(self.config), **self.metrics}


ProgressCallback = Callable[[dict[str, Any]], None]


def finetune(
    base: BaseModel,
    spec: HeadSpec,
    train: Sequence[Example],
    dev: Sequence[Example] | None = None,
    config: FinetuneConfig | None = None,
    progress: ProgressCallback | None = None,
    protect: Mapping[str, torch.Tensor] | None = None,
) -> FinetuneResult:
    """Train a copy of the base encoder (the base itself is untouched) and return the fine-tuned tensors.

    ``protect`` (boolean masks by encoder tensor name, e.g. earlier tasks' graft masks) freezes those entries:
    their gradients are zeroed, and since weight decay or AdamW still move a zero-gradient entry, their values
    are also written back after every step, so an earlier skill held there survives exactly.
    """
    config = config or FinetuneConfig()
    if not train:
        raise ValueError("no training examples")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    encoder = copy.deepcopy(base.encoder)
    encoder.requires_grad_(False)
    rule = EligibleRule.parse(config.trainable)
    trainable_names = rule.select(dict(encoder.named_parameters()))
    for name, param in encoder.named_parameters():
        param.requires_grad_(name in set(trainable_names))
    head_init = (
        init_classifier_head(
            spec.classifier_kind or default_classifier_kind(base.model_type),
            spec.num_labels,
            base.hidden_size,
            base.extra_weights,
            config.seed,
        )
        if spec.mode == "classifier"
        else None
    )
    model = TaskModel(encoder, spec, base.tokenizer, head_init)
    model.head.requires_grad_(True)
    tokenization = Tokenization(base.tokenizer, spec, config.max_length, base.family)
    encoded = tokenization.encode_many(train)
    labels = torch.tensor([example.label for example in train])
    device = next(encoder.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    pre = {name: p.detach().clone() for name, p in encoder.named_parameters() if p.requires_grad} if config.l1 else {}
    live = dict(encoder.named_parameters())
    frozen = _freeze(live, protect or {})
    if config.lr is None:
        config = replace(config, lr=DEFAULT_LR[base.family])
    if config.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = (len(encoded) + config.batch_size - 1) // config.batch_size
    total = steps_per_epoch * config.epochs
    step = 0
    started = time.perf_counter()
    last_loss = float("nan")
    model.train()
    for epoch in range(config.epochs):
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for start in range(0, len(order), config.batch_size):
            indices = order[start : start + config.batch_size]
            batch = tokenization.collate([encoded[i] for i in indices]).to(device)
            logits = model(batch)
            loss = torch.nn.functional.cross_entropy(logits, labels[indices].to(device))
            if config.l1:
                loss = loss + config.l1 * sum((live[n] - pre[n]).abs().sum() for n in pre)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            _restore(frozen)
            step += 1
            last_loss = float(loss.detach())
            if progress is not None:
                progress({"phase": "finetune", "step": step, "total": total, "epoch": epoch + 1, "loss": last_loss})
    model.eval()
    train_acc = accuracy(predict_logits(model, tokenization, encoded), labels.tolist())
    metrics: dict[str, Any] = {
        "train_accuracy": train_acc,
        "final_loss": last_loss,
        "steps": step,
        "seconds": round(time.perf_counter() - started, 2),
        "train_examples": len(train),
    }
    if dev:
        metrics["dev_accuracy"] = accuracy(
            predict_logits(model, tokenization, tokenization.encode_many(dev)), [e.label for e in dev]
        )
        metrics["dev_examples"] = len(dev)
    body = {name: p.detach().to("cpu").clone() for name, p in encoder.named_parameters()}
    head = {name: t.detach().to("cpu").clone() for name, t in model.head_tensors().items()}
    return FinetuneResult(body, head, metrics, config)


def _freeze(
    live: Mapping[str, torch.Tensor], protect: Mapping[str, torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Zero the gradients of protected entries; returns (parameter, mask, values) for ``_restore``."""
    frozen = []
    for name, mask in protect.items():
        param = live[name]
        keep = mask.to(param.device, torch.bool)
        if param.requires_grad and keep.any():
            param.register_hook(lambda grad, keep=keep: grad.masked_fill(keep, 0))
            frozen.append((param, keep, param.detach()[keep].clone()))
    return frozen


def _restore(frozen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for param, keep, values in frozen:
            param[keep] = values
