"""DYPO: Dynamic Policy Optimization (arXiv 2604.08926, §3 Eqs. 4–18, App. A, App. C).

The paper is the reference: the DYPO repository holds no code. Per prompt q, the k on-policy
rollouts are verified (binary reward R) and the prompt is graded (§3.1):

* **easy**, every rollout correct: dropped (zero loss), ``Route(drop=True)``;
* **hard**, no rollout correct: γ·SFT on ONE demonstration drawn uniformly from the prompt's
  m teachers (Eq. 5), ``Route(rl=0, sft=γ, demos=(t,), members=())``;
* **mid**, mixed: α·L_GRPO + (1−α)·L_GAL (Eqs. 4, 18), ``Route(rl=1)``.

L_GRPO is the core's clipped surrogate with the std-normalised group advantage (ε = 0.2,
ξ = 1e-6). L_GAL (Eqs. 14–15) runs over every (success, failure) pair (τ_s, τ_f) of a mid
group: −log σ(β_GAL·d), d = [log π_θ(τ_s) − log π_ref(τ_s)] − [log π_θ(τ_f) − log π_ref(τ_f)],
with sequence log-probs as token sums and π_ref the frozen initial model. Its gradient is
−β_GAL·(1 − σ(β_GAL·d))·(∇log π_s − ∇log π_f) (Eq. 16).

Hooks: ``algorithm_config``, ``requirements`` (frozen reference, whole groups per
micro-batch), ``route_group`` (the grading gate and the teacher draw) and ``build_loss``
(α·GRPO + (1−α)·GAL + γ·SFT). Advantage, ratio and clipping are the core's defaults.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.nn.functional import softplus

from posttrain import GRPOConfig, LossTerm, Needs, Route, help_field, hookimpl
from posttrain import functional as F

GAL_REFERENCES = ("initial", "old")
WEIGHTINGS = ("per_term", "prompt_fraction")
PAIR_REDUCTIONS = ("mean", "sum")
# A rollout is a success when its reward is above this: Trajectory.correct's rule, so the pairs
# of GAL are exactly the S×F of the grading (a mid group always has at least one pair).
CORRECT_ABOVE = 0.5


@dataclass
class DYPOConfig(GRPOConfig):
    name: str = help_field("dypo", "Algorithm entry-point name.")
    # --- Eq. 4: L = 1_H·γ·L_SFT + 1_M·(α·L_GRPO + (1−α)·L_GAL) ------------------------------------
    alpha: float = help_field(
        0.5, "α of Eqs. 4/18: mid prompts train α·L_GRPO + (1−α)·L_GAL, α in [0, 1]. Paper default 0.5 "
        "(App. C Table 5: best of 0.2 / 0.5 / 0.8).")
    gal_beta: float = help_field(
        1.0, "β_GAL of Eq. 14, the inverse temperature of the GAL sigmoid, > 0. Paper default 1 "
        "(App. C Table 5: best of 0.1 / 1 / 2).")
    sft_coef: float = help_field(
        1.0, "γ of Eq. 4, >= 0: weight of the SFT NLL on a hard prompt's drawn demonstration. It is the route's "
        "SFT weight (Route.sft = γ, so batch.sft_weight = γ; the loss does not multiply by it again); γ = 0 drops "
        "hard prompts. Token-mean over the mini-batch's demonstration tokens. Paper: γ, value unstated; 1.0 "
        "(the DYPO README's actor.sft_loss_coef=1.0).")
    weighting: str = help_field(
        "per_term", "How Eq. 4's parts are weighted. per_term: each part is a mean over its own rows (SFT over the "
        "hard prompts' demonstration tokens, GRPO over the mid tokens, GAL over the mid groups), so a mini-batch's "
        "share of easy, hard and mid prompts does not scale the loss. prompt_fraction: Eq. 4's expectation over ALL "
        "prompts, easy ones included: the SFT part × (hard prompts / prompts), the GRPO, GAL and KL parts × (mid "
        "prompts / prompts) (batch.totals: sft_prompts, rl_prompts, prompts); the update then shrinks as prompts "
        "turn easy. Default per_term: the paper ships no code, and per_term keeps each part's scale (and the "
        "effective learning rate) independent of the batch's difficulty mix.")
    # --- GAL details the paper leaves open (research/algorithms.md §4.2) ----------------------------
    gal_reference: str = help_field(
        "initial",
        "π_ref of Eq. 15: initial (the frozen initial model of the stage; the core loads it and fills "
        "batch.ref_logprobs) | old (π_old, the policy that sampled the rollouts: d = 0 on the first update, "
        "so L_GAL = log 2 with gradient −β/2·(∇log π_s − ∇log π_f)). Not stated in the paper; default initial "
        "(DPO's reading of π_ref).")
    gal_length_norm: bool = help_field(
        False, "Sequence log-probs of Eq. 15 as the token MEAN instead of the token sum. Not stated in the "
        "paper; default False (token sums: log π(τ|q) of Eq. 1).")
    gal_pair_reduction: str = help_field(
        "mean", "How a mid group's pair losses combine: mean (Eq. 14's expectation over all |S|×|F| pairs) | "
        "sum (Σ over the pairs: groups with more pairs weigh more). Mid groups are then averaged. Not stated "
        "in the paper; default mean.")
    # --- the teacher draw (Eq. 5) ---------------------------------------------------------------------
    teacher_seed: int = help_field(
        0, "Seed of the uniform teacher draw for hard prompts: teacher = sha256(teacher_seed, prompt uid, "
        "step) mod m. A hash, not the global RNG, so the draw is reproducible and independent of rollouts, "
        "resumes and evaluation. Not in the paper.")
    # --- GRPO fields, with DYPO's values (App. A.1.2; unstated ones follow GRPO/verl) --------------
    norm_adv_by_std: bool = help_field(
        True, "Â = (R − μ_G)/(σ_G + ξ) (App. A Eq. 22: std on). Paper: True.")
    adv_eps: float = help_field(1e-6, "ξ of Eq. 22. Not stated in the paper; 1e-6 (verl).")
    clip_low: Optional[float] = help_field(
        0.2, "ε of CLIP(ρ, Â, ε) in Eq. 21, ρ = π_θ/π_old per token; None disables clipping. Value not stated in "
        "the paper; 0.2 (GRPO/verl).")
    loss_agg: str = help_field(
        "token-mean", "Aggregation of the GRPO token loss over the mini-batch's mid-prompt tokens. "
        "Not stated in the paper (Eq. 21 writes (1/k)Σ_i); token-mean (verl default).")
    kl_coef: float = help_field(
        0.0, "β_KL of Eq. 21, KL(π_θ‖π_ref) inside L_GRPO (so the term is α·β_KL·KL on mid rows). Not stated; 0.")
    entropy_coef: float = help_field(0.0, "Entropy bonus coefficient over all response tokens. Not in the paper; 0.")

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 <= self.alpha <= 1.0:
            problems.append(f"alpha must be in [0, 1], got {self.alpha}")
        if self.gal_beta <= 0:
            problems.append(f"gal_beta must be > 0, got {self.gal_beta}")
        if self.sft_coef < 0:
            problems.append(f"sft_coef (γ) must be >= 0, got {self.sft_coef}")
        if self.gal_reference not in GAL_REFERENCES:
            problems.append(f"gal_reference '{self.gal_reference}' is not one of {' | '.join(GAL_REFERENCES)}")
        if self.weighting not in WEIGHTINGS:
            problems.append(f"weighting '{self.weighting}' is not one of {' | '.join(WEIGHTINGS)}")
        if self.gal_pair_reduction not in PAIR_REDUCTIONS:
            problems.append(f"gal_pair_reduction '{self.gal_pair_reduction}' is not one of {' | '.join(PAIR_REDUCTIONS)}")
        if problems:
            raise ValueError("; ".join(problems))


@hookimpl
def algorithm_config():
    return DYPOConfig


def uses_gal(config: DYPOConfig) -> bool:
    return config.alpha < 1.0


@hookimpl
def requirements(config):
    return Needs(
        rollouts=True,
        reference=(uses_gal(config) and config.gal_reference == "initial") or config.kl_coef > 0 or config.kl_reward_coef > 0,
        entropy=config.entropy_coef > 0,
        whole_groups=True,  # GAL pairs are members of one group: never split a group across micro-batches
    )


# --- per prompt group: grading and the teacher draw ---------------------------------------------


def grade(correct: int, n: int) -> str:
    """§3.1: easy (all n correct) | hard (none) | mid (mixed)."""
    if correct == n:
        return "easy"
    return "hard" if correct == 0 else "mid"


def pick_teacher(seed: int, uid: str, step: int, m: int) -> int:
    """Eq. 5's τ_tgt ~ U{τ^(1..m)}: a uniform index in [0, m), a pure function of its arguments."""
    key = f"dypo:{seed}:{uid}:{step}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % m  # bias ≤ m/2^64


