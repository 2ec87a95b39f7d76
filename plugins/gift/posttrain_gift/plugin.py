"""GIFT: Gibbs Initialization with Finite Temperature (Zhao et al., arXiv 2601.09233, §3,
Algorithm 1, App. B eq. 18), as the official code (``zzy1127/GIFT``,
``verl/trainer/fsdp_gift_trainer.py``) computes it.

An offline, SFT-stage loss. At every position t of a demonstration y* the frozen base model
gives log p_base(·|x, y*_<t) over the whole vocabulary; the target is that distribution tilted
by e^β on the demonstration token,

    p̃_t = (1 − λ)·p_base + λ/V,   q_t = softmax(log p̃_t + β·onehot(y*_t))   (Eq. 18; the code
                                    writes log(p̃_t + 1e-10): ``target_form: official``),

and the policy minimises the soft-target cross-entropy ℓ_t = −Σ_k q_t(k)·log π_θ(k|x, y*_<t),
averaged over the demonstration tokens of the mini-batch. β → ∞ is SFT; β = 0 distils the
base model. Hooks:

* ``requirements``: no rollouts; the base model's full-vocabulary log-probs (``reference_vocab``).
  The core loads the stage's initial weights as the frozen reference, i.e. π_base for stage 1.
* ``route_group``: every prompt trains on its demonstration(s) with SFT weight 1.
* ``token_distribution_loss``: ℓ_t on a chunk of positions (the core calls it chunk by chunk,
  checkpointed, so no [N, L, V] tensor of the batch ever exists), plus the full-vocabulary
  diagnostics (KL to the base, target entropy, top-k overlap) under ``no_grad``.
* ``build_loss``: the token-mean of ℓ_t over the mini-batch's demonstration tokens, one term
  ``gift``; the default SFT NLL term is not added.
"""

from __future__ import annotations

import hashlib
import math
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain import GRPOConfig, LossTerm, Needs, Route, help_field, hookimpl
from posttrain import functional as F

DEMO_CHOICES = ("all", "first", "random")
TARGET_FORMS = ("exact", "official")
AGGREGATIONS = ("invariant", "official")
DIAGNOSTICS = ("kl_to_base", "target_entropy", "topk_overlap", "target_gold_prob")  # order of the stacked stats


@dataclass
class GIFTConfig(GRPOConfig):
    name: str = help_field("gift", "Algorithm entry-point name.")
    beta: float = help_field(
        20.0,
        "Inverse temperature gain β added to the demonstration token's base log-prob: q ∝ p_base·e^{β·1[k=y*]}. "
        "Paper §4.3: ≈20 for Qwen2.5-7B, ≈10 for Llama-3.1-8B; official script trainer.beta=20. "
        "β = .inf is exactly SFT (one-hot target); β = 0 distils the base model.")
    smooth: float = help_field(
        0.0,
        "λ: mix the base distribution with the uniform one before tilting, p̃ = (1−λ)·p_base + λ/V. Official "
        "code smooth_lambda (default 0.0); not in the paper's Algorithm 1.")
    target_form: str = help_field(
        "exact",
        "How q is computed: exact (paper App. B Eq. 18 in log space, q = softmax(log p̃ + β·onehot), no guard) | "
        "official (the official code's log(p̃ + 1e-10) guard). Both in the model's dtype or wider (float64 in a "
        "float64 run). They differ only where the base gives the gold token p ≲ 1e-8, exactly where GIFT departs "
        "from SFT: at β = 10, p = 1e-9 the guard makes q(y*) 10 % too large. Default: exact (the paper's target; the "
        "guard is a float32 engineering trick that log space does not need).")
    aggregation: str = help_field(
        "invariant",
        "invariant: token-mean over the mini-batch's demonstration tokens, so micro-batching changes nothing | "
        "official: the official trainer's numbers (fsdp_gift_trainer): each micro-batch's token-mean, "
        "back-propagated and summed over micro-batches (weight grows with the number of micro-batches; the code's "
        "+1e-8 in the denominator is omitted). Default: invariant.")
    demos: str = help_field(
        "all",
        "Which demonstrations of a prompt to train on: all (each (prompt, demonstration) pair is one sample, as "
        "in the official SFT dataset, which has one solution per prompt) | first | random (one per prompt per step).")
    sft_coef: float = help_field(
        1.0, "Weight of the GIFT term (token-mean soft-target cross-entropy over demonstration tokens). Paper: 1.")
    diagnostics: bool = help_field(
        True,
        "Log gift/kl_to_base (KL(π_θ‖π_base)), gift/target_entropy (H(q)), gift/topk_overlap and "
        "gift/target_gold_prob (q(y*)) as token-means over demonstration tokens. Full-vocabulary quantities, "
        "computed under no_grad on each chunk; False skips that work.")
    overlap_k: int = help_field(
        10, "k of gift/topk_overlap = |top-k(π_θ) ∩ top-k(π_base)| / k per position. Paper Fig. 2 does not state k.")

    def __post_init__(self) -> None:
        problems = []
        if not self.beta >= 0.0:  # also rejects nan
            problems.append(f"beta must be >= 0 (paper: 20 for Qwen, 10 for Llama; .inf is SFT), got {self.beta}")
        if not 0.0 <= self.smooth <= 1.0:
            problems.append(f"smooth (λ) must be in [0, 1], got {self.smooth}")
        for key, allowed in (("target_form", TARGET_FORMS), ("aggregation", AGGREGATIONS)):
            if getattr(self, key) not in allowed:
                problems.append(f"{key} '{getattr(self, key)}' is not one of {' | '.join(allowed)}")
        if self.demos not in DEMO_CHOICES:
            problems.append(f"demos '{self.demos}' is not one of {' | '.join(DEMO_CHOICES)}")
        if self.overlap_k < 1:
            problems.append(f"overlap_k must be >= 1, got {self.overlap_k}")
        if self.sft_coef <= 0:
            problems.append(f"sft_coef must be > 0 (it weights the only loss term), got {self.sft_coef}")
        if self.entropy_coef != 0.0 or self.kl_coef != 0.0:
            problems.append("entropy_coef and kl_coef must be 0: GIFT's loss is the soft-target cross-entropy alone "
                            "(the pull toward the base model is in the target q)")
        if problems:
            raise ValueError("; ".join(problems))


