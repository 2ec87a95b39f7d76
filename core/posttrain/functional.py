"""Pure torch helpers that algorithm plugins compose: masks, advantages, ratios, losses.

Every function is stateless and takes plain arguments (no config objects), so a plugin can
call it with whatever its config says and a test can call it with hand-computed numbers.

Shapes: ``N`` rows (one prompt + one response each), ``L`` padded response width, ``V``
vocabulary size, ``H`` hidden size. A ``mask`` is bool or 0/1 float [N, L] marking response
tokens. Formulas follow verl (``verl/trainer/ppo/core_algos.py``) and the LUFFY/HPT/GIFT
code, see ``shared/research/algorithms.md``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

__all__ = [
    "LOSS_AGG_MODES", "SHAPING_KINDS", "KL_KINDS",
    "masked_sum", "masked_mean",
    "group_advantages", "rloo_advantages",
    "entropy_from_logits", "logprobs_from_logits", "chunked_token_stats",
    "importance_ratio", "sequence_ratio", "ppo_clip_mask", "clipped_surrogate", "clip_fraction",
    "policy_shaping", "aggregate", "sft_nll", "kl_estimate", "sequence_logprob",
    "gibbs_target", "soft_cross_entropy", "truncated_is_weight",
]

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum-norm")
SHAPING_KINDS = ("none", "p_div_p", "sqrt", "pow")
KL_KINDS = ("k1", "k2", "k3")


# --- masks ---------------------------------------------------------------------------------------


def _masked(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(x·m, m as x's dtype), both broadcast to a common shape.

    A bool mask selects with ``torch.where`` so a nan/inf at a padded position (e.g. a log-prob
    of a pad token) cannot leak into the sum (0·nan = nan); a float mask multiplies, so it may
    also carry weights.
    """
    shape = torch.broadcast_shapes(x.shape, mask.shape)
    x, mask = x.expand(shape), mask.expand(shape)
    dtype = x.dtype if x.is_floating_point() else torch.float32
    if mask.dtype == torch.bool:
        return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)), mask.to(dtype)
    return x * mask, mask.to(dtype)


def masked_sum(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Σ x·m over ``dim`` (all elements when None). ``x`` and ``mask`` broadcast together."""
    xm, _ = _masked(x, mask)
    return xm.sum() if dim is None else xm.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None, eps: float = 0.0) -> Tensor:
    """Σ x·m / (Σ m + eps) over ``dim`` (all elements when None).

    With the default ``eps=0`` (verl's and LUFFY's ``masked_mean``) an empty mask gives nan, on
    purpose: a mean over nothing is undefined and callers of the reference code test for it.
    Pass ``eps > 0`` to get 0 instead.
    """
    xm, m = _masked(x, mask)
    if dim is None:
        return xm.sum() / (m.sum() + eps)
    return xm.sum(dim) / (m.sum(dim) + eps)


def _safe_div(total: Tensor, denom: float | Tensor) -> Tensor:
    """total / denom, or 0·total when denom is 0: an empty mini-batch part contributes nothing
    but keeps the autograd graph (backward still reaches every parameter, with zero grad)."""
    d = float(denom)
    return total * 0.0 if d == 0.0 else total / d


# --- advantages ----------------------------------------------------------------------------------


def _group_stats(rewards: Tensor, group_index: Tensor, rows: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(r as float, w as float [N], contiguous group id per row [N], member count per group [G])."""
    r = rewards if rewards.is_floating_point() else rewards.float()
    w = torch.ones_like(r) if rows is None else rows.to(r.dtype)
    # Group ids may be arbitrary (prompt uids hashed to longs): map them to 0..G-1 first.
    uniq, gid = torch.unique(group_index, return_inverse=True)
    G = uniq.numel()
    count = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, gid, w)
    return r, w, gid, count


