"""Skill localization: find a sparse binary mask γ over the eligible set E so that θ_pre + γ⊙δ keeps the task.

Methods (all return a mask counted against |E|):

* ``learned``: the paper's algorithm (docs/method.md, "The learned mask"). γ_base = exactly k global top-|δ|
  entries; scores S ~ U[0,1); soft mask γ(S) = γ_base + (1 − 2γ_base)·σ(S − b); T closed-form gradient steps on S;
  after every (``score_every``-th) step the mask rounded at 0.5 is scored on train + dev and the best one kept.
  Additions: a hard size cap (``budget``), an optional L1 penalty on the soft mask's size (as in
  Localize-and-Stitch), and a scale-free step (``max_step``, the default: the update is rescaled so that its k-th
  largest entry moves S by that much, because η = 1e7 only works for the gradient scale of the paper's model).
  ``LocalizeConfig``'s defaults are the one set of settings the CLI, the jobs and the benchmarks share.
* ``topk``: γ_base alone (the k entries that moved most).
* ``random``: k entries drawn uniformly from E (seeded).
* ``topk-rms``: k entries ranked by |δ| divided by their own tensor's RMS movement, so that small tensors
  (biases, norms) whose scale differs from the dense matrices compete on equal terms. Uses no data. (Not the
  data-free method of Localize-and-Stitch, which is plain ``topk``.)

Cost policy: the base encoder is grafted in place (one model instance, eligible tensors only, found by name in one
pass) and θ_pre is written back bit-identically at the end, even on error or cancellation. Beside the model and
the input checkpoint the learner keeps two dense float copies over E (θ_pre and S), a boolean γ_base, and the
rounded masks as sparse index lists; δ is recomputed per tensor where needed instead of being stored.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from app.grafting.base import BaseModel, EligibleRule
from app.grafting.heads import Batch, Encoded, Example, HeadSpec, TaskModel, Tokenization
from app.grafting.inference import length_sorted_batches

Method = Literal["learned", "topk", "random", "topk-rms"]
METHODS: tuple[str, ...] = ("learned", "topk", "random", "topk-rms")

ProgressCallback = Callable[[dict[str, Any]], None]
StopCheck = Callable[[], bool]


class LocalizationCancelled(RuntimeError):
    """Raised when the ``should_stop`` hook asked to stop; the base has been restored by then."""


@dataclass(frozen=True)
class LocalizeConfig:
    method: Method = "learned"
    # k = floor(sparsity·|E|): size of γ_base (learned) or of the whole mask (topk, random, dataless)
    sparsity: float = 1e-4
    eligible: str = "layers"
    steps: int = 10
    bias: float = 10.0
    # plain step S ← S − lr·g, used only when ``max_step`` is None (the paper's η = 1e7 suits its model's
    # gradient scale, not every base's)
    lr: float = 1e7
    # scale-free step (the default): each update is rescaled so that the entry of rank ``step_rank`` moves S by
    # ``max_step`` and larger ones are clipped to ±max_step. With S ~ U[0,1) and b = 10, the k entries with the
    # strongest gradient can flip after about 3–4 steps, so 10 steps really move the mask away from top-k
    max_step: float | None = 3.0
    # None: k (the size of γ_base); 1 would move only the single largest-gradient entry a full step
    step_rank: int | None = None
    examples_per_step: int = 1024
    micro_batch: int = 32
    # hard cap on the final mask size in entries (None: no cap beyond what rounding gives)
    budget: int | None = None
    # weight of the L1 penalty on the soft mask's size Σγ(S), added to the task loss
    l1: float = 0.0
    score_every: int = 1
    score_batch: int = 256
    max_length: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 0.0 <= self.sparsity <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1], got {self.sparsity}")
        if self.steps < 0 or self.examples_per_step <= 0 or self.micro_batch <= 0 or self.score_batch <= 0:
            raise ValueError("steps must be >= 0; examples_per_step, micro_batch and score_batch must be positive")
        if self.score_every <= 0:
            raise ValueError("score_every must be positive")
        if self.lr <= 0 or (self.max_step is not None and self.max_step <= 0):
            raise ValueError("lr and max_step must be positive")
        if self.step_rank is not None and self.step_rank < 1:
            raise ValueError("step_rank must be >= 1")
        if self.budget is not None and self.budget < 0:
            raise ValueError("budget must be >= 0")
        if self.l1 < 0:
            raise ValueError("l1 must be >= 0")
        EligibleRule.parse(self.eligible)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LocalizeResult:
    """The binary mask (every eligible tensor, boolean, base shapes) and how it was found."""

    mask: dict[str, torch.Tensor]
    method: str
    k: int
    size: int
    eligible_size: int
    config: LocalizeConfig
    best_step: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        return self.size / self.eligible_size if self.eligible_size else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "k": self.k,
            "mask_size": self.size,
            "eligible_size": self.eligible_size,
            "sparsity": self.sparsity,
            "best_step": self.best_step,
            "timings": self.timings,
            "config": self.config.to_json(),
        }


# ---------------------------------------------------------------------------------------------------------------
# Mask construction shared by all methods


def eligible_tensors(parameters: Mapping[str, torch.Tensor], rule: EligibleRule) -> list[str]:
    """Eligible names in the base's order (one pass over the names, dict lookups afterwards)."""
    return rule.select(list(parameters))


