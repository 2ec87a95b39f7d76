"""LUFFY: mixed-policy GRPO with off-policy demonstrations and policy shaping (Yan et al.,
"Learning to Reason under Off-Policy Guidance", arXiv 2504.14945), as the official code
(``exp_scripts/train.sh``, ``mix_core_alg.compute_token_on_off_policy_loss``) runs it.

* ``compose_group`` appends ``n_off`` demonstrations to the n rollouts (7 + 1 with
  ``rollout.n: 7``), so they are verified and share the group's advantage baseline: the core's
  ``compute_advantage`` gives Â = r − mean over the mixed group (no std by default).
* On-policy tokens keep the core's ρ = π_θ/π_old and its PPO mask (off by default:
  ``clip_low: None``; the core never clips demonstration tokens).
* ``reference_denominator`` sets π_ref ≡ 1 on demonstration tokens, so ρ = π_θ there, and
  ``shape_ratio`` turns it into f(π_θ) = π_θ/(π_θ + γ): the core's loss −Â·f(ρ) is then LUFFY's
  off-policy term, whose weight on ∇log π_θ is γp/(p + γ)².
* ``build_loss``: a wrapper splits the policy-gradient term into ``pg_on`` and ``pg_off`` (their
  sum is the term the inner implementation built) and logs π_θ on demonstration tokens; the
  plain implementation runs only with ``aggregation: official`` (per-micro-batch means, as the
  code). By default the core's loss runs, with every normaliser from the mini-batch totals.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from posttrain import GRPOConfig, LossTerm, help_field, hookimpl
from posttrain import functional as F

AGGREGATIONS = ("invariant", "official")


@dataclass
class LUFFYConfig(GRPOConfig):
    name: str = help_field("luffy", "Algorithm entry-point name.")
    # --- the mixed group ---------------------------------------------------------------------------
    n_off: int = help_field(
        1,
        "Demonstrations appended to each prompt's group of rollout.n rollouts (the first n_off of the prompt's "
        "demonstrations; fewer if it has fewer). Official: 1 with 7 rollouts (n=8, n_prefix=1), so set "
        "rollout.n: 7. 0 turns LUFFY into Dr.GRPO on the rollouts alone (the on-policy baseline).")
    # --- policy shaping on demonstration tokens --------------------------------------------------------
    off_policy_shaping: str = help_field(
        "p_div_p",
        "f applied to p = π_θ on demonstration tokens (π_ref ≡ 1): p_div_p (f = p/(p + shaping_gamma), the "
        "official script's off_policy_reshape=p_div_p_0.1) | none (f = p, no shaping) | sqrt (√p) | pow "
        "(p^shaping_power). Official: p_div_p.")
    shaping_gamma: float = help_field(
        0.1, "γ of p_div_p; the weight on ∇log p, γp/(p+γ)², peaks at p = γ. Official: 0.1 (code also has 0.3, 0.5).")
    shaping_power: float = help_field(0.5, "k of the pow shaping f = p^k. Official code: 0.5.")
    # --- how the loss terms are normalised -------------------------------------------------------------
    aggregation: str = help_field(
        "invariant",
        "invariant: the core's loss, every normaliser from the mini-batch totals, so splitting a mini-batch into "
        "micro-batches changes nothing | official: the code's numbers: the PG term's normalisers (token counts for "
        "token-mean) and the entropy/KL token-means are those of each micro-batch, summed over micro-batches "
        "(their weight grows with the number of micro-batches). With token-sum-norm the PG term is the same in "
        "both. Default: invariant.")
    # --- GRPO fields with LUFFY's values (official exp_scripts/train.sh) ------------------------------
    norm_adv_by_std: bool = help_field(
        False, "Divide by the std of the mixed group. LUFFY code: False (grpo_use_std=False); the paper writes the std.")
    clip_low: Optional[float] = help_field(
        None, "PPO ε on on-policy tokens; None = no clipping. LUFFY code: None (loss_remove_clip=True); the paper "
              "writes the clip (0.2). Demonstration tokens are never clipped.")
    loss_agg: str = help_field(
        "token-sum-norm",
        "PG aggregation. LUFFY code: token-sum-norm (Σ over the tokens of rollouts and demonstrations / L_max, "
        "loss_remove_token_mean=True).")
    loss_max_len: Optional[int] = help_field(
        None, "L_max of token-sum-norm; None uses rollout.max_new_tokens. LUFFY code: 8192 (max_response_length).")
    entropy_coef: float = help_field(
        0.001, "Entropy bonus over all response tokens (rollouts and demonstrations). LUFFY code: 0.001.")
    kl_coef: float = help_field(0.0, "KL(π_θ‖π_ref) loss coefficient. LUFFY: 0 (no KL, no reference model).")

    def __post_init__(self) -> None:
        problems = []
        if self.off_policy_shaping not in F.SHAPING_KINDS:
            problems.append(f"off_policy_shaping '{self.off_policy_shaping}' is not one of {' | '.join(F.SHAPING_KINDS)}")
        if self.aggregation not in AGGREGATIONS:
            problems.append(f"aggregation '{self.aggregation}' is not one of {' | '.join(AGGREGATIONS)}")
        if self.n_off < 0:
            problems.append(f"n_off must be >= 0 (demonstrations per group), got {self.n_off}")
        if self.shaping_gamma <= 0 or self.shaping_power <= 0:
            problems.append(f"shaping_gamma and shaping_power must be > 0, got {self.shaping_gamma}, {self.shaping_power}")
        if self.ratio_level != "token":
            problems.append("ratio_level must be token (the demonstration's ratio π_θ/π_ref is per token)")
        if problems:
            raise ValueError("; ".join(problems))


@hookimpl
def algorithm_config():
    return LUFFYConfig


# --- per prompt group ------------------------------------------------------------------------------


@hookimpl
def compose_group(group, config, metrics):
    """G = rollouts ∪ the first ``n_off`` demonstrations; the demonstrations are verified with them."""
    if not group.members or config.n_off == 0 or any(m.off_policy for m in group.members):
        return None  # offline step, the on-policy baseline, or already composed
    if not group.demonstrations:  # nothing to learn from: plain Dr.GRPO on this prompt
        if metrics is not None:
            metrics.log("luffy/no_demo", 1.0, reduce="sum")
        return None
    return replace(group, members=[*group.members, *group.demonstrations[: config.n_off]])


# --- per batch ---------------------------------------------------------------------------------------


@hookimpl(wrapper=True)
def compute_advantage(batch, metrics):
    """Log the mean advantage of the demonstrations (whatever computed it; by default r − group mean)."""
    adv = yield
    off = batch.off_policy & (batch.rl_weight > 0)  # [N]
    if metrics is not None and bool(off.any()):
        per_row = adv if adv.dim() == 1 else F.masked_mean(adv, batch.response_mask, dim=-1)  # [N]
        metrics.log("luffy/adv_off", per_row[off].mean())
    return adv


@hookimpl
def reference_denominator(batch, logprobs):
    """log π_ref = 0 on demonstration tokens (π_ref ≡ 1, so ρ = π_θ there); π_old on rollout tokens."""
    old = batch.old_logprobs if batch.old_logprobs is not None else logprobs.detach()
    return torch.where(batch.off_policy_tokens, torch.zeros_like(old), old)


@hookimpl
def shape_ratio(batch, ratio, config):
    """f(π_θ) on demonstration tokens (p/(p+γ) by default); rollout tokens keep ρ."""
    if config.off_policy_shaping == "none":
        return None  # f = p: the ratio already is π_θ on demonstration tokens
    shaped = F.policy_shaping(ratio, kind=config.off_policy_shaping, gamma=config.shaping_gamma,
                              power=config.shaping_power)
    return torch.where(batch.off_policy_tokens, shaped, ratio)


def pg_normalisers(batch, config: LUFFYConfig) -> dict[str, float]:
    """Normalisers of the PG term: mini-batch totals (invariant) or this micro-batch's counts (official)."""
    t = batch.totals
    if config.aggregation == "invariant":  # what the core's build_loss uses
        return dict(num_tokens=t.rl_tokens, num_seqs=t.rl_seqs, max_len=t.max_len)
    rl_rows = batch.rl_weight > 0
    return dict(num_tokens=float((batch.response_mask & rl_rows[:, None]).sum()), num_seqs=float(rl_rows.sum()),
                max_len=t.max_len)


