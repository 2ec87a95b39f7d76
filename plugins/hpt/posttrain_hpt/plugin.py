"""HPT: Hybrid Post-Training (Lv et al., "Towards a Unified View of Large Language Model
Post-Training", arXiv 2509.04419, §3.4 and Algorithm 1), as the official code runs it.

For each prompt the n on-policy rollouts are verified and counted: c correct out of n.

* ``route_group`` is the gate, α = f(P), β = g(P) with P = c/n. The default switch sends a
  prompt with c <= ``gate_max_correct`` to SFT on its demonstration (its rollouts leave the
  batch) and every other prompt to Dr.GRPO on its rollouts (all-correct prompts stay, A = 0).
* The RL part is the core's default policy gradient configured as Dr.GRPO: r − group mean, no
  ratio clipping, token sums over a constant L_max.
* §5.4 variants: OFF/ON and Mix/ON train the demonstration with LUFFY's off-policy RL
  (π_ref ≡ 1, shaping f = p/(p+γ)) instead of, or besides, SFT. ``compose_group`` adds the
  demonstration as an off-policy member so it is verified (its advantage is its reward: it
  sits alone in its advantage group), ``reference_denominator`` and ``shape_ratio`` do the rest.
* ``build_loss`` only runs in ``aggregation: official`` mode, where mean-type terms are means
  over the micro-batch as in the official code; by default the core's loss (means over the
  mini-batch) is used, so gradient accumulation does not change the update.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from posttrain import GRPOConfig, LossTerm, Route, help_field, hookimpl
from posttrain import functional as F

GATES = ("switch", "linear", "soft")
VARIANTS = ("sft_on", "off_on", "mix_on")
AGGREGATIONS = ("invariant", "official")
SHAPINGS = ("none", "p_div_p", "sqrt")


@dataclass
class HPTConfig(GRPOConfig):
    name: str = help_field("hpt", "Algorithm entry-point name.")
    # --- the gate: α = f(P), β = g(P) --------------------------------------------------------
    gate_max_correct: int = help_field(
        0,
        "SFT when at most this many of the n on-policy rollouts are correct (a COUNT out of rollout.n, "
        "not a fraction; the official code's switch_gate). RL needs gate_max_correct + 1 correct rollouts. "
        "Paper γ: 0 for Qwen2.5-Math, 2 for LLaMA-3.1-8B.")
    gate_off_max_correct: Optional[int] = help_field(
        None,
        "Second threshold of the switch gate (the official code's switch_gate_off, a COUNT): a prompt with "
        "gate_max_correct < c <= gate_off_max_correct drops its rollouts and trains its demonstration with LUFFY "
        "off-policy RL (π_ref ≡ 1, shaping off_policy_shaping, Â = r_demo, weight off_rl_weight) instead of SFT, "
        "as the code's offline_loss_type=off_sft trains its whether_off rows; c above it keeps RL on the rollouts. "
        "None = gate_max_correct (an empty band, as every official script: switch_gate_off = switch_gate).")
    gate: str = help_field(
        "switch",
        "Feedback functions of P = c/n: switch (paper Eq. 10 / official unify_strategy=switch: (α, β) = (0, 1) "
        "when c <= gate_max_correct, else (1, 0)) | linear (α rises linearly from 0 at P <= ramp_start to 1 at "
        "P >= ramp_end, β = 1 − α; both losses on one prompt in between; sft_on only; not in the code) | soft "
        "(official unify_strategy=soft with offline_loss_type=sft: every prompt keeps its n rollouts AND adds its "
        "demonstration, which shares the prompt's advantage group (Â = r − mean over rollouts ∪ demonstration) but "
        "gets SFT only, no policy gradient; the code's per-count soft_type coefficient tables are computed but never "
        "read by its actor, so they are not reproduced; sft_on only). Paper: switch.")
    ramp_start: float = help_field(
        0.0, "linear gate: P = c/n (a FRACTION in [0, 1]) at or below which α = 0, β = 1. Not in the paper.")
    ramp_end: float = help_field(
        0.5, "linear gate: P = c/n (a FRACTION in [0, 1]) at or above which α = 1, β = 0. Not in the paper.")
    # --- what the gated prompts learn from the demonstration (paper §5.4) ----------------------
    variant: str = help_field(
        "sft_on",
        "What a prompt routed offline trains on: sft_on (HPT: SFT on the demonstration) | off_on (LUFFY "
        "off-policy RL on the demonstration, π_ref ≡ 1, A = its reward) | mix_on (mix_sft_weight × SFT + "
        "off_rl_weight × off-policy RL). Paper default: sft_on (§5.4 compares all three).")
    off_rl_weight: float = help_field(
        1.0, "off_on / mix_on: weight of the off-policy RL loss on the demonstration. Paper §5.4: 1.0.")
    mix_sft_weight: float = help_field(
        0.1, "mix_on: weight of the SFT NLL on the demonstration (multiplied by sft_coef). Paper §5.4: 0.1.")
    off_policy_shaping: str = help_field(
        "p_div_p",
        "off_on / mix_on: shaping f(p) of the demonstration tokens' probability p = π_θ: p_div_p "
        "(LUFFY, f = p/(p + shaping_gamma); the official script's off_policy_reshape=p_div_p_0.1) | "
        "sqrt | none (f = p). Unused by sft_on.")
    shaping_gamma: float = help_field(0.1, "γ of the p_div_p shaping. Official script: 0.1.")
    # --- how the loss terms are normalised -------------------------------------------------------
    aggregation: str = help_field(
        "invariant",
        "invariant: SFT NLL and entropy are token-means over the whole mini-batch and the PG term is "
        "Σ/L_max over it, so splitting a mini-batch into micro-batches changes nothing (the official loss "
        "of a mini-batch that is one micro-batch) | official: the SFT NLL, entropy (and KL) are token-means "
        "over each micro-batch and summed over micro-batches, exactly as the official code (their weight "
        "grows with the number of micro-batches). Default: invariant.")
    # --- GRPO fields with HPT's values (official exp_scripts/train.sh) ----------------------------
    norm_adv_by_std: bool = help_field(
        False, "Divide by the group std. HPT code: False (Dr.GRPO, grpo_use_std=False); paper Eq. 11 writes the std.")
    clip_low: Optional[float] = help_field(
        None, "PPO ε; None = no ratio clipping. HPT code: None (loss_remove_clip=True); paper Eq. 11 writes the clip.")
    loss_agg: str = help_field(
        "token-sum-norm",
        "PG aggregation. HPT code: token-sum-norm (Σ over the tokens of all RL rows / L_max, "
        "loss_remove_token_mean=True).")
    loss_max_len: Optional[int] = help_field(
        None, "L_max of token-sum-norm; None uses rollout.max_new_tokens. HPT code: 8192 (max_response_length).")
    sft_coef: float = help_field(
        1.0, "Weight of the SFT NLL (token-mean over demonstration tokens). HPT code: sft_loss_coef=1.0 "
        "(a code comment suggests 0.3 for Qwen2.5-Math-1.5B).")
    entropy_coef: float = help_field(
        0.001, "Entropy bonus over all response tokens (rollouts and demonstrations). HPT code: 0.001; not in the paper.")
    kl_coef: float = help_field(0.0, "KL(π_θ‖π_ref) loss coefficient. HPT: 0 (no KL, no reference model).")

    def __post_init__(self) -> None:
        problems = []
        for key, allowed in (("gate", GATES), ("variant", VARIANTS), ("aggregation", AGGREGATIONS),
                             ("off_policy_shaping", SHAPINGS)):
            if getattr(self, key) not in allowed:
                problems.append(f"{key} '{getattr(self, key)}' is not one of {' | '.join(allowed)}")
        if self.gate_max_correct < 0:
            problems.append(f"gate_max_correct must be >= 0 (a count of correct rollouts), got {self.gate_max_correct}")
        if self.gate_off_max_correct is not None:
            if self.gate_off_max_correct < self.gate_max_correct:
                problems.append(f"gate_off_max_correct ({self.gate_off_max_correct}) must be >= gate_max_correct "
                                f"({self.gate_max_correct}): the off-policy RL band is gate_max_correct < c <= "
                                "gate_off_max_correct")
            if self.gate != "switch" or self.variant != "sft_on":
                problems.append("gate_off_max_correct works with gate: switch and variant: sft_on only (the official "
                                "switch_gate_off band of unify_strategy=switch, offline_loss_type=sft)")
        if self.gate == "soft" and self.variant != "sft_on":
            problems.append("gate: soft works with variant: sft_on only (official unify_strategy=soft adds an SFT "
                            "demonstration to every prompt)")
        if self.gate == "linear":
            if not 0.0 <= self.ramp_start < self.ramp_end <= 1.0:
                problems.append(f"linear gate needs 0 <= ramp_start < ramp_end <= 1 (fractions P = c/n), "
                                f"got {self.ramp_start}, {self.ramp_end}")
            if self.variant != "sft_on":
                problems.append("gate: linear works with variant: sft_on only (a Route has one RL weight per "
                                "prompt, so rollouts and an off-policy demonstration cannot get α and β apart)")
        if self.off_rl_weight <= 0 or self.mix_sft_weight < 0 or self.shaping_gamma <= 0:
            problems.append("off_rl_weight and shaping_gamma must be > 0, mix_sft_weight >= 0")
        if self.variant != "sft_on" and self.ratio_level != "token":
            problems.append("off_on / mix_on need ratio_level: token (the demonstration's ratio is per token)")
        if problems:
            raise ValueError("; ".join(problems))


@hookimpl
def algorithm_config():
    return HPTConfig


# --- per prompt group ------------------------------------------------------------------------------


def demo_in_group(config: HPTConfig) -> bool:
    """Whether compose_group appends the demonstration to the members (verified, in the advantage group)."""
    return uses_off_policy_rl(config) or config.gate == "soft"


def uses_off_policy_rl(config: HPTConfig) -> bool:
    """Whether some prompt may train its demonstration with off-policy RL (variants, or a switch_gate_off band)."""
    return config.variant != "sft_on" or off_band(config)


def off_band(config: HPTConfig) -> bool:
    """A non-empty switch_gate_off band: gate_max_correct < c <= gate_off_max_correct."""
    return config.gate_off_max_correct is not None and config.gate_off_max_correct > config.gate_max_correct


@hookimpl
def compose_group(group, config):
    """OFF/ON, Mix/ON, switch_gate_off band, soft: the first demonstration joins the members (off-policy),
    so it is verified (and, for soft, enters the prompt's advantage baseline)."""
    if not demo_in_group(config) or not group.members or not group.demonstrations:
        return None
    if any(m.off_policy for m in group.members):
        return None  # already there (another stage or an extension put it in)
    return replace(group, members=[*group.members, group.demonstrations[0]])


def feedback(correct: int, n: int, config: HPTConfig) -> tuple[float, float]:
    """(α, β) = (f(P), g(P)) for c = ``correct`` of ``n`` on-policy rollouts."""
    if config.gate == "soft":  # official unify_strategy=soft: rollouts and demonstration, always
        return 1.0, 1.0
    if config.gate == "switch":  # the count is compared with the count: no fractions involved
        offline_up_to = config.gate_off_max_correct if off_band(config) else config.gate_max_correct
        return (0.0, 1.0) if correct <= offline_up_to else (1.0, 0.0)
    p = correct / n
    alpha = min(1.0, max(0.0, (p - config.ramp_start) / (config.ramp_end - config.ramp_start)))
    return alpha, 1.0 - alpha


@hookimpl
def route_group(group, config, metrics):
    on = group.on_policy
    if not on:  # nothing sampled (offline step): the core's default routing
        return None
    c, n = group.num_correct(), len(on)
    alpha, beta = feedback(c, n, config)
    if beta > 0 and not group.demonstrations:  # nothing to imitate: the prompt keeps its RL update
        alpha, beta = 1.0, 0.0
        if metrics is not None:
            metrics.log("hpt/no_demo", 1.0, reduce="sum")
    if metrics is not None:
        metrics.log("hpt/mean_correct_frac", c / n)
        metrics.log("hpt/offline_ratio", float(beta > 0))
        if config.gate != "switch":
            metrics.log("hpt/alpha", alpha)
            metrics.log("hpt/beta", beta)
    if beta == 0:
        return Route(rl=alpha, sft=0.0, members=tuple(on))
    if config.gate == "soft":  # rollouts ∪ demonstration in one advantage group; the demo row also gets SFT
        return Route(rl=1.0, sft=1.0, demos=(0,))
    band = off_band(config) and c > config.gate_max_correct  # switch_gate < c <= switch_gate_off
    if metrics is not None and off_band(config):
        metrics.log("hpt/off_rl_ratio", float(band))
    if config.variant == "sft_on" and not band:
        return Route(rl=alpha, sft=beta, demos=(0,), members=tuple(on) if alpha > 0 else ())
    # off_on / mix_on / the switch_gate_off band (switch gate only): the demonstration alone, off-policy RL
    demo = next((i for i, m in enumerate(group.members) if m.off_policy and m.teacher in (0, None)), None)
    if demo is None:
        raise RuntimeError(f"{group.example.uid}: variant {config.variant} needs the demonstration among the group's "
                           "members (compose_group adds it); none found")
    sft = config.mix_sft_weight * beta if config.variant == "mix_on" else 0.0
    return Route(rl=config.off_rl_weight * beta, sft=sft, demos=(0,), members=(demo,))


# --- per batch ----------------------------------------------------------------------------------------


@hookimpl
def reference_denominator(batch, config):
    """π_ref ≡ 1 on demonstration tokens (log π_ref = 0), so ρ = π_θ there (LUFFY)."""
    if not uses_off_policy_rl(config):
        return None
    return torch.where(batch.off_policy_tokens, torch.zeros_like(batch.old_logprobs), batch.old_logprobs)


@hookimpl
def shape_ratio(batch, ratio, config):
    """f(π_θ) = π_θ/(π_θ + γ) on demonstration tokens; on-policy tokens keep ρ."""
    if not uses_off_policy_rl(config) or config.off_policy_shaping == "none":
        return None
    shaped = F.policy_shaping(ratio, kind=config.off_policy_shaping, gamma=config.shaping_gamma)
    return torch.where(batch.off_policy_tokens, shaped, ratio)


@hookimpl
def stabilization_mask(batch, config):
    """gate: soft: no policy gradient on demonstration tokens (the code's sft branch trains PG on on-policy rows
    only); the demonstration row is in the batch for the advantage baseline and its SFT term."""
    if config.gate != "soft":
        return None
    return ~batch.off_policy_tokens


@hookimpl
def build_loss(batch, outputs, advantages, ratio, mask, config):
    """``aggregation: official`` only: the official per-micro-batch loss.

    PG: −Σ ρ̃·Â·rl_weight over this micro-batch's RL tokens / L_max (with token-sum-norm this is
    the same number as the invariant mode's); SFT: sft_coef × token-mean NLL over this
    micro-batch's demonstration tokens (skipped when it has none, as the code skips the NaN);
    entropy and KL: token-means over all of this micro-batch's response tokens.
    """
    if config.aggregation != "official":
        return None  # the core's default: every normaliser from the mini-batch totals
    tokens = batch.response_mask
    max_len = batch.totals.max_len
    terms = []
    rl_rows = batch.rl_weight > 0
    if rl_rows.any():
        rl_tokens = tokens & rl_rows[:, None]
        pg = -advantages * ratio * mask * batch.rl_weight[:, None]
        terms.append(LossTerm("pg", F.aggregate(pg, rl_tokens, config.loss_agg, num_tokens=float(rl_tokens.sum()),
                                                 num_seqs=float(rl_rows.sum()), max_len=max_len)))
    sft_tokens = tokens & (batch.sft_weight > 0)[:, None]
    if sft_tokens.any():
        nll = F.sft_nll(outputs.logprobs, sft_tokens, num_tokens=float(sft_tokens.sum()), weights=batch.sft_weight)
        terms.append(LossTerm("sft", config.sft_coef * nll))
    if config.entropy_coef > 0 and outputs.entropy is not None:
        terms.append(LossTerm("entropy", -config.entropy_coef * F.masked_mean(outputs.entropy, tokens)))
    if config.kl_coef > 0 and batch.ref_logprobs is not None:
        kl = F.kl_estimate(outputs.logprobs, batch.ref_logprobs, config.kl_estimator)
        terms.append(LossTerm("kl", config.kl_coef * F.masked_mean(kl, tokens)))
    return terms
