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

The code's other settings (defaults off, as in ``train.sh``): ``off_policy_shaping`` logp /
p_logp, ``on_policy_shaping`` (g(ρ) on rollout tokens), ``off_max_clip``/``off_min_clip`` and
``target_probs`` (``shape_ratio``; the teacher's log-probs come from a data field, read in
``rollout_requests`` before sampling), ``all_max_clip`` (``stabilization_mask``), ``demo_loss: sft``,
the "RL w/ SFT loss" baseline (``compose_group`` keeps the demonstration out of the advantage
group, ``route_group`` gives it SFT), and the adaptive entropy coefficient ``entropy_target``
(``build_loss``, official mode): fixed, or learned (``entropy.LearnedEntropyCoef``, whose state the
``LUFFY`` instance keeps in checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from posttrain import GRPOConfig, LossTerm, Route, help_field, hookimpl
from posttrain import functional as F
from posttrain.data import DataError, demonstration_values

from .entropy import LearnedEntropyCoef

AGGREGATIONS = ("invariant", "official")
DEMO_LOSSES = ("off_policy_rl", "sft")
# f on demonstration tokens: the core's kinds on p, plus the code's log-prob forms.
OFF_SHAPINGS = (*F.SHAPING_KINDS, "logp", "p_logp")
ON_SHAPINGS = ("none", "logp", "p_logp", "sqrt", "pow", "p_div_p")
TARGET_PROB_EPS = 1e-6  # the code's p/(target_probs + 1e-6)


@dataclass
class LUFFYConfig(GRPOConfig):
    name: str = help_field("luffy", "Algorithm entry-point name.")
    # --- the mixed group ---------------------------------------------------------------------------
    n_off: int = help_field(
        1,
        "Demonstrations appended to each prompt's group of rollout.n rollouts (the first n_off of the prompt's "
        "demonstrations; fewer if it has fewer). Official: 1 with 7 rollouts (n=8, n_prefix=1), so set "
        "rollout.n: 7. 0 turns LUFFY into Dr.GRPO on the rollouts alone (the on-policy baseline).")
    demo_loss: str = help_field(
        "off_policy_rl",
        "How the demonstration is trained: off_policy_rl (LUFFY, use_off_policy_loss=True: a member of the mixed "
        "group, −Â·f(π_θ)) | sft (the 'RL w/ SFT loss' baseline, exp_scripts/train_rl_sft_loss.sh: "
        "use_sft_multitask_loss=True with adv_estimator=grpo_split, i.e. the n rollouts alone form the advantage "
        "group and the first n_off demonstrations get sft_coef × token-mean NLL). Official LUFFY: off_policy_rl.")
    # --- policy shaping on demonstration tokens --------------------------------------------------------
    off_policy_shaping: str = help_field(
        "p_div_p",
        "f applied to p = π_θ on demonstration tokens (π_ref ≡ 1), the code's off_policy_reshape: p_div_p "
        "(f = p/(p + shaping_gamma), the official script's p_div_p_0.1) | none (no_reshape, f = p) | sqrt "
        "(square_root, √p) | pow (p^shaping_power) | logp (f = shaping_weight·log p) | p_logp "
        "(f = p + shaping_weight·log p). Official: p_div_p. logp/p_logp read log p through the core's ratio, "
        "whose log is clamped at −20 (no gradient for p < 2e-9).")
    shaping_gamma: float = help_field(
        0.1, "γ of p_div_p; the weight on ∇log p, γp/(p+γ)², peaks at p = γ. Official: 0.1 (code also has 0.3, 0.5).")
    shaping_power: float = help_field(0.5, "k of the pow shaping f = p^k (off_policy_reshape_pow_exp). Official code: 0.5.")
    shaping_weight: float = help_field(
        0.1, "w of the logp / p_logp shapings (off_policy_reshape_weight). Official yaml default: 0.1.")
    target_probs: bool = help_field(
        False,
        "The code's target_probs mode (use_off_policy_probs=True, the batch key target_probs): f = π_θ/(π_teacher + "
        "1e-6) on demonstration tokens instead of off_policy_shaping. π_teacher = exp of the teacher's log-probs, one "
        "per demonstration token, from the data field target_logprobs_key (kept as the demonstration's "
        "sampling_logprobs). Official scripts: False.")
    target_logprobs_key: str = help_field(
        "target_logprobs",
        "Data field with the teacher's log-probs for target_probs: a list of numbers (one per token of the "
        "demonstration as the model's tokenizer splits it, EOS included), or one such list per demonstration. "
        "The code's target_probs holds probabilities: store their logs here.")
    off_max_clip: Optional[float] = help_field(
        None, "Clamp f ≤ this on demonstration tokens, after shaping (off_policy_max_clip; −1 = None = off). "
              "A clamped token has no gradient. Official scripts: off.")
    off_min_clip: Optional[float] = help_field(
        None, "Clamp f ≥ this on demonstration tokens, after shaping (off_policy_min_clip; −1 = None = off). "
              "Official scripts: off.")
    all_max_clip: Optional[float] = help_field(
        None,
        "Drop every token (rollouts and demonstrations) whose π_θ > this from the policy gradient (all_max_clip; "
        "−1 = None = off); the entropy bonus keeps it. With token-sum-norm the numbers are the code's; with "
        "token-mean the code also removes the token from the count, here it stays in it (as PPO's mask). "
        "Official scripts: off.")
    # --- shaping of on-policy tokens -----------------------------------------------------------------------
    on_policy_shaping: str = help_field(
        "none",
        "g applied to ρ = π_θ/π_old on rollout tokens, the code's on_policy_reshape: none (no_reshape, ρ) | logp "
        "(log ρ) | p_logp (ρ + on_shaping_weight·log ρ) | sqrt (square_root, √ρ) | pow (ρ^on_shaping_power) | "
        "p_div_p (f(π_θ)/f(π_old), f(p) = p/(p + on_shaping_gamma); p_div_p_0.1 / p_div_p_0.5). A PPO clip "
        "(clip_low) acts on g, as in the code. Official scripts: none (issue #25: tried, no gain).")
    on_shaping_weight: float = help_field(0.1, "w of the on-policy p_logp shaping (on_policy_reshape_weight). Official yaml: 0.1.")
    on_shaping_gamma: float = help_field(0.1, "γ of the on-policy p_div_p shaping (p_div_p_0.1 or p_div_p_0.5).")
    on_shaping_power: float = help_field(0.5, "k of the on-policy pow shaping (on_policy_reshape_pow_exp). Official yaml: 0.5.")
    # --- adaptive entropy coefficient ----------------------------------------------------------------------
    entropy_target: Optional[float] = help_field(
        None,
        "The code's adaptive entropy coefficient (use_adaptive_temperature=True) with target entropy H* = this "
        "(adaptive_temperature_target_entropy, code default 1.0); entropy_target_mode picks the strategy. Needs "
        "aggregation: official (a per-micro-batch rule). Official scripts: off (None).")
    entropy_target_mode: str = help_field(
        "fixed",
        "fixed (use_adaptive_temperature_fixed=True): per micro-batch coef = entropy_coef·H*/sg(H̄), H̄ its token-mean "
        "entropy | learned (use_adaptive_temperature_fixed=False): coef = α = exp(log α), log α₀ = log(entropy_coef), "
        "learned SAC-style by its own AdamW (alpha_lr, β (0.9, 0.999), wd 0.01) on Σ_k sg(H̄_k − H*)·α over the "
        "mini-batch's micro-batches, stepped once per optimizer step; α and its optimizer are saved in checkpoints.")
    alpha_lr: float = help_field(0.01, "Learning rate of log α (entropy_target_mode: learned; alpha_lr). Code yaml: 1e-2.")
    alpha_max: Optional[float] = help_field(
        None, "Clamp α ≤ this (entropy_target_mode: learned; adaptive_temperature_clip, −1 = None = off); "
              "above it log α gets no gradient. Code yaml: off.")
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
        for key, allowed in (("off_policy_shaping", OFF_SHAPINGS), ("on_policy_shaping", ON_SHAPINGS),
                             ("aggregation", AGGREGATIONS), ("demo_loss", DEMO_LOSSES)):
            if getattr(self, key) not in allowed:
                problems.append(f"{key} '{getattr(self, key)}' is not one of {' | '.join(allowed)}")
        if self.on_shaping_gamma <= 0 or self.on_shaping_power <= 0:
            problems.append(f"on_shaping_gamma and on_shaping_power must be > 0, got {self.on_shaping_gamma}, "
                            f"{self.on_shaping_power}")
        if (self.off_max_clip is not None and self.off_min_clip is not None and self.off_min_clip > self.off_max_clip):
            problems.append(f"off_min_clip ({self.off_min_clip}) must be <= off_max_clip ({self.off_max_clip})")
        if self.all_max_clip is not None and self.all_max_clip <= 0:
            problems.append(f"all_max_clip must be > 0 (a probability threshold), got {self.all_max_clip}")
        if self.entropy_target_mode not in ("fixed", "learned"):
            problems.append(f"entropy_target_mode '{self.entropy_target_mode}' is not one of fixed | learned")
        if self.entropy_target_mode == "learned" and self.entropy_target is None:
            problems.append("entropy_target_mode: learned needs entropy_target (H*; the code's default is 1.0)")
        if self.alpha_lr <= 0 or (self.alpha_max is not None and self.alpha_max <= 0):
            problems.append(f"alpha_lr and alpha_max must be > 0, got {self.alpha_lr}, {self.alpha_max}")
        if self.entropy_target is not None:
            if self.aggregation != "official":
                problems.append("entropy_target (adaptive entropy coefficient) needs aggregation: official: the code "
                                "rescales each micro-batch's entropy mean")
            if self.entropy_target <= 0 or self.entropy_coef <= 0:
                problems.append("entropy_target and entropy_coef must be > 0 for the adaptive entropy coefficient")
        if self.demo_loss == "sft" and (self.target_probs or self.off_max_clip is not None or self.off_min_clip is not None):
            problems.append("demo_loss: sft trains the demonstration with SFT: target_probs and off_max_clip/off_min_clip "
                            "(off-policy RL settings) do not apply")
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
    if config.demo_loss == "sft":
        return None  # RL w/ SFT loss: the demonstrations stay out of the advantage group (grpo_split)
    if config.target_probs:
        attach_teacher_logprobs(group, config)
    return replace(group, members=[*group.members, *group.demonstrations[: config.n_off]])


def attach_teacher_logprobs(group, config: LUFFYConfig) -> None:
    """target_probs: each trained demonstration's ``sampling_logprobs`` = the teacher's log-probs, read
    from the data field ``target_logprobs_key`` (unless something already set them)."""
    for d in group.demonstrations[: config.n_off]:
        if d.sampling_logprobs is not None:
            continue
        try:
            d.sampling_logprobs = demonstration_values(group.example, config.target_logprobs_key, d.teacher or 0,
                                                       len(d.response_ids), truncated=not d.finished)
        except DataError as e:
            raise DataError(f"{e}. luffy's target_probs: true needs the teacher's log-probs of every demonstration "
                            "token: add them (algorithm.target_logprobs_key names the field) or set "
                            "algorithm.target_probs: false") from None


@hookimpl
def rollout_requests(groups, config):
    """target_probs: read the teacher's log-probs before sampling, so bad data stops before any generation."""
    if config.target_probs and config.n_off > 0:
        for g in groups:
            if g.demonstrations:
                attach_teacher_logprobs(g, config)
    return None  # the default requests


@hookimpl
def route_group(group, config):
    """RL w/ SFT loss (``demo_loss: sft``): RL on the rollouts, SFT on the first ``n_off`` demonstrations."""
    if config.demo_loss != "sft" or not group.on_policy:
        return None  # LUFFY: the core's default (RL on every member, demonstrations included)
    k = min(config.n_off, len(group.demonstrations))
    return Route(rl=1.0, sft=1.0, demos=tuple(range(k)), members=tuple(range(len(group.members))))


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


def shape_off_policy(p: Tensor, teacher_logprobs: Optional[Tensor], config: LUFFYConfig) -> Tensor:
    """f(p) [N, L] for p = π_θ on demonstration tokens (the code's off_policy_reshape, then the clamps).

    none p | p_div_p p/(p+γ) | sqrt √p | pow p^k | logp w·log p | p_logp p + w·log p;
    target_probs: p/(π_teacher + 1e-6) instead; then f clamped to [off_min_clip, off_max_clip].
    """
    if config.target_probs:
        f = p / (teacher_logprobs.exp() + TARGET_PROB_EPS)
    elif config.off_policy_shaping == "logp":
        f = config.shaping_weight * torch.log(p)
    elif config.off_policy_shaping == "p_logp":
        f = p + config.shaping_weight * torch.log(p)
    else:
        f = F.policy_shaping(p, kind=config.off_policy_shaping, gamma=config.shaping_gamma, power=config.shaping_power)
    if config.off_max_clip is not None or config.off_min_clip is not None:
        f = torch.clamp(f, min=config.off_min_clip, max=config.off_max_clip)
    return f


def shape_on_policy(ratio: Tensor, old_logprobs: Tensor, config: LUFFYConfig) -> Tensor:
    """g(ρ) [N, L] for ρ = π_θ/π_old on rollout tokens (the code's on_policy_reshape).

    none ρ | logp log ρ | p_logp ρ + w·log ρ | sqrt √ρ | pow ρ^k |
    p_div_p f(π_θ)/f(π_old) = ρ·(π_old + γ)/(π_θ + γ), f(p) = p/(p + γ).
    """
    kind = config.on_policy_shaping
    if kind == "logp":
        return torch.log(ratio)
    if kind == "p_logp":
        return ratio + config.on_shaping_weight * torch.log(ratio)
    if kind == "sqrt":
        return torch.sqrt(ratio)
    if kind == "pow":
        return ratio ** config.on_shaping_power
    if kind == "p_div_p":
        p_old = old_logprobs.exp()
        return ratio * (p_old + config.on_shaping_gamma) / (ratio * p_old + config.on_shaping_gamma)
    return ratio


@hookimpl
def shape_ratio(batch, ratio, config):
    """f(π_θ) on demonstration tokens (p/(p+γ) by default), g(ρ) on rollout tokens (ρ by default)."""
    off_default = config.off_policy_shaping == "none" and not config.target_probs and config.off_max_clip is None \
        and config.off_min_clip is None
    if off_default and config.on_policy_shaping == "none":
        return None  # f = p: the ratio already is π_θ on demonstration tokens, ρ elsewhere
    teacher = batch.sampling_logprobs if config.target_probs else None
    if config.target_probs and teacher is None:
        raise RuntimeError("luffy (target_probs: true): the batch has no sampling_logprobs to read the teacher's "
                           "log-probs of the demonstration tokens from")
    off = ratio if off_default else shape_off_policy(ratio, teacher, config)
    if config.on_policy_shaping != "none":
        old = batch.old_logprobs if batch.old_logprobs is not None else torch.zeros_like(ratio)
        on = shape_on_policy(ratio, old, config)
    else:
        on = ratio
    return torch.where(batch.off_policy_tokens, off, on)


@hookimpl
def stabilization_mask(batch, logprobs, config):
    """all_max_clip: keep only tokens with π_θ <= all_max_clip (every row, as the code's p_on_mask)."""
    if config.all_max_clip is None:
        return None
    return logprobs.detach().exp() <= config.all_max_clip


def learns_alpha(config: LUFFYConfig) -> bool:
    """The learned entropy coefficient is on (its state lives in the ``LUFFY`` instance)."""
    return config.entropy_target is not None and config.entropy_target_mode == "learned"


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


def build_loss(batch, outputs, advantages, ratio, mask, config, alpha: Optional[LearnedEntropyCoef] = None,
               step: int = 0):
    """``aggregation: official`` only: the code's per-micro-batch loss.

    PG: −Σ f(ρ)·Â over this micro-batch's tokens / L_max (token-sum-norm: the same number as the
    invariant mode's); SFT (``demo_loss: sft``): sft_coef × token-mean NLL over this micro-batch's
    demonstration tokens; entropy (and KL): token-means over this micro-batch's response tokens,
    summed over micro-batches as the code's gradient accumulation does. With ``entropy_target``
    the entropy coefficient is entropy_coef·target/sg(H̄) (the code's fixed adaptive strategy), or the
    learned α of ``alpha`` (``entropy_target_mode: learned``; optimizer step ``step``).
    """
    if config.aggregation != "official":
        return None  # the core's default: normalisers from the mini-batch totals
    tokens = batch.response_mask  # [N, L]
    rl_rows = batch.rl_weight > 0
    terms = []
    if rl_rows.any():
        terms.append(LossTerm("pg", policy_gradient(batch, advantages, ratio, mask, config, rl_rows)))
    sft_tokens = tokens & (batch.sft_weight > 0)[:, None]  # demo_loss: sft (the code's compute_sft_pure_loss)
    if sft_tokens.any():
        nll = F.sft_nll(outputs.logprobs, sft_tokens, num_tokens=float(sft_tokens.sum()), weights=batch.sft_weight)
        terms.append(LossTerm("sft", config.sft_coef * nll))
    if config.entropy_coef > 0 and outputs.entropy is not None:
        h = F.masked_mean(outputs.entropy, tokens)
        coef = config.entropy_coef
        if learns_alpha(config):  # the code's learned strategy: sg(α), α trained towards the target entropy
            coef = alpha.coefficient(float(h.detach()), step)
        elif config.entropy_target is not None:  # the code's fixed adaptive strategy: coef·target/sg(H̄)
            coef = coef * config.entropy_target / h.detach()
        logged = {"luffy/entropy_coef": float(coef)} if config.entropy_target is not None else {}
        terms.append(LossTerm("entropy", -coef * h, logged))
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


# --- the plugin: the hooks above, and the state of the learned entropy coefficient --------------------


class LUFFY:
    """The entry point: one instance per stage. Its only state is the learned entropy coefficient
    (``entropy_target_mode: learned``): log α, its AdamW moments and the gradient of the optimizer
    step in progress, saved in every checkpoint."""

    algorithm_config = staticmethod(algorithm_config)
    compose_group = staticmethod(compose_group)
    rollout_requests = staticmethod(rollout_requests)
    route_group = staticmethod(route_group)
    compute_advantage = staticmethod(compute_advantage)
    reference_denominator = staticmethod(reference_denominator)
    shape_ratio = staticmethod(shape_ratio)
    stabilization_mask = staticmethod(stabilization_mask)
    split_policy_gradient = staticmethod(split_policy_gradient)

    def __init__(self, config: LUFFYConfig) -> None:
        self.alpha = LearnedEntropyCoef(config.entropy_coef, config.entropy_target, config.alpha_lr,
                                        config.alpha_max) if learns_alpha(config) else None

    @hookimpl
    def build_loss(self, batch, outputs, advantages, ratio, mask, config, step):
        return build_loss(batch, outputs, advantages, ratio, mask, config, alpha=self.alpha, step=step)

    def state_dict(self) -> dict:
        return {} if self.alpha is None else {"alpha": self.alpha.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.alpha is not None and "alpha" in state:
            self.alpha.load_state_dict(state["alpha"])