# --- the math ------------------------------------------------------------------------------------


def gift_target(reference_logprobs: Tensor, labels: Tensor, beta: float, smooth: float = 0.0,
                form: str = "official", dtype: torch.dtype | None = None) -> Tensor:
    """q [..., V] from the base log-probs [..., V] and the demonstration tokens [...].

    ``form``: official, q = softmax(log(p̃ + 1e-10) + β·onehot(y*)) (the code; this function's
    default, kept for its callers) | exact, q = softmax(log p̃ + β·onehot(y*)) (Eq. 18, the
    plugin's default through ``target_form``). Computed in the wider of ``reference_logprobs``'s
    dtype, ``dtype`` (the model's) and float32. β = ∞ gives the one-hot SFT target exactly (the
    finite formula would compute ∞ − ∞).
    """
    wide = torch.promote_types(reference_logprobs.dtype, dtype or torch.float32)
    if math.isinf(beta):
        V = reference_logprobs.shape[-1]
        return torch.nn.functional.one_hot(labels, V).to(torch.promote_types(wide, torch.float32))
    return F.gibbs_target_exact(reference_logprobs.to(wide), labels, beta, smooth,
                                guard=1e-10 if form == "official" else None)


@torch.no_grad()
def token_diagnostics(logits: Tensor, reference_logprobs: Tensor, target: Tensor, labels: Tensor, k: int) -> Tensor:
    """Per-position [..., 4]: KL(π_θ‖π_base), H(q), top-k overlap of π_θ and π_base, q(y*).

    ``logits`` [..., V] of the policy, ``reference_logprobs`` [..., V] of the base, ``target`` q
    [..., V], ``labels`` [...]. Exact full-vocabulary sums, no sampling.
    """
    logp = torch.log_softmax(logits.detach().float(), dim=-1)
    ref = reference_logprobs.float()
    p = logp.exp()
    kl = torch.where(p > 0, p * (logp - ref), torch.zeros_like(p)).sum(-1)
    entropy = -torch.special.xlogy(target, target).sum(-1)
    k = min(k, logp.shape[-1])
    top_policy = logp.topk(k, dim=-1).indices
    top_base = ref.topk(k, dim=-1).indices
    overlap = (top_policy.unsqueeze(-1) == top_base.unsqueeze(-2)).any(-1).sum(-1).float() / k
    gold = target.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return torch.stack([kl, entropy, overlap, gold], dim=-1)