def policy_gradient(batch, advantages: Tensor, ratio: Tensor, mask: Tensor, config: LUFFYConfig, rows: Tensor) -> Tensor:
    """−Σ mask·Â·f(ρ)·rl_weight over the response tokens of ``rows`` [N] bool, aggregated by ``loss_agg``."""
    loss = -advantages * ratio * mask * batch.rl_weight[:, None]  # [N, L]
    return F.aggregate(loss, batch.response_mask & rows[:, None], config.loss_agg, **pg_normalisers(batch, config))


@hookimpl
def build_loss(batch, outputs, advantages, ratio, mask, config):
    """``aggregation: official`` only: the code's per-micro-batch loss.

    PG: −Σ f(ρ)·Â over this micro-batch's tokens / L_max (token-sum-norm: the same number as the
    invariant mode's); entropy (and KL): token-means over this micro-batch's response tokens,
    summed over micro-batches as the code's gradient accumulation does.
    """
    if config.aggregation != "official":
        return None  # the core's default: normalisers from the mini-batch totals
    tokens = batch.response_mask  # [N, L]
    rl_rows = batch.rl_weight > 0
    terms = []
    if rl_rows.any():
        terms.append(LossTerm("pg", policy_gradient(batch, advantages, ratio, mask, config, rl_rows)))
    if config.entropy_coef > 0 and outputs.entropy is not None:
        terms.append(LossTerm("entropy", -config.entropy_coef * F.masked_mean(outputs.entropy, tokens)))
    if config.kl_coef > 0 and batch.ref_logprobs is not None and rl_rows.any():
        kl = F.kl_estimate(outputs.logprobs, batch.ref_logprobs, config.kl_estimator)
        terms.append(LossTerm("kl", config.kl_coef * F.masked_mean(kl, tokens & rl_rows[:, None])))
    return terms


