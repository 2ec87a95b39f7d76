"""SRFT: Supervised Reinforcement Fine-Tuning (Fu et al., arXiv 2506.19767, §4, Eqs. 5–13).

One group per prompt: the on-policy rollouts plus the prompt's first demonstration as an
off-policy member (7 + 1 with ``rollout.n: 7``). The loss is the sum of three terms (Eq. 13):

* ``sft_demo``  w_SFT · NLL of the demonstration, w_SFT = 0.5·sg(exp(−H))           (Eq. 8)
* ``rl_demo``   −Â · f(π_θ) on the demonstration's tokens: π_β ≡ 1, no clipping,
                Â over the augmented group (rollouts ∪ demonstration)              (Eqs. 6, 7, 9, 10)
* ``rl_self``   correct rollouts −w_RL·log π_θ, incorrect ones +log π_θ,
                w_RL = 0.1·sg(exp(H)); no ratio, no advantage                        (Eq. 12)

plus, in the ``reference`` profile, an entropy bonus −0.001·H. There is no official code; the
``reference`` profile follows the re-implementation in the HPT repository
(``offline_loss_type=srft``), the ``paper`` profile follows the paper's equations (see the
README for every point where they differ, and ``PROFILES`` below).

Hooks: ``compose_group`` appends the demonstration, ``route_group`` gives the prompt
``Route(rl=1, sft=1, demos=(0,))`` (the batching puts both weights on the demonstration's one
row), ``reference_denominator`` returns log π_β = 0 on demonstration tokens, ``shape_ratio``
applies f on them, ``compute_advantage`` (a wrapper; ``entropy_level: batch`` only) records the
step's policy entropy around the core's group advantage, ``build_loss`` builds the terms.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from posttrain import GRPOConfig, LossTerm, Needs, Route, help_field, hookimpl
from posttrain import functional as F
from posttrain.batching import totals_of

ENTROPY_LEVELS = ("sequence", "policy", "batch")
AGGREGATIONS = ("invariant", "official")
# g(·) of the self-rollout term −c_i·g on rollout tokens (the reference code's srft_type).
SRFT_TYPES = ("paper", "exp", "classic_rl", "minus_old")
# What each profile fills in for the fields left at None.
PROFILES = {
    # The HPT repository's re-implementation (exp_scripts/train_srft.sh + mix_actor.py, srft branch).
    "reference": dict(entropy_level="sequence", demo_shaping="p_div_p", norm_adv_by_std=False,
                      loss_agg="token-sum-norm", entropy_coef=0.001),
    # The paper's equations; where they are silent, verl's defaults (the paper's framework).
    "paper": dict(entropy_level="policy", demo_shaping="none", norm_adv_by_std=True,
                  loss_agg="token-mean", entropy_coef=0.0),
}
# batch.extras key of the step's policy-entropy estimate (entropy_level: batch), one value per row.
BATCH_ENTROPY = "srft_batch_entropy"
# batch.stats key of H(π_θ) over the mini-batch (entropy_level: policy), from minibatch_statistics.
POLICY_ENTROPY = "srft/policy_entropy"


@dataclass
class SRFTConfig(GRPOConfig):
    name: str = help_field("srft", "Algorithm entry-point name.")
    profile: str = help_field(
        "reference",
        "reference (the HPT repository's re-implementation: per-sequence entropy, LUFFY shaping p/(p+0.1) on the "
        "demonstration, no advantage std, Σ/L_max RL aggregation, entropy bonus 0.001) | paper (Eqs. 5–13: policy "
        "entropy of the step's rollouts, f(p) = p, advantage with std (Eq. 7), token-mean RL aggregation, no "
        "entropy bonus). Fields below left at None take the profile's value. There is no official code.")
    # --- the entropy-aware weights -------------------------------------------------------------------
    entropy_level: Optional[str] = help_field(
        None,
        "Which entropy H the weights use: sequence (each row's own mean token entropy: the demonstration's for "
        "w_SFT, each rollout's for w_RL; the reference implementation) | policy (the paper's H(π_θ), Eqs. 8/12: "
        "the entropy of the current policy's distribution, from its logits, averaged over the mini-batch's "
        "on-policy rollout tokens before its loss; independent of the micro-batch split) | batch (an estimate "
        "of it without a forward pass: the mean of −log π_old(y_t) over the step's sampled tokens, one number per "
        "step). None: profile (reference: sequence, paper: policy).")
    sft_weight_scale: float = help_field(
        0.5, "w_SFT = sft_weight_scale · exp(−H), stop-gradient. Paper Eq. 8 and reference: 0.5.")
    rl_weight_scale: float = help_field(
        0.1, "w_RL = rl_weight_scale · exp(H) on correct rollouts, stop-gradient. Paper §4.2 and reference: 0.1.")
    w_sft_fixed: bool = help_field(
        False, "Ablation 'SRFT w/o w_SFT' (paper Table 3): w_SFT = 1.0 instead of the entropy-aware weight. Paper default: False.")
    w_rl_fixed: bool = help_field(
        False, "Ablation 'SRFT w/o w_RL' (paper Table 3): w_RL = 1.0 instead of the entropy-aware weight. Paper default: False.")
    # --- RL on the demonstration -------------------------------------------------------------------------
    demo_shaping: Optional[str] = help_field(
        None,
        "f applied to p = π_θ on demonstration tokens (π_β ≡ 1): none (f(p) = p, paper Eqs. 9–10) | p_div_p "
        "(p/(p + shaping_gamma), LUFFY's shaping; the reference script's off_policy_reshape=p_div_p_0.1) | sqrt "
        "| pow (p^0.5). None: profile (reference: p_div_p, paper: none).")
    shaping_gamma: float = help_field(0.1, "γ of the p_div_p shaping. Reference script: 0.1; unused by the paper profile.")
    srft_type: str = help_field(
        "paper",
        "g of the self-rollout term ℓ = −c_i·g on rollout tokens (c_i = w_RL for y+, −1 for y−); the reference code's "
        "srft_type: paper (g = log π_θ, Eq. 12; the code's default) | exp (g = π_θ) | classic_rl (g = ρ = π_θ/π_old) "
        "| minus_old (g = log π_θ − log π_old). Default: paper.")
    aggregation: str = help_field(
        "invariant",
        "invariant: every normaliser from the mini-batch totals, so splitting a mini-batch into micro-batches "
        "changes nothing | official: the reference code's numbers (mix_actor.update_policy): the SFT NLL and "
        "entropy token-means (and the RL normalisers of token-mean modes) are those of each micro-batch, "
        "back-propagated and summed over micro-batches (their weight grows with the number of micro-batches). "
        "With token-sum-norm the RL terms are the same in both. Default: invariant.")
    correct_threshold: float = help_field(
        0.5, "A rollout is a positive sample y+ (gets −w_RL·log π) when its reward is above this, else a negative "
             "sample y− (gets +log π). Binary 0/1 rewards (paper App. B): any value in (0, 1).")
    # --- GRPO fields with SRFT's values ----------------------------------------------------------------
    norm_adv_by_std: Optional[bool] = help_field(
        None, "Divide the augmented group's centred rewards by their std. Paper Eq. 7: True; reference: False "
              "(grpo_use_std=False). None: profile.")
    loss_agg: Optional[str] = help_field(
        None,
        "Aggregation of the two RL terms (both over all RL tokens of the mini-batch, so their sum is one loss over "
        "rollouts and demonstration): token-sum-norm (Σ/L_max; reference, L_max = 8192) | token-mean (paper profile, "
        "verl's default) | any core mode. None: profile. The SFT term is always a token-mean over demonstration tokens.")
    loss_max_len: Optional[int] = help_field(
        None, "L_max of the *-norm modes; None uses rollout.max_new_tokens. Reference: 8192 (max_response_length).")
    clip_low: Optional[float] = help_field(
        None, "PPO ε. SRFT: None (the paper omits clipping on the demonstration, Eq. 12 has no ratio; reference: "
              "loss_remove_clip=True). When set, the core's PPO mask also gates the self-rollout tokens.")
    sft_coef: float = help_field(1.0, "Extra multiplier on the sft_demo term (on top of w_SFT). Paper and reference: 1.0.")
    entropy_coef: Optional[float] = help_field(
        None, "Entropy bonus −coef·(token-mean entropy over all response tokens of the mini-batch). Reference: 0.001; "
              "paper: 0 (not in Eq. 13). None: profile.")
    kl_coef: float = help_field(0.0, "KL(π_θ‖π_ref) loss coefficient. SRFT: 0 (no KL, no reference model).")

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"profile '{self.profile}' is not one of {' | '.join(PROFILES)}")
        for key, value in PROFILES[self.profile].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        problems = []
        for key, allowed in (("srft_type", SRFT_TYPES), ("aggregation", AGGREGATIONS)):
            if getattr(self, key) not in allowed:
                problems.append(f"{key} '{getattr(self, key)}' is not one of {' | '.join(allowed)}")
        if self.entropy_level not in ENTROPY_LEVELS:
            problems.append(f"entropy_level '{self.entropy_level}' is not one of {' | '.join(ENTROPY_LEVELS)}")
        if self.demo_shaping not in F.SHAPING_KINDS:
            problems.append(f"demo_shaping '{self.demo_shaping}' is not one of {' | '.join(F.SHAPING_KINDS)}")
        if self.sft_weight_scale <= 0 or self.rl_weight_scale <= 0 or self.shaping_gamma <= 0:
            problems.append("sft_weight_scale, rl_weight_scale and shaping_gamma must be > 0")
        if self.entropy_coef < 0:
            problems.append(f"entropy_coef must be >= 0, got {self.entropy_coef}")
        if self.ratio_level != "token":
            problems.append("ratio_level must be token (the demonstration's ratio π_θ/π_β is per token)")
        if problems:
            raise ValueError("; ".join(problems))


@hookimpl
def algorithm_config():
    return SRFTConfig


@hookimpl
def requirements(config):
    # Token entropy (chunked, with gradient) for per-sequence weights and for the bonus; the batch
    # level reads the rollout engine's sampled log-probs instead and needs no entropy pass.
    return Needs(rollouts=True, reference=config.kl_coef > 0,
                 entropy=config.entropy_level == "sequence" or config.entropy_coef > 0,
                 minibatch_stats=config.entropy_level == "policy")


@hookimpl
def minibatch_statistics(batch, outputs, config):
    """``entropy_level: policy``: Σ H(π_θ(·|s_t)) and the token count over on-policy rollout tokens."""
    if config.entropy_level != "policy":
        return None
    on = batch.on_policy_tokens & (batch.rl_weight > 0)[:, None]
    return {POLICY_ENTROPY: ((outputs.entropy.float() * on).sum(), on.sum())}


# --- the weights -----------------------------------------------------------------------------------------


def entropy_weights(entropy: Tensor | float, config: SRFTConfig) -> tuple[Tensor, Tensor]:
    """(w_SFT, w_RL) = (0.5·exp(−H), 0.1·exp(H)), stop-gradient; 1.0 where an ablation fixes them."""
    h = torch.as_tensor(entropy, dtype=torch.float32).detach()
    w_sft = torch.ones_like(h) if config.w_sft_fixed else config.sft_weight_scale * torch.exp(-h)
    w_rl = torch.ones_like(h) if config.w_rl_fixed else config.rl_weight_scale * torch.exp(h)
    return w_sft, w_rl


def sequence_entropy(entropy: Tensor, mask: Tensor) -> Tensor:
    """Each row's mean token entropy over its response tokens, [N, L] → [N], detached (0 for an empty row)."""
    m = mask.bool()
    return (F.masked_sum(entropy.detach(), m, dim=-1) / m.sum(-1).clamp(min=1).to(entropy.dtype))