def top_k_mask(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Boolean masks holding exactly ``k`` entries: the global top-k of ``scores`` over all tensors together.

    ``torch.topk`` returns exactly k indices even among ties, so the size is exact whatever the values.
    """
    return _global_top_k({n: t.shape for n, t in scores.items()}, lambda name: scores[name], k)


def _global_top_k(
    shapes: Mapping[str, torch.Size], score: Callable[[str], torch.Tensor], k: int
) -> dict[str, torch.Tensor]:
    """Exact global top-k with one flat score buffer over all tensors, filled tensor by tensor (one copy over E)."""
    total = sum(math.prod(shape) for shape in shapes.values())
    k = max(0, min(int(k), total))
    flat = torch.zeros(total, dtype=torch.bool)
    if k:
        joined = torch.empty(total, dtype=torch.float32)
        offset = 0
        for name, shape in shapes.items():
            n = math.prod(shape)
            joined[offset : offset + n] = score(name).detach().reshape(-1).float().cpu()
            offset += n
        flat[torch.topk(joined, k, sorted=False).indices] = True
        del joined
    return _split_flat(flat, {name: torch.empty(shape, device="meta") for name, shape in shapes.items()})


def random_k_mask(shapes: Mapping[str, torch.Size], k: int, seed: int) -> dict[str, torch.Tensor]:
    """Exactly ``k`` entries drawn uniformly without replacement over all tensors (seeded)."""
    total = sum(math.prod(shape) for shape in shapes.values())
    k = max(0, min(int(k), total))
    generator = torch.Generator().manual_seed(seed)
    flat = torch.zeros(total, dtype=torch.bool)
    flat[torch.randperm(total, generator=generator)[:k]] = True
    return _split_flat(flat, {name: torch.empty(shape, device="meta") for name, shape in shapes.items()})


def _split_flat(flat: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, tensor in like.items():
        n = tensor.numel()
        out[name] = flat[offset : offset + n].view(tensor.shape).clone()
        offset += n
    return out


def mask_size(mask: Mapping[str, torch.Tensor]) -> int:
    return int(sum(int(m.sum()) for m in mask.values()))


def data_free_mask(
    method: str,
    pre: Mapping[str, torch.Tensor],
    ft: Mapping[str, torch.Tensor],
    names: Sequence[str],
    k: int,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The masks that need no examples: ``topk`` (global |δ|), ``random`` and ``topk-rms`` (|δ| / tensor RMS)."""
    if method == "random":
        return random_k_mask({n: pre[n].shape for n in names}, k, seed)
    if method not in ("topk", "topk-rms"):
        raise ValueError(f"{method!r} is not a data-free method")

    def movement(name: str) -> torch.Tensor:
        delta = (ft[name].to(pre[name].device, pre[name].dtype) - pre[name]).abs()
        if method == "topk-rms":
            rms = delta.float().pow(2).mean().sqrt()
            delta = delta / rms if float(rms) > 0 else delta
        return delta

    return _global_top_k({n: pre[n].shape for n in names}, movement, k)


# ---------------------------------------------------------------------------------------------------------------
# The learned mask


def _rank_magnitude(values: Mapping[str, torch.Tensor], rank: int) -> float:
    """The ``rank``-th largest |value| over all tensors, counting non-zero values only (the smallest non-zero one
    when there are fewer): exact, from each tensor's own top-``rank`` candidates. Entries whose δ is 0 have a
    zero gradient; letting them set the scale would stop every entry."""
    candidates = [
        torch.topk(v.abs().reshape(-1), min(rank, v.numel()), sorted=False).values for v in values.values() if v.numel()
    ]
    if not candidates:
        return 0.0
    joined = torch.cat(candidates)
    top = torch.topk(joined, min(rank, joined.numel())).values
    nonzero = top[top > 0]
    return float(nonzero[-1]) if nonzero.numel() else 0.0


def soft_mask(scores: torch.Tensor, base_mask: torch.Tensor, bias: float) -> torch.Tensor:
    """γ(S) = γ_base + (1 − 2γ_base)·σ(S − b): σ is the probability of flipping an entry of γ_base."""
    flip = torch.sigmoid(scores - bias)
    return torch.where(base_mask, 1.0 - flip, flip)


def _flip_sign(base_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(1 − 2γ_base) as +1/−1 in ``like``'s dtype."""
    one = torch.ones((), dtype=like.dtype, device=like.device)
    return torch.where(base_mask, -one, one)


class _CachedBatches:
    """Train and dev examples tokenized and collated once, in length-sorted batches, for repeated scoring."""

    def __init__(
        self, tokenization: Tokenization, encoded: Sequence[Encoded], labels: Sequence[int], size: int
    ) -> None:
        self.batches: list[tuple[Batch, torch.Tensor]] = []
        for indices in length_sorted_batches(encoded, size):
            batch = tokenization.collate([encoded[i] for i in indices])
            self.batches.append((batch, torch.tensor([labels[i] for i in indices])))
        self.count = len(encoded)


class _BestMask:
    """Keeps the best rounded mask seen: highest score; ties go to the smaller mask, then the earlier step."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.score = -math.inf
        self.size = 0
        self.indices: dict[str, torch.Tensor] = {}

    def offer(self, step: int, score: float, size: int, indices: dict[str, torch.Tensor]) -> bool:
        better = score > self.score or (score == self.score and size < self.size)
        if better:
            self.step, self.score, self.size, self.indices = step, score, size, indices
        return better


class MaskLearner:
    """The paper's optimisation of S over one base encoder, grafted in place and restored by ``close``.

    Use as a context manager: entering saves θ_pre and switches gradients on for the eligible tensors only;
    leaving writes θ_pre back (bit-identical) and restores the gradient flags, whatever happened in between.
    """

    def __init__(
        self,
        base: BaseModel,
        ft: Mapping[str, torch.Tensor],
        spec: HeadSpec,
        config: LocalizeConfig,
        head: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.base = base
        self.config = config
        self.rule = EligibleRule.parse(config.eligible)
        live = base.parameters
        self.names = eligible_tensors(live, self.rule)
        missing = [n for n in self.names if n not in ft]
        if missing:
            raise ValueError(f"the fine-tuned weights lack eligible tensors: {', '.join(missing[:3])}")
        self.params = {n: live[n] for n in self.names}
        self.ft = {n: ft[n].to(self.params[n].device, self.params[n].dtype) for n in self.names}
        self.eligible_size = sum(p.numel() for p in self.params.values())
        self.k = math.floor(config.sparsity * self.eligible_size)
        self.step_rank = config.step_rank if config.step_rank is not None else max(1, self.k)
        self.model = TaskModel(base.encoder, spec, base.tokenizer, dict(head) if head else None)
        self.model.eval()  # no dropout: the S-gradient and the scores are deterministic
        self.tokenization = Tokenization(base.tokenizer, spec, config.max_length, base.family)
        self.pre: dict[str, torch.Tensor] = {}
        self.scores: dict[str, torch.Tensor] = {}
        self.base_mask: dict[str, torch.Tensor] = {}
        self._grad_flags: dict[str, bool] = {}
        self._open = False

    # -- lifecycle -------------------------------------------------------------------------------------------
    def __enter__(self) -> MaskLearner:
        self.pre = {n: p.detach().clone() for n, p in self.params.items()}
        self.base_mask = data_free_mask("topk", self.pre, self.ft, self.names, self.k)
        generator = torch.Generator().manual_seed(self.config.seed)
        self.scores = {
            n: torch.rand(p.shape, generator=generator, dtype=p.dtype).to(p.device) for n, p in self.params.items()
        }
        for name, param in self.params.items():
            self._grad_flags[name] = param.requires_grad
            param.requires_grad_(True)
        self._open = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._open:
            return
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(self.pre[name])
                param.grad = None
                param.requires_grad_(self._grad_flags.get(name, False))
        self._open = False

    # -- weights ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def write_soft(self) -> None:
        """θ = θ_pre + γ(S)⊙δ on E."""
        for name, param in self.params.items():
            gamma = soft_mask(self.scores[name], self.base_mask[name], self.config.bias)
            param.copy_(self.pre[name] + gamma * (self.ft[name] - self.pre[name]))

    @torch.no_grad()
    def write_binary(self, indices: Mapping[str, torch.Tensor]) -> None:
        """θ = θ_pre with θ_ft at the masked entries: exactly the values a patch holds (no rounding)."""
        for name, param in self.params.items():
            param.copy_(self.pre[name])
            idx = indices.get(name)
            if idx is not None and idx.numel():
                param.view(-1)[idx] = self.ft[name].reshape(-1)[idx]

    # -- one step --------------------------------------------------------------------------------------------
    def s_gradient(self, encoded: Sequence[Encoded], labels: Sequence[int]) -> tuple[float, dict[str, torch.Tensor]]:
        """∂(L + l1·Σγ(S))/∂S at the current S, L the mean cross-entropy over ``encoded``.

        Closed form: ∂L/∂S = (∂L/∂θ ⊙ δ) ⊙ (1 − 2γ_base) ⊙ σ'(S − b), one backward pass through the encoder.
        The result is written into the parameters' ``.grad`` buffers (which hold ∂L/∂θ just before), so no
        further copy over E is made; the caller must consume it before the next backward.
        """
        self.write_soft()
        for param in self.params.values():
            param.grad = None
        device = next(iter(self.params.values())).device
        n = len(encoded)
        total = 0.0
        # Micro-batches in the given order, as time_forward_backward runs them: the cost ratio compares like with like.
        for start in range(0, n, self.config.micro_batch):
            chunk = range(start, min(n, start + self.config.micro_batch))
            batch = self.tokenization.collate([encoded[i] for i in chunk]).to(device)
            target = torch.tensor([labels[i] for i in chunk], device=device)
            logits = self.model(batch)
            loss = torch.nn.functional.cross_entropy(logits.to(self.pre[self.names[0]].dtype), target, reduction="sum")
            (loss / n).backward()
            total += float(loss.detach())
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, param in self.params.items():
                flip = torch.sigmoid(self.scores[name] - self.config.bias)
                dflip = flip * (1.0 - flip)
                sign = _flip_sign(self.base_mask[name], dflip)
                grad = param.grad if param.grad is not None else torch.zeros_like(param)
                grad.mul_(self.ft[name] - self.pre[name])
                if self.config.l1:
                    # ∂Σγ/∂γ = 1 per entry: the size penalty adds l1 to ∂/∂γ before the chain rule through σ
                    grad.add_(self.config.l1)
                grad.mul_(sign).mul_(dflip)
                out[name] = grad
                param.grad = None
        return total / max(n, 1), out

    @torch.no_grad()
    def apply_update(self, gradient: Mapping[str, torch.Tensor]) -> float:
        """S ← S − η·g; or with ``max_step`` set, S ← S − clip(max_step·g / |g|_(r), ±max_step), where |g|_(r) is
        the ``step_rank``-th largest |g| over E (default r = k). Returns the largest |ΔS|."""
        clip = None
        if self.config.max_step is not None:
            reference = _rank_magnitude(gradient, self.step_rank)
            scale = self.config.max_step / reference if reference > 0 else 0.0
            clip = self.config.max_step
        else:
            scale = self.config.lr
        largest = 0.0
        for name, grad in gradient.items():
            grad.mul_(scale)
            if clip is not None:
                grad.clamp_(-clip, clip)
            self.scores[name].sub_(grad)
            if grad.numel():
                largest = max(largest, float(grad.abs().max()))
        return largest

    @torch.no_grad()
    def rounded(self) -> tuple[dict[str, torch.Tensor], int]:
        """γ(S) rounded at 0.5 as sorted flat indices per tensor, cut to the ``budget`` largest γ if over it."""
        indices: dict[str, torch.Tensor] = {}
        for name in self.names:
            # γ > 0.5 ⇔ (S > b) XOR γ_base: no sigmoid needed for the decision itself
            on = (self.scores[name] > self.config.bias) ^ self.base_mask[name]
            indices[name] = torch.nonzero(on.reshape(-1)).reshape(-1)
        size = sum(int(i.numel()) for i in indices.values())
        budget = self.config.budget
        if budget is not None and size > budget:
            values = torch.cat(
                [
                    soft_mask(
                        self.scores[n].reshape(-1)[indices[n]],
                        self.base_mask[n].reshape(-1)[indices[n]],
                        self.config.bias,
                    )
                    for n in self.names
                ]
            )
            keep = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
            if budget:
                keep[torch.topk(values, budget, sorted=False).indices] = True
            offset = 0
            for name in self.names:
                count = indices[name].numel()
                indices[name] = indices[name][keep[offset : offset + count]]
                offset += count
            size = budget
        return indices, size

    @torch.inference_mode()
    def score(self, cached: _CachedBatches) -> int:
        """Correct predictions of the current weights over cached batches."""
        device = next(iter(self.params.values())).device
        correct = 0
        for batch, labels in cached.batches:
            logits = self.model(batch.to(device))
            correct += int((logits.argmax(dim=-1).cpu() == labels).sum())
        return correct

    def dense_mask(self, indices: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, param in self.params.items():
            flat = torch.zeros(param.numel(), dtype=torch.bool)
            idx = indices.get(name)
            if idx is not None and idx.numel():
                flat[idx.cpu()] = True
            out[name] = flat.view(param.shape)
        return out


def localize(
    base: BaseModel,
    ft: Mapping[str, torch.Tensor],
    spec: HeadSpec,
    train: Sequence[Example] = (),
    dev: Sequence[Example] = (),
    config: LocalizeConfig | None = None,
    head: Mapping[str, torch.Tensor] | None = None,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> LocalizeResult:
    """Find a binary mask over the eligible set of ``base`` for the fine-tuned encoder tensors ``ft``.

    ``head`` is the fine-tuned classifier head (classifier mode); it stays fixed. ``progress`` receives one dict
    per step (``step``, ``total``, ``loss``, ``train_accuracy``, ``dev_accuracy``, ``mask_size``);
    ``should_stop`` is polled between steps and raises ``LocalizationCancelled`` when it returns True. The base
    comes back bit-identical in every case.
    """
    config = config or LocalizeConfig()
    started = time.perf_counter()
    if config.method != "learned":
        rule = EligibleRule.parse(config.eligible)
        live = base.parameters
        names = eligible_tensors(live, rule)
        pre = {n: live[n].detach() for n in names}
        eligible = sum(p.numel() for p in pre.values())
        k = math.floor(config.sparsity * eligible)
        if config.budget is not None:
            k = min(k, config.budget)
        mask = data_free_mask(config.method, pre, ft, names, k, config.seed)
        seconds = time.perf_counter() - started
        return LocalizeResult(mask, config.method, k, mask_size(mask), eligible, config, timings={"total": seconds})
    if not train:
        raise ValueError("the learned mask needs training examples")
    return _learn(base, ft, spec, train, dev, config, head, progress, should_stop, started)


def _learn(
    base: BaseModel,
    ft: Mapping[str, torch.Tensor],
    spec: HeadSpec,
    train: Sequence[Example],
    dev: Sequence[Example],
    config: LocalizeConfig,
    head: Mapping[str, torch.Tensor] | None,
    progress: ProgressCallback | None,
    should_stop: StopCheck | None,
    started: float,
) -> LocalizeResult:
    timings = {"setup": 0.0, "gradient": 0.0, "update": 0.0, "scoring": 0.0, "restore": 0.0}
    learner = MaskLearner(base, ft, spec, config, head)
    encoded_train = learner.tokenization.encode_many(train)
    train_labels = [e.label for e in train]
    cached_train = _CachedBatches(learner.tokenization, encoded_train, train_labels, config.score_batch)
    cached_dev = _CachedBatches(
        learner.tokenization, learner.tokenization.encode_many(dev), [e.label for e in dev], config.score_batch
    )
    rng = random.Random(config.seed)
    history: list[dict[str, Any]] = []
    best = _BestMask()
    last_scored: dict[str, torch.Tensor] | None = None
    last_scores: tuple[int, int] = (0, 0)
    total_steps = config.steps

    def score_rounded(step: int, entry: dict[str, Any]) -> None:
        nonlocal last_scored, last_scores
        tick = time.perf_counter()
        indices, size = learner.rounded()
        unchanged = last_scored is not None and all(torch.equal(indices[n], last_scored[n]) for n in learner.names)
        if not unchanged:
            # Same mask as the last scored one: same weights, same score; skip the forward passes.
            learner.write_binary(indices)
            last_scores = (learner.score(cached_train), learner.score(cached_dev))
            last_scored = indices
        correct_train, correct_dev = last_scores
        count = cached_train.count + cached_dev.count
        score = (correct_train + correct_dev) / count
        best.offer(step, score, size, indices)
        entry.update(
            scored=True,
            rescored=not unchanged,
            score=score,
            train_accuracy=correct_train / cached_train.count,
            dev_accuracy=correct_dev / cached_dev.count if cached_dev.count else None,
            mask_size=size,
        )
        timings["scoring"] += time.perf_counter() - tick

    with learner:
        timings["setup"] = time.perf_counter() - started
        entry: dict[str, Any] = {"step": 0}
        score_rounded(0, entry)
        history.append(entry)
        for step in range(1, total_steps + 1):
            if should_stop is not None and should_stop():
                raise LocalizationCancelled(f"localization stopped at step {step - 1} of {total_steps}")
            tick = time.perf_counter()
            if len(encoded_train) > config.examples_per_step:
                chosen = sorted(rng.sample(range(len(encoded_train)), config.examples_per_step))
            else:
                chosen = list(range(len(encoded_train)))
            loss, gradient = learner.s_gradient([encoded_train[i] for i in chosen], [train_labels[i] for i in chosen])
            timings["gradient"] += time.perf_counter() - tick
            tick = time.perf_counter()
            moved = learner.apply_update(gradient)
            del gradient
            timings["update"] += time.perf_counter() - tick
            entry = {"step": step, "loss": loss, "max_delta_s": moved, "scored": False}
            if step % config.score_every == 0 or step == total_steps:
                score_rounded(step, entry)
            history.append(entry)
            if progress is not None:
                progress(
                    {
                        "phase": "localize",
                        "step": step,
                        "total": total_steps,
                        "loss": loss,
                        "train_accuracy": entry.get("train_accuracy"),
                        "dev_accuracy": entry.get("dev_accuracy"),
                        "mask_size": entry.get("mask_size"),
                    }
                )
        mask = learner.dense_mask(best.indices)
        tick = time.perf_counter()
        learner.close()
        done = time.perf_counter()
    timings["restore"] = done - tick
    timings["total"] = done - started
    return LocalizeResult(
        mask=mask,
        method="learned",
        k=learner.k,
        size=best.size,
        eligible_size=learner.eligible_size,
        config=config,
        best_step=best.step,
        history=history,
        timings={key: round(value, 4) for key, value in timings.items()},
    )


def time_forward_backward(
    base: BaseModel,
    spec: HeadSpec,
    train: Sequence[Example],
    config: LocalizeConfig | None = None,
    head: Mapping[str, torch.Tensor] | None = None,
    repeats: int = 2,
) -> float:
    """Seconds of one forward + backward over a step's examples (the cost unit of a localization step).

    Runs the same micro-batches as a learned step, with gradients on the same eligible tensors, and reports the
    fastest of ``repeats`` runs (less noise from the shared CPU). The base is left unchanged.
    """
    config = config or LocalizeConfig()
    rule = EligibleRule.parse(config.eligible)
    live = base.parameters
    names = eligible_tensors(live, rule)
    flags = {n: live[n].requires_grad for n in names}
    model = TaskModel(base.encoder, spec, base.tokenizer, dict(head) if head else None)
    model.eval()
    tokenization = Tokenization(base.tokenizer, spec, config.max_length, base.family)
    examples = list(train)[: config.examples_per_step]
    encoded = tokenization.encode_many(examples)
    device = next(base.encoder.parameters()).device
    best = math.inf
    try:
        for name in names:
            live[name].requires_grad_(True)
        for _ in range(max(1, repeats)):
            tick = time.perf_counter()
            for start in range(0, len(encoded), config.micro_batch):
                chunk = range(start, min(len(encoded), start + config.micro_batch))
                batch = tokenization.collate([encoded[i] for i in chunk]).to(device)
                target = torch.tensor([examples[i].label for i in chunk], device=device)
                loss = torch.nn.functional.cross_entropy(model(batch), target, reduction="sum") / len(encoded)
                loss.backward()
            best = min(best, time.perf_counter() - tick)
            for name in names:
                live[name].grad = None
    finally:
        for name in names:
            live[name].grad = None
            live[name].requires_grad_(flags[name])
    return best