@hookimpl(wrapper=True, specname="build_loss")
def split_policy_gradient(batch, outputs, advantages, ratio, mask, config, metrics):
    """Report the loss's on- and off-policy parts: the ``pg`` term becomes ``pg_on`` + ``pg_off``.

    ``pg_off`` is the demonstration rows' share, computed with the PG term's normalisers;
    ``pg_on = pg − pg_off``, so the sum (value and gradient) is exactly what the inner
    implementation built. Also logs the mean π_θ on demonstration tokens (a token mean over the
    step's micro-batches).
    """
    terms = yield
    off_rows = batch.off_policy & (batch.rl_weight > 0)  # [N]
    if metrics is not None and bool(off_rows.any()):
        p = outputs.logprobs.detach().exp()  # [N, L]
        off_tokens = batch.response_mask & off_rows[:, None]  # [N, L]
        metrics.log("luffy/p_off", F.masked_mean(p, off_tokens), weight=off_tokens.sum())
    pg = next((t for t in terms or [] if t.name == "pg"), None)
    if pg is None:
        return terms
    off = policy_gradient(batch, advantages, ratio, mask, config, off_rows)
    split = [LossTerm("pg_on", pg.value - off, dict(pg.metrics)), LossTerm("pg_off", off)]
    return [part for t in terms for part in (split if t is pg else [t])]