def row_entropy(batch, outputs, config: SRFTConfig) -> Tensor:
    """H per row [N], the entropy the weights of that row use (no gradient)."""
    if config.entropy_level == "policy":
        h = batch.stats.get(POLICY_ENTROPY, float("nan"))
        if not math.isfinite(h):
            raise RuntimeError("srft (entropy_level: policy): the mini-batch has no on-policy rollout tokens to take "
                               "H(π_θ) over (batch.stats lacks srft/policy_entropy)")
        return torch.full((len(batch),), float(h), device=outputs.logprobs.device)
    if config.entropy_level == "batch":
        if BATCH_ENTROPY not in batch.extras:
            raise RuntimeError("srft (entropy_level: batch): batch.extras lacks the step's entropy estimate; "
                               "compute_advantage records it, call it on the step batch before build_loss")
        return batch.extras[BATCH_ENTROPY].to(outputs.logprobs.device, torch.float32)
    if outputs.entropy is None:
        raise RuntimeError("srft (entropy_level: sequence) needs outputs.entropy: requirements() asks for it, "
                           "but the engine did not compute it")
    return sequence_entropy(outputs.entropy, batch.response_mask).float()


# --- per prompt group --------------------------------------------------------------------------------------


@hookimpl
def compose_group(group):
    """G_aug = rollouts ∪ {first demonstration} (Eq. 6); the demonstration is verified with them."""
    if not group.members or not group.demonstrations or any(m.off_policy for m in group.members):
        return None  # offline step, nothing to add, or it is already there
    return replace(group, members=[*group.members, group.demonstrations[0]])