def group_advantages(
    rewards: Tensor,
    group_index: Tensor,
    *,
    use_std: bool = True,
    eps: float = 1e-6,
    rows: Tensor | None = None,
) -> Tensor:
    """GRPO outcome advantage, one per row: (r − mean_g) / (std_g + eps), or r − mean_g.

    Args:
        rewards: [N] float, one scalar score per row.
        group_index: [N] long; rows with equal values form a group (any integers).
        use_std: divide by the group's std (GRPO); False is Dr.GRPO's centring only (the
            setting of every LUFFY/HPT/SRFT script).
        eps: added to the std, verl's 1e-6.
        rows: [N] bool, rows that take part. Other rows neither enter the group statistics
            nor get an advantage (0), e.g. SFT-only demonstrations.

    Returns:
        [N] advantages, rewards' float dtype.

    Semantics are verl's ``compute_grpo_outcome_advantage``: the std is ``torch.std``'s
    unbiased one (N−1); a group of a single (participating) row has mean 0 and std 1, so its
    advantage is r/(1+eps) with ``use_std`` and r without. A group whose rewards are all equal
    gets 0 (0/(0+eps)).
    """
    r, w, gid, count = _group_stats(rewards, group_index, rows)
    total = torch.zeros_like(count).index_add_(0, gid, r * w)
    mean = total / count.clamp(min=1.0)
    dev2 = torch.zeros_like(count).index_add_(0, gid, (r - mean[gid]) ** 2 * w)
    std = (dev2 / (count - 1.0).clamp(min=1.0)).sqrt()
    single = count <= 1.0
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    adv = r - mean[gid]
    if use_std:
        adv = adv / (std[gid] + eps)
    return adv * w


def rloo_advantages(rewards: Tensor, group_index: Tensor, *, rows: Tensor | None = None) -> Tensor:
    """REINFORCE leave-one-out: r_i − mean of the other members of i's group.

    ``rewards`` [N] float, ``group_index`` [N] long, ``rows`` [N] bool (others get 0 and are
    not counted). Returns [N]. A group with a single participating row gets 0 (no baseline to
    compare against, as verl's ``rloo``). Equals verl's r·n/(n−1) − mean·n/(n−1).
    """
    r, w, gid, count = _group_stats(rewards, group_index, rows)
    total = torch.zeros_like(count).index_add_(0, gid, r * w)
    n = count[gid]
    others = (total[gid] - r) / (n - 1.0).clamp(min=1.0)
    adv = torch.where(n > 1.0, r - others, torch.zeros_like(r))
    return adv * w