@hookimpl
def route_group(group, config, step, metrics):
    on = group.on_policy
    if not on:  # nothing sampled (an offline step): the core's default routing
        return None
    level = grade(group.num_correct(), len(on))
    if metrics is not None:
        for name in ("easy", "hard", "mid"):  # fractions of the step's prompts
            metrics.log(f"dypo/{name}", float(level == name))
        if level != "easy":  # among the prompts that train: the share trained on a demonstration (Fig. 4)
            metrics.log("dypo/offline_ratio", float(level == "hard"))
    if level == "easy":
        return Route(drop=True)
    if level == "mid":
        return Route(rl=1.0, members=tuple(on))
    m = len(group.demonstrations)
    if m == 0 or config.sft_coef == 0:
        # Nothing to imitate (or γ = 0). RL would add nothing either: all-wrong rollouts have Â = 0
        # and no GAL pair.
        if m == 0 and metrics is not None:
            metrics.log("dypo/no_demo", 1.0, reduce="sum")
        return Route(drop=True)
    t = pick_teacher(config.teacher_seed, group.example.uid or group.example.prompt, step, m)
    if metrics is not None:
        metrics.log(f"dypo/teacher_{t}", 1.0, reduce="sum")
    return Route(rl=0.0, sft=config.sft_coef, demos=(t,), members=())