@hookimpl
def route_group(group, metrics):
    """RL on every member; SFT on the demonstration that is a member (one row, both weights)."""
    if not group.members:
        return None
    demo = next((m for m in group.members if m.off_policy), None)
    if demo is None:  # a prompt without demonstration: only the self-rollout term
        if metrics is not None:
            metrics.log("srft/no_demo", 1.0, reduce="sum")
        return Route(rl=1.0)
    return Route(rl=1.0, sft=1.0, demos=(demo.teacher or 0,))


# --- per batch -----------------------------------------------------------------------------------------------


@hookimpl(wrapper=True)
def compute_advantage(batch, config, metrics):
    """``entropy_level: batch``: record the step's policy entropy around whatever computes Â.

    For on-policy tokens y_t ~ π_old(·|s_t), E[−log π_old(y_t|s_t)] = H(π_old(·|s_t)), so the mean
    of the sampled tokens' −log-probs over the step's on-policy tokens estimates the policy's
    mean token entropy without a forward pass. It is one number for the whole step (every
    mini- and micro-batch sees the same weights), stored per row in ``batch.extras``. A wrapper,
    so it runs even when an extension replaces the advantage; the advantage itself is left to
    the other implementations (by default the group-normalised reward over the augmented group).
    """
    if config.entropy_level == "batch":
        on = batch.response_mask & ~batch.off_policy[:, None] & (batch.rl_weight > 0)[:, None]
        if batch.sampling_logprobs is None or not bool(on.any()):
            raise RuntimeError("srft (entropy_level: batch) estimates the policy entropy from the rollouts' sampled "
                               "log-probs, and this step has no on-policy tokens with sampling log-probs")
        h = float(-F.masked_mean(batch.sampling_logprobs.float(), on))
        batch.extras[BATCH_ENTROPY] = torch.full((len(batch),), h)
        if metrics is not None:
            metrics.log("srft/batch_entropy", h)
    return (yield)