# Per-chunk diagnostics waiting for build_loss, keyed by the step's Metrics object.
# token_distribution_loss sees a chunk of positions but not the response mask, so it cannot
# average over real tokens itself: it leaves the per-token numbers here and build_loss, which
# has the mask, logs their means. Keyed weakly, so a step's leftovers die with its Metrics.
_PENDING: "weakref.WeakKeyDictionary[object, list[Tensor]]" = weakref.WeakKeyDictionary()


def _forward_chunks(chunks: list[Tensor], rows: int, width: int) -> Tensor | None:
    """The micro-batch's forward chunks: the trailing ones whose widths add up to L.

    The core's order is forward (chunks 0..L in order) → build_loss → backward (which recomputes
    the checkpointed chunks and calls the hook again). Entries left by the previous micro-batch's
    recomputation precede the current forward's, so the tail is exactly the current forward.
    """
    taken, total = [], 0
    for c in reversed(chunks):
        if c.shape[0] != rows or total + c.shape[1] > width:
            return None
        taken.append(c)
        total += c.shape[1]
        if total == width:
            return torch.cat(taken[::-1], dim=1)
    return None


# --- hooks ---------------------------------------------------------------------------------------


@hookimpl
def algorithm_config():
    return GIFTConfig


@hookimpl
def requirements(config):
    return Needs(rollouts=False, reference_vocab=True)


def _stable_index(key: str, n: int) -> int:
    # A hash, not the global RNG, so the choice survives resume and doesn't shift sampling.
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % n


@hookimpl
def route_group(group, config, step):
    k = len(group.demonstrations)
    if k == 0:  # nothing to imitate
        return Route(drop=True)
    if config.demos == "all":
        demos = tuple(range(k))
    elif config.demos == "first":
        demos = (0,)
    else:  # random
        demos = (_stable_index(f"{group.example.uid}:{step}", k),)
    return Route(rl=0.0, sft=1.0, demos=demos, members=())


@hookimpl
def token_distribution_loss(logits, reference_logprobs, labels, config, metrics):
    """ℓ [n, c] = −Σ_k q(k)·log softmax(logits)_k, q = the Gibbs target of the chunk."""
    target = gift_target(reference_logprobs, labels, config.beta, config.smooth, form=config.target_form,
                         dtype=logits.dtype)
    loss = F.soft_cross_entropy(logits, target)
    if metrics is not None and config.diagnostics:
        stats = token_diagnostics(logits, reference_logprobs, target, labels, config.overlap_k)
        _PENDING.setdefault(metrics, []).append(stats)
    return loss


@hookimpl
def build_loss(batch, outputs, config, metrics):
    if outputs.distribution_loss is None:
        raise RuntimeError("gift: outputs.distribution_loss is missing; the engine must honour "
                           "Needs(reference_vocab=True) and call token_distribution_loss")
    t = batch.totals
    rows = batch.sft_weight > 0
    mask = batch.response_mask & rows[:, None]  # demonstration tokens routed to GIFT
    weighted = outputs.distribution_loss * batch.sft_weight[:, None]
    # official: this micro-batch's own token count (the code's per-micro-batch mean, summed by backward)
    num_tokens = t.sft_tokens if config.aggregation == "invariant" else float(mask.sum())
    value = config.sft_coef * F.aggregate(weighted, mask, "token-mean", num_tokens=num_tokens, num_seqs=t.sft_seqs)
    if metrics is not None:
        _log_metrics(batch, outputs, mask, config, metrics)
    return [LossTerm("gift", value)]


def _log_metrics(batch, outputs, mask, config, metrics) -> None:
    """Token-means over this micro-batch's demonstration tokens (the step averages micro-batches)."""
    chunks = _PENDING.pop(metrics, [])
    if not bool(mask.any()):
        return
    metrics.log("gift/nll", F.masked_mean(-outputs.logprobs.detach(), mask))
    if not config.diagnostics:
        return
    N, L = batch.response_ids.shape
    stats = _forward_chunks(chunks, N, L)
    if stats is None:  # token_distribution_loss did not run on this micro-batch as the engine runs it
        return
    for i, name in enumerate(DIAGNOSTICS):
        metrics.log(f"gift/{name}", F.masked_mean(stats[..., i], mask))