# --- the Group Alignment Loss -------------------------------------------------------------------


def group_alignment_loss(
    seq_logratio: Tensor,
    correct: Tensor,
    group_index: Tensor,
    rows: Tensor,
    *,
    beta: float,
    num_rows: float,
    pair_reduction: str = "mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """L_GAL of Eqs. 14–15 over the (success, failure) pairs of each group, averaged over groups.

    Args:
        seq_logratio: [N] z_i = log π_θ(τ_i|q) − log π_ref(τ_i|q), with gradient.
        correct: [N] bool, success (τ_s) or failure (τ_f). Every pair (i, j) of one group with
            i a success and j a failure counts: all |S|×|F| pairs (Eq. 14's R(τ_s) > R(τ_f)
            for binary rewards).
        group_index: [N] long, rows sharing a value form one group.
        rows: [N] bool, rows that take part (the mid prompts' rollouts).
        beta: β_GAL.
        num_rows: participating rows of the whole MINI-batch (for DYPO ``batch.totals.rl_seqs``).
            Group g's loss L_g is weighted n_g / num_rows, n_g its row count: every mid group
            has the k rollouts of its prompt, so this is exactly the mean over the mini-batch's
            groups, and it needs only the group itself, so a micro-batch holding whole groups
            contributes its exact share.
        pair_reduction: ``mean`` (L_g = mean over its pairs, Eq. 14) | ``sum``.

    Returns:
        (loss scalar, per-group stats for groups with ≥ 1 pair, detached: ``loss`` [G'] L_g as
        a mean over pairs, ``weight`` [G'] mean 1 − σ(β·d), ``d`` [G'] mean d, ``pairs`` [G']).
    """
    idx = rows.nonzero().squeeze(-1)
    empty = {k: seq_logratio.new_zeros(0) for k in ("loss", "weight", "d", "pairs")}
    if idx.numel() == 0:
        return seq_logratio.sum() * 0.0, empty  # keeps the graph: backward still reaches every parameter
    z, s, g = seq_logratio[idx], correct[idx].bool(), group_index[idx]
    pairs = (g[:, None] == g[None, :]) & s[:, None] & ~s[None, :]  # [M, M]: row i succeeds, row j fails
    d = z[:, None] - z[None, :]  # [M, M] d(τ_i, τ_j) of Eq. 15
    ell = torch.where(pairs, softplus(-beta * d), torch.zeros_like(d))  # −log σ(βd), stable for any |d|
    _, gid = torch.unique(g, return_inverse=True)
    zeros = z.new_zeros(int(gid.max()) + 1)
    size = zeros.index_add(0, gid, torch.ones_like(z))  # [G] n_g
    n_pairs = zeros.index_add(0, gid, pairs.sum(1).to(z.dtype))  # [G] |S_g|·|F_g|
    loss_sum = zeros.index_add(0, gid, ell.sum(1))  # [G]
    mean = loss_sum / n_pairs.clamp(min=1.0)
    per_group = mean if pair_reduction == "mean" else loss_sum
    total = (size * per_group).sum()
    loss = total * 0.0 if float(num_rows) == 0.0 else total / float(num_rows)
    with torch.no_grad():
        has = n_pairs > 0
        w = torch.where(pairs, torch.sigmoid(-beta * d), torch.zeros_like(d))  # 1 − σ(βd) = σ(−βd), Eq. 16
        dd = torch.where(pairs, d, torch.zeros_like(d))
        stats = {
            "loss": mean[has],
            "weight": (zeros.index_add(0, gid, w.sum(1)) / n_pairs.clamp(min=1.0))[has],
            "d": (zeros.index_add(0, gid, dd.sum(1)) / n_pairs.clamp(min=1.0))[has],
            "pairs": n_pairs[has],
        }
    return loss, {k: v.detach() for k, v in stats.items()}


# --- the loss -----------------------------------------------------------------------------------


@hookimpl
def build_loss(batch, outputs, advantages, ratio, mask, config, metrics):
    """α·L_GRPO + (1−α)·L_GAL on mid rows, γ·L_SFT on hard prompts' demonstrations.

    Every normaliser is a mini-batch total (``batch.totals``): GRPO over the mid rows' tokens
    (``loss_agg``), GAL over the mid rows (see ``group_alignment_loss``), SFT over the
    demonstration tokens, so micro-batching changes nothing. ``weighting: prompt_fraction``
    then scales the mid parts by the fraction of mid prompts and SFT by that of hard prompts.
    """
    t = batch.totals
    mid_w, hard_w = route_fractions(t, config)
    tokens = batch.response_mask  # [N, L]
    rl_rows = batch.rl_weight > 0  # [N] mid rollouts
    terms: list[LossTerm] = []
    if t.rl_seqs > 0:
        if config.alpha > 0:
            # PPO's clipped value, the masked form's gradient (functional.ppo_token_loss)
            pg = F.ppo_token_loss(ratio, advantages, mask, config.clip_low, config.clip_high, config.clip_dual)
            pg = pg * batch.rl_weight[:, None]  # [N, L]
            grpo = F.aggregate(pg, tokens & rl_rows[:, None], config.loss_agg, num_tokens=t.rl_tokens,
                               num_seqs=t.rl_seqs, max_len=t.max_len)
            terms.append(LossTerm("pg", mid_w * config.alpha * grpo))
        if uses_gal(config):
            gal = _gal_term(batch, outputs, config, metrics)
            terms.append(LossTerm(gal.name, mid_w * gal.value, gal.metrics))
        if config.kl_coef > 0 and batch.ref_logprobs is not None:
            kl = F.kl_estimate(outputs.logprobs, batch.ref_logprobs, config.kl_estimator)  # [N, L]
            kl = F.aggregate(kl, tokens & rl_rows[:, None], config.loss_agg, num_tokens=t.rl_tokens,
                             num_seqs=t.rl_seqs, max_len=t.max_len)
            terms.append(LossTerm("kl", mid_w * config.alpha * config.kl_coef * kl))
    if t.sft_seqs > 0:  # γ is already the rows' sft_weight (Route.sft)
        sft_tokens = tokens & (batch.sft_weight > 0)[:, None]
        terms.append(LossTerm("sft", hard_w * F.sft_nll(outputs.logprobs, sft_tokens, num_tokens=t.sft_tokens,
                                                        weights=batch.sft_weight)))
    if config.entropy_coef > 0 and outputs.entropy is not None:
        ent = F.aggregate(outputs.entropy, tokens, "token-mean", num_tokens=t.tokens, num_seqs=t.seqs)
        terms.append(LossTerm("entropy", -config.entropy_coef * ent))
    return terms


def route_fractions(totals, config) -> tuple[float, float]:
    """(weight of the mid parts, weight of the SFT part): 1, 1 under ``per_term``; under
    ``prompt_fraction`` Eq. 4's E_q over every prompt of the mini-batch, easy ones included:
    (mid prompts / prompts, hard prompts / prompts)."""
    if config.weighting == "per_term" or totals.prompts <= 0:
        return 1.0, 1.0
    return totals.rl_prompts / totals.prompts, totals.sft_prompts / totals.prompts


def _gal_term(batch, outputs, config, metrics) -> LossTerm:
    initial = config.gal_reference == "initial"
    ref = batch.ref_logprobs if initial else batch.old_logprobs  # [N, L]
    if ref is None:
        missing = "ref_logprobs (requirements() asks the core for the reference model)" if initial else "old_logprobs"
        raise RuntimeError(f"dypo: gal_reference={config.gal_reference} but the batch has no {missing}")
    tokens = batch.response_mask
    norm = config.gal_length_norm
    z = F.sequence_logprob(outputs.logprobs, tokens, normalize=norm) - F.sequence_logprob(ref, tokens, normalize=norm)
    rows = (batch.rl_weight > 0) & ~batch.off_policy
    gal, stats = group_alignment_loss(z, batch.rewards > CORRECT_ABOVE, batch.group_index, rows,
                                      beta=config.gal_beta, num_rows=batch.totals.rl_seqs,
                                      pair_reduction=config.gal_pair_reduction)
    if metrics is not None:  # one value per mid group, so the step's mean is the mean over groups
        for loss, weight, d, n in zip(*(stats[k].tolist() for k in ("loss", "weight", "d", "pairs"))):
            metrics.log("dypo/gal", loss)
            metrics.log("dypo/gal_weight", weight)
            metrics.log("dypo/gal_d", d)
            metrics.log("dypo/gal_pairs", n)
    return LossTerm("gal", (1.0 - config.alpha) * gal)