@hookimpl
def reference_denominator(batch, logprobs):
    """log π_β = 0 on demonstration tokens (π_β ≡ 1, Eq. 10); π_old elsewhere (unused by the loss)."""
    old = batch.old_logprobs if batch.old_logprobs is not None else logprobs.detach()
    return torch.where(batch.off_policy_tokens, torch.zeros_like(old), old)


@hookimpl
def shape_ratio(batch, ratio, config):
    """f(p) on demonstration tokens: p (paper) or p/(p + γ) (reference); rollout tokens keep ρ."""
    shaped = F.policy_shaping(ratio, kind=config.demo_shaping, gamma=config.shaping_gamma)
    return torch.where(batch.off_policy_tokens, shaped, ratio)


def self_rollout_signal(batch, logprobs: Tensor, ratio: Tensor, config: SRFTConfig) -> Tensor:
    """g [N, L] of the self-rollout term −c_i·g (``srft_type``), with gradient through ``logprobs``.

    paper: log π_θ (Eq. 12) | exp: π_θ | classic_rl: ρ = π_θ/π_old (the ratio the core built) |
    minus_old: log π_θ − log π_old (the gradient of paper, a value that is 0 at π_θ = π_old).
    """
    if config.srft_type == "exp":
        return logprobs.exp()
    if config.srft_type == "classic_rl":
        return ratio
    if config.srft_type == "minus_old":
        old = batch.old_logprobs if batch.old_logprobs is not None else logprobs.detach()
        return logprobs - old
    return logprobs