# --- logits → token statistics -------------------------------------------------------------------


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Token entropy of softmax(logits): [..., V] → [...].

    H = logsumexp(z) − Σ softmax(z)·z, verl's form (no [..., V] log-softmax). It is computed on
    z − max(z): the same value and gradient (H is shift-invariant), but without the float32
    cancellation of two large numbers when logits are large (|z| ~ 1e3 would lose ~1e-4).
    """
    z = logits - logits.detach().amax(dim=-1, keepdim=True)
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(-1)


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[label]: [..., V] logits, [...] long labels → [...].

    Computed as z_y − logsumexp(z), which never materialises the [..., V] log-softmax.
    ``labels`` must be valid vocabulary ids (pad positions hold the pad id; mask them later).
    """
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _chunk_stats(
    h: Tensor,
    labels: Tensor,
    lm_head: Callable[[Tensor], Tensor],
    temperature: float,
    entropy: bool,
    extra: Callable[[Tensor, slice], Tensor] | None,
    sl: slice,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    logits = lm_head(h)
    # Upcast bf16/fp16 logits: log-softmax over ~150k classes in bf16 loses the small log-probs.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    lp = logprobs_from_logits(logits, labels)
    ent = entropy_from_logits(logits) if entropy else None
    ex = extra(logits, sl) if extra is not None else None
    return lp, ent, ex


def chunked_token_stats(
    hidden: Tensor,
    lm_head: Callable[[Tensor], Tensor],
    labels: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 256,
    entropy: bool = False,
    extra: Callable[[Tensor, slice], Tensor] | None = None,
    checkpoint: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Token log-probs (and entropy, and a full-vocabulary loss) without the [N, L, V] logits.

    Args:
        hidden: [N, L, H] final hidden states at the positions that predict ``labels``.
        lm_head: callable [n, c, H] → [n, c, V] logits (the model's output embedding).
        labels: [N, L] long, the tokens whose log-probs are wanted.
        temperature: logits are divided by it (use the sampling temperature so ratios against
            the rollout engine's log-probs are of the same distribution).
        chunk_size: positions per chunk c; peak logits memory is N·c·V floats.
        entropy: also return the token entropy [N, L].
        extra: ``extra(logits [N, c, V], sl) -> [N, c]`` for losses that need the whole
            distribution (GIFT's soft cross-entropy); ``sl`` is the chunk's slice of
            positions, so ``extra`` can index its own [N, L, ...] tensors.
        checkpoint: when autograd is recording, run each chunk under non-reentrant activation
            checkpointing, so backward recomputes a chunk's logits instead of keeping all
            of them alive: memory then does not grow with L·V. ``extra`` runs twice then
            (forward and recompute), so it must be deterministic.

    Returns:
        (logprobs [N, L], entropy [N, L] or None, extra [N, L] or None), float32 (or float64),
        equal in value and gradient (wrt ``hidden`` and the head's parameters) to computing
        everything on the full [N, L, V] logits.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    N, L = labels.shape
    if L == 0:  # nothing to predict; keep the return types
        empty = hidden.new_zeros((N, 0), dtype=torch.float32)
        return empty, (empty.clone() if entropy else None), (empty.clone() if extra is not None else None)
    use_ckpt = checkpoint and torch.is_grad_enabled()
    lps, ents, exs = [], [], []
    for start in range(0, L, chunk_size):
        sl = slice(start, min(start + chunk_size, L))
        args = (hidden[:, sl], labels[:, sl], lm_head, temperature, entropy, extra, sl)
        if use_ckpt:
            lp, ent, ex = _checkpoint(_chunk_stats, *args, use_reentrant=False)
        else:
            lp, ent, ex = _chunk_stats(*args)
        lps.append(lp)
        ents.append(ent)
        exs.append(ex)
    return (
        torch.cat(lps, dim=1),
        torch.cat(ents, dim=1) if entropy else None,
        torch.cat(exs, dim=1) if extra is not None else None,
    )


# --- ratios and clipping -------------------------------------------------------------------------


def importance_ratio(logprobs: Tensor, denominator: Tensor, clamp: float = 20.0) -> Tensor:
    """ρ = exp(clamp(logp − denominator, −clamp, clamp)), [N, L].

    The log-ratio clamp (verl's ±20) keeps a stale or mismatched token from producing inf; it
    also zeroes that token's gradient, as in verl.
    """
    return torch.exp(torch.clamp(logprobs - denominator, -clamp, clamp))


# verl gspo caps the sequence log-ratio at 10 (ρ ≤ e^10) for the same reason as importance_ratio's clamp.
_SEQ_LOG_RATIO_MAX = 10.0


def sequence_ratio(logprobs: Tensor, denominator: Tensor, mask: Tensor) -> Tensor:
    """GSPO's length-normalised sequence ratio, as [N, L] with a token-level straight-through.

    s_i = exp(mean_{t∈mask_i}(logp − denominator)). The returned tensor is
    exp(logp − sg(logp) + sg(log s_i)): its value is s_i at every position of row i and its
    gradient wrt logp_{i,t} is s_i (verl ``gspo``), so with ``seq-mean-token-mean``
    aggregation the gradient is s_i·mean_t ∇logp_{i,t}, GSPO's ∇s_i.

    ``logprobs``, ``denominator`` [N, L]; ``mask`` [N, L]. A row with no tokens gets s = 1
    (verl clamps the length to 1) instead of nan, which would poison the whole loss even when
    masked (0·nan = nan). log s_i is capped at 10 as in verl.
    """
    m = mask if mask.dtype == torch.bool else mask > 0
    diff = torch.where(m, logprobs - denominator, torch.zeros_like(logprobs)).detach()
    log_s = diff.sum(-1) / m.sum(-1).clamp(min=1).to(diff.dtype)  # [N]
    log_ratio = logprobs - logprobs.detach() + log_s[:, None]
    return torch.exp(torch.clamp(log_ratio, max=_SEQ_LOG_RATIO_MAX))


def _clip_bounds(clip_low: float, clip_high: float | None, clip_dual: float | None) -> tuple[float, float]:
    if clip_dual is not None and clip_dual <= 1.0:
        raise ValueError(f"clip_dual must be > 1.0 (verl's clip_ratio_c, e.g. 3.0), got {clip_dual}")
    return 1.0 - clip_low, 1.0 + (clip_low if clip_high is None else clip_high)


def ppo_clip_mask(
    ratio: Tensor,
    advantages: Tensor,
    clip_low: float,
    clip_high: float | None = None,
    clip_dual: float | None = None,
) -> Tensor:
    """Bool [N, L]: tokens where PPO's clipped objective still has a gradient.

    A token is dropped when A > 0 and ρ > 1+ε_high, when A < 0 and ρ < 1−ε_low, and, with a dual
    clip c, when A < 0 and ρ > c. There the clipped objective is constant in θ, so the masked
    form −A·ρ·mask has exactly PPO's gradient (see ``clipped_surrogate``). ε_high defaults to
    ε_low. ``advantages`` broadcasts to ``ratio`` ([N] must be given as [N, 1]).
    """
    lo, hi = _clip_bounds(clip_low, clip_high, clip_dual)
    r = ratio.detach()
    a = advantages.detach()
    drop = ((a > 0) & (r > hi)) | ((a < 0) & (r < lo))
    if clip_dual is not None:
        drop = drop | ((a < 0) & (r > clip_dual))
    return ~torch.broadcast_to(drop, torch.broadcast_shapes(r.shape, a.shape))


def clipped_surrogate(
    ratio: Tensor,
    advantages: Tensor,
    clip_low: float,
    clip_high: float | None = None,
    clip_dual: float | None = None,
) -> tuple[Tensor, Tensor]:
    """PPO's token loss, exactly: (loss [N, L], kept mask [N, L]).

    ℓ = max(−A·ρ, −A·clip(ρ, 1−ε_low, 1+ε_high)); with a dual clip c, for A < 0,
    ℓ = min(ℓ, −A·c) (verl ``vanilla``). ``kept`` equals ``ppo_clip_mask(...)``: the gradient
    of Σℓ equals that of Σ −A·ρ·kept, the masked form the engine uses. Use this one where the
    loss *value* matters (logging, comparisons with verl).
    """
    lo, hi = _clip_bounds(clip_low, clip_high, clip_dual)
    loss = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, lo, hi))
    if clip_dual is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -advantages * clip_dual), loss)
    return loss, ppo_clip_mask(ratio, advantages, clip_low, clip_high, clip_dual)


def clip_fraction(kept_mask: Tensor, response_mask: Tensor) -> float:
    """Fraction of response tokens whose gradient was clipped away (not kept); 0.0 if none."""
    resp = response_mask.bool()
    n = int(resp.sum())
    return float((resp & ~kept_mask.bool()).sum()) / n if n else 0.0


def policy_shaping(ratio: Tensor, kind: str = "none", gamma: float = 0.1, power: float = 0.5) -> Tensor:
    """LUFFY's shaping f(ρ), [N, L] → [N, L].

    ``none`` ρ; ``p_div_p`` ρ/(ρ+γ) (LUFFY's default, γ=0.1): with ρ = p its gradient weight on
    ∇log p is γp/(p+γ)², which peaks at p = γ and so lifts low-probability demonstration
    tokens that the plain ρ (weight p) would ignore; ``sqrt`` √ρ; ``pow`` ρ**power.
    """
    if kind == "none":
        return ratio
    if kind == "p_div_p":
        return ratio / (ratio + gamma)
    if kind == "sqrt":
        return torch.sqrt(ratio)
    if kind == "pow":
        return ratio ** power
    raise ValueError(f"unknown policy shaping kind '{kind}'; expected one of {', '.join(SHAPING_KINDS)}")


# --- aggregation and losses ----------------------------------------------------------------------


def aggregate(
    loss: Tensor,
    mask: Tensor,
    mode: str,
    *,
    num_tokens: float,
    num_seqs: float,
    max_len: float = 1.0,
) -> Tensor:
    """Reduce a token loss [N, L] over ``mask`` [N, L] to a scalar.

    Normalisers are the totals of the enclosing MINI-batch, passed in, never counted here: each
    mode is then a sum of per-row terms, so summing ``aggregate`` over micro-batches gives the
    mini-batch's value and gradient accumulation changes nothing.

    Modes (ℓm = loss·mask):
      ``token-mean``              Σ ℓm / num_tokens                                (verl default)
      ``seq-mean-token-mean``     Σ_i (Σ_t ℓm / Σ_t m_i) / num_seqs; empty rows give 0  (GSPO)
      ``seq-mean-token-sum``      Σ ℓm / num_seqs
      ``seq-mean-token-sum-norm`` Σ ℓm / (num_seqs · max_len)                     (Dr.GRPO)
      ``token-sum-norm``          Σ ℓm / max_len   (LUFFY/HPT/SRFT code: Σ/8192 per micro-batch)

    A normaliser of 0 gives 0·Σℓm (graph kept, no nan).
    """
    if mode == "token-mean":
        return _safe_div(masked_sum(loss, mask), num_tokens)
    if mode == "seq-mean-token-mean":
        per_row = masked_sum(loss, mask, dim=-1) / _masked(loss, mask)[1].sum(-1).clamp(min=1.0)
        return _safe_div(per_row.sum(), num_seqs)
    if mode == "seq-mean-token-sum":
        return _safe_div(masked_sum(loss, mask), num_seqs)
    if mode == "seq-mean-token-sum-norm":
        return _safe_div(masked_sum(loss, mask), float(num_seqs) * float(max_len))
    if mode == "token-sum-norm":
        return _safe_div(masked_sum(loss, mask), max_len)
    raise ValueError(f"unknown loss aggregation '{mode}'; expected one of {', '.join(LOSS_AGG_MODES)}")


def sft_nll(logprobs: Tensor, mask: Tensor, *, num_tokens: float, weights: Tensor | None = None) -> Tensor:
    """Token-mean negative log-likelihood: −Σ w·logp·m / num_tokens (scalar).

    ``logprobs`` [N, L], ``mask`` [N, L]; ``weights`` [N] (per row, e.g. Route.sft or SRFT's
    0.5·e^{−H_i}), [N, L] or None. ``num_tokens`` is the mini-batch's SFT token count, so
    micro-batches sum to the mini-batch value; 0 gives 0 (graph kept).
    """
    x = logprobs
    if weights is not None:
        x = x * (weights[:, None] if weights.dim() == 1 else weights)
    return _safe_div(-masked_sum(x, mask), num_tokens)


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from sampled tokens, [N, L].

    ``k1`` logp − ref (unbiased, high variance, can be negative); ``k2`` ½(logp − ref)²;
    ``k3`` exp(ref − logp) − (ref − logp) − 1 ≥ 0 (Schulman's low-variance estimator, verl
    ``low_var_kl``): the log-ratio is clamped to ±20 and the result to [−10, 10] as in verl,
    so one token far off the reference cannot dominate the loss.
    """
    if kind == "k1":
        return logprobs - ref_logprobs
    if kind == "k2":
        return 0.5 * (logprobs - ref_logprobs) ** 2
    if kind == "k3":
        d = torch.clamp(ref_logprobs - logprobs, -20.0, 20.0)
        return torch.clamp(torch.exp(d) - d - 1.0, -10.0, 10.0)
    raise ValueError(f"unknown KL estimator '{kind}'; expected one of {', '.join(KL_KINDS)}")


def sequence_logprob(logprobs: Tensor, mask: Tensor, *, normalize: bool = False) -> Tensor:
    """log π(y_i | x_i) per row, [N]: Σ_t logp·m, or the token mean when ``normalize``.

    A row with no tokens gives 0 in both forms (not nan), so pairwise losses (DPO-style GAL)
    over a batch with an empty row stay finite.
    """
    total = masked_sum(logprobs, mask, dim=-1)
    if not normalize:
        return total
    return total / _masked(logprobs, mask)[1].sum(-1).clamp(min=1.0)


@torch.no_grad()
def gibbs_target(ref_logprobs: Tensor, labels: Tensor, beta: float, smooth: float = 0.0) -> Tensor:
    """GIFT's finite-temperature target q: [..., V] reference log-probs, [...] labels → [..., V].

    p̃ = (1−λ)·exp(ref_logprobs) + λ/V;  q = softmax(log(p̃ + 1e-10) + β·onehot(label)).
    Closed form (λ=0, p = p_ref(y*)): q(y*) = p·e^β / (p·e^β + 1 − p), the other tokens keep
    the reference's relative shape; β → ∞ is the one-hot SFT target. The 1e-10 is the official
    code's guard against log 0. No gradient (a target, not a function of θ).
    """
    V = ref_logprobs.shape[-1]
    p = torch.exp(ref_logprobs.float())
    if smooth:
        p = (1.0 - smooth) * p + smooth / V
    z = torch.log(p + 1e-10)
    z.scatter_add_(-1, labels.unsqueeze(-1), torch.full_like(z[..., :1], float(beta)))
    return torch.softmax(z, dim=-1)


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """−Σ_k target_k · log_softmax(logits)_k: [..., V] logits, [..., V] probabilities → [...].

    Its gradient wrt the logits is softmax(logits) − target (for a target summing to 1); with a
    one-hot target it is the NLL of that token. Includes the constant H(target), as GIFT's code.
    """
    return -(target * torch.log_softmax(logits, dim=-1)).sum(-1)


@torch.no_grad()
def truncated_is_weight(old_logprobs: Tensor, sampling_logprobs: Tensor, mask: Tensor, cap: float) -> Tensor:
    """Token-level truncated importance weight w = min(π_old / π_sampling, cap), [N, L], no gradient.

    Corrects for the rollout engine sampling from a slightly different distribution than the
    trainer computes (other kernels, bf16): the policy-gradient term of token t is weighted by
    w_t (Yao et al. 2025, "truncated importance sampling"; verl's TIS). Positions outside
    ``mask`` (padding, demonstrations nobody sampled) get 1. The cap is applied in log space, so
    a token the engine thought nearly impossible cannot overflow.
    """
    if cap <= 0:
        raise ValueError(f"truncated_is_weight: cap must be > 0, got {cap}")
    log_w = torch.clamp(old_logprobs.float() - sampling_logprobs.float(), max=math.log(cap))
    w = torch.exp(log_w)
    return torch.where(mask.bool(), w, torch.ones_like(w))


# --- PPO loss value, baselines (RLOO, REINFORCE++, CISPO, KL in the reward) ----------------------


def ppo_token_loss(
    ratio: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float | None,
    clip_high: float | None = None,
    clip_dual: float | None = None,
) -> Tensor:
    """PPO's token loss [N, L] whose *value* is PPO's and whose *gradient* is the masked form's.

    ``mask`` [N, L] bool is the product of every stabilization mask (PPO's clip among them). The
    gradient is that of −A·ρ·mask. The value adds, where PPO's clip (``ppo_clip_mask``) dropped a
    token that ``mask`` dropped too, the constant that token contributes to PPO's objective:
    −A·clip(ρ, 1−ε_low, 1+ε_high), or −A·c under the dual clip. So on tokens PPO governs the value
    is max(−A·ρ, −A·clip(ρ)) (min'ed with −A·c for A < 0), the number verl's ``vanilla`` loss and
    TRL log; tokens that another mask dropped still contribute 0, and tokens ``mask`` keeps although
    PPO would clip them (demonstrations) contribute −A·ρ. ``clip_low`` None: no clip, −A·ρ·mask.
    """
    pg = -advantages * ratio * mask
    if clip_low is None:
        return pg
    clipped, ppo_kept = clipped_surrogate(ratio.detach(), advantages.detach(), clip_low, clip_high, clip_dual)
    constant = ~ppo_kept & ~mask.bool()  # a clipped token: PPO's objective is constant there
    return pg + torch.where(constant, clipped, torch.zeros_like(clipped))



@torch.no_grad()
def kl_reward_penalty(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, coef: float, kind: str = "k1") -> Tensor:
    """Token rewards −β·KL_t [N, L] for a KL penalty in the reward, no gradient.

    KL_t = ``kl_estimate(logprobs, ref_logprobs, kind)`` with ``logprobs`` the sampling policy's
    (π_old) log-probs; 0 outside ``mask``. verl's ``apply_kl_penalty`` (``use_kl_in_reward``,
    default estimator ``kl`` = k1), OpenRLHF's and REINFORCE++'s token-level KL reward.
    """
    kl = kl_estimate(logprobs.float(), ref_logprobs.float(), kind)
    return torch.where(mask.bool(), -coef * kl, torch.zeros_like(kl))


@torch.no_grad()
def reinforce_pp_advantages(token_rewards: Tensor, mask: Tensor, *, gamma: float = 1.0, eps: float = 1e-8) -> Tensor:
    """REINFORCE++ (Hu 2025): batch-whitened returns, [N, L] → [N, L], no gradient.

    G_t = Σ_{s ≥ t} γ^{s−t} r_s over the row's tokens (``token_rewards`` [N, L]: the outcome
    score on the last token plus −β·KL_t on every token), then A_t = (G_t − μ)/√(σ² + eps) with
    μ, σ² the mean and unbiased variance of G over every ``mask`` token of the batch (not per
    group: the global normalisation that distinguishes REINFORCE++ from GRPO). 0 outside ``mask``.
    Equals verl's ``compute_reinforce_plus_plus_outcome_advantage`` (``masked_whiten``).
    """
    m = mask.to(token_rewards.dtype)
    r = token_rewards * m
    returns = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        running = r[:, t] + gamma * running * m[:, t]  # a padded position carries nothing back
        returns[:, t] = running
    n = m.sum()
    mean = (returns * m).sum() / n.clamp(min=1.0)
    var = ((returns - mean) ** 2 * m).sum() / (n - 1.0).clamp(min=1.0)
    return (returns - mean) * torch.rsqrt(var + eps) * m


def cispo_token_loss(logprobs: Tensor, ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float) -> Tensor:
    """CISPO's token loss (MiniMax-M1, arXiv 2506.13585): −sg(clip(ρ, 1−ε_low, 1+ε_high))·A·log π_θ, [N, L].

    Every token keeps a gradient, sg(r̂)·A·∇log π_θ: the IS weight is clipped (and detached)
    instead of the token being dropped as PPO does. The value is verl's and TRL's ``cispo``.
    """
    weight = torch.clamp(ratio.detach(), 1.0 - eps_low, 1.0 + eps_high)
    return -weight * advantages * logprobs


__all__ += ["ppo_token_loss", "kl_reward_penalty", "reinforce_pp_advantages", "cispo_token_loss"]


# --- appended for the official-settings work (GIFT's exact target, LUFFY's shaping family) ----------


def gibbs_target_exact(ref_logprobs: Tensor, labels: Tensor, beta: float, smooth: float = 0.0,
                       guard: float | None = None) -> Tensor:
    """GIFT's target q [..., V] in log space, in the reference's dtype or float32, whichever is wider.

    Paper Eq. 18: q = softmax(log p̃ + β·onehot(y*)), p̃ = (1−λ)·p_ref + λ/V, computed from the
    log-probs directly (log p̃ = logaddexp(log(1−λ) + log p_ref, log(λ/V))), so a gold token with
    p_ref = 1e-9 keeps q(y*) = p·e^β/(p·e^β + 1 − p) exactly and a token with p̃ = 0 gets q = 0.
    ``guard`` = 1e-10 gives the official code's log(p̃ + 1e-10) instead (``gibbs_target`` is that
    form in float32). A float64 reference gives a float64 target. No gradient.
    """
    dtype = torch.promote_types(ref_logprobs.dtype, torch.float32)
    z = ref_logprobs.detach().to(dtype)
    if smooth:
        V = z.shape[-1]
        z = torch.logaddexp(z + math.log1p(-smooth) if smooth < 1.0 else torch.full_like(z, -math.inf),
                            torch.full_like(z, math.log(smooth / V)))
    if guard is not None:
        z = torch.log(torch.exp(z) + guard)
    z = z.scatter_add(-1, labels.unsqueeze(-1), torch.full_like(z[..., :1], float(beta)))
    return torch.softmax(z, dim=-1)