@hookimpl
def build_loss(batch, outputs, advantages, ratio, mask, config, metrics):
    """sft_demo + rl_demo + rl_self (+ entropy), normalised with the mini-batch totals; with
    ``aggregation: official`` with this micro-batch's own counts (the reference code's per-micro-batch means)."""
    t = batch.totals if config.aggregation == "invariant" else totals_of(batch, max_len=batch.totals.max_len)
    tokens = batch.response_mask
    lp = outputs.logprobs
    keep = mask.to(lp.dtype)  # 1_stable: all ones unless clip_low or an extension masks tokens
    rl_rows = batch.rl_weight > 0
    demo_rows = rl_rows & batch.off_policy
    self_rows = rl_rows & ~batch.off_policy
    sft_rows = batch.sft_weight > 0

    h = row_entropy(batch, outputs, config)  # [N], no gradient
    w_sft, w_rl = entropy_weights(h, config)
    if metrics is not None:
        metrics.log("srft/entropy", h.mean())
        if sft_rows.any():
            metrics.log("srft/w_sft", w_sft[sft_rows].mean())
        if self_rows.any():
            metrics.log("srft/w_rl", w_rl[self_rows].mean())

    def rl_agg(loss: Tensor, rows: Tensor) -> Tensor:  # both RL terms share the normaliser of all RL tokens
        return F.aggregate(loss, tokens & rows[:, None], config.loss_agg, num_tokens=t.rl_tokens,
                           num_seqs=t.rl_seqs, max_len=t.max_len)

    terms = []
    if t.sft_seqs > 0:  # Eq. 8: token-mean NLL over the mini-batch's demonstration tokens
        nll = F.sft_nll(lp, tokens & sft_rows[:, None], num_tokens=t.sft_tokens, weights=w_sft * batch.sft_weight)
        terms.append(LossTerm("sft_demo", config.sft_coef * nll))
    if t.rl_seqs > 0:
        # Eqs. 9–10: −Â·f(π_θ/π_β) with π_β ≡ 1, no clip (ratio is already shaped)
        pg_demo = -advantages * ratio * keep * batch.rl_weight[:, None]
        terms.append(LossTerm("rl_demo", rl_agg(pg_demo, demo_rows)))
        # Eq. 12: y+ → −w_RL·log π_θ, y− → +log π_θ (per token; no ratio, no advantage)
        correct = batch.rewards > config.correct_threshold
        coef = torch.where(correct, w_rl, torch.full_like(w_rl, -1.0)) * batch.rl_weight
        self_loss = -coef[:, None] * self_rollout_signal(batch, lp, ratio, config) * keep
        terms.append(LossTerm("rl_self", rl_agg(self_loss, self_rows)))
    if config.entropy_coef > 0 and outputs.entropy is not None:
        ent = F.aggregate(outputs.entropy, tokens, "token-mean", num_tokens=t.tokens, num_seqs=t.seqs)
        terms.append(LossTerm("entropy", -config.entropy_coef * ent))
    if config.kl_coef > 0 and batch.ref_logprobs is not None and t.rl_seqs > 0:
        kl = F.kl_estimate(lp, batch.ref_logprobs, config.kl_estimator)
        terms.append(LossTerm("kl", config.kl_coef * F.aggregate(kl, tokens & rl_rows[:, None], config.loss_agg,
                                                                  num_tokens=t.rl_tokens, num_seqs=t.rl_seqs,
                                                                  max_len=t.max_len)))
    return terms

