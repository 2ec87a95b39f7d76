"""The unified estimator on one micro-batch: forward → denominator → shaping → mask → loss.

Shared by the engine and by ``posttrain.testing.check_algorithm_plugin``, so plugins are
tested through exactly the code path that trains them.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from . import functional as F
from .metrics import Metrics
from .train.forward import policy_outputs
from .types import LossTerm, Needs, TrainBatch


def micro_batch_loss(hook: Any, algo: Any, step: int, model: Any, micro: TrainBatch, metrics: Metrics, *,
                     needs: Needs, reference: Any = None, temperature: float = 1.0,
                     chunk: int = 256, is_cap: float | None = None,
                     is_mask: tuple[float, float] | None = None) -> tuple[list[LossTerm], dict[str, float]]:
    """Return (loss terms, diagnostics) for a micro-batch already on the model's device.

    ``is_cap``: truncated importance sampling for the rollout/trainer mismatch. Every sampled
    token's advantage is multiplied by w = min(π_old/π_sampling, is_cap) (detached) before any
    hook sees it, so the correction applies to every algorithm, including plugins with their own
    ``build_loss``. Policy-gradient terms are linear in A token by token and clip decisions only
    read A's sign (w > 0), so this equals weighting the (clipped) PG term by w, as verl's TIS does.

    ``is_mask`` = (low, high): masked importance sampling; sampled tokens whose untruncated
    weight π_old/π_sampling lies outside the band are taken out of the loss mask (after the
    algorithm's ``stabilization_mask``), so a token sampled by a policy too far from the trainer's
    contributes nothing (asynchronous rollouts, ``rollout.max_staleness``).
    """
    dist_fn = functools.partial(_distribution_loss, hook, algo, step, metrics) if needs.reference_vocab else None
    out = policy_outputs(model, micro, temperature=temperature, chunk=chunk, entropy=needs.entropy,
                         entropy_stat=True, distribution_loss=dist_fn, reference=reference)
    if micro.old_logprobs is None:  # one update per rollout: π_old is the current policy
        micro = micro.with_(old_logprobs=out.logprobs.detach())
    adv = micro.advantages
    adv = adv[:, None].expand_as(out.logprobs) if adv.dim() == 1 else adv  # [N, L]
    is_stats, band = {}, None
    if (is_cap is not None or is_mask is not None) and micro.sampling_logprobs is not None:
        band, is_stats = _is_band(micro, is_mask)
    if is_cap is not None and micro.sampling_logprobs is not None:
        sampled = micro.on_policy_tokens  # demonstrations and forced prefixes were never sampled
        w = F.truncated_is_weight(micro.old_logprobs, micro.sampling_logprobs, sampled, is_cap)  # [N, L]
        adv = adv * w
        if sampled.any():
            is_stats.update({"train/is_weight": float(F.masked_mean(w, sampled)),
                             "train/is_truncated": float(F.masked_mean((w >= is_cap).float(), sampled))})
    denom = hook.reference_denominator(batch=micro, logprobs=out.logprobs, config=algo, step=step)
    ratio = F.importance_ratio(out.logprobs, denom)
    ratio = hook.shape_ratio(batch=micro, ratio=ratio, config=algo, step=step)
    masks = hook.stabilization_mask(batch=micro, logprobs=out.logprobs, ratio=ratio, advantages=adv, config=algo, step=step)
    mask = functools.reduce(torch.logical_and, [x for x in masks if x is not None], micro.response_mask)
    if band is not None:
        mask = mask & band
    terms = hook.build_loss(batch=micro, outputs=out, advantages=adv, ratio=ratio, mask=mask, config=algo, step=step,
                            metrics=metrics)

    stats = {"train/entropy": float(F.masked_mean(out.entropy.detach(), micro.response_mask)), **is_stats}
    on_policy = micro.on_policy_tokens & (micro.rl_weight > 0)[:, None]
    if on_policy.any():
        stats["train/clip_frac"] = F.clip_fraction(mask, on_policy)
    if micro.ref_logprobs is not None:
        kl = F.kl_estimate(out.logprobs.detach(), micro.ref_logprobs, "k3")
        stats["train/kl"] = float(F.masked_mean(kl, micro.response_mask))
    return terms, stats


@torch.no_grad()
def _is_band(micro: TrainBatch, is_mask: tuple[float, float] | None) -> tuple[torch.Tensor | None, dict[str, float]]:
    """The is_mask band's keep-mask [N, L] (None without a band) and the sampler-vs-trainer statistics."""
    sampled = micro.on_policy_tokens
    if not sampled.any():
        return None, {}
    log_w = micro.old_logprobs.float() - micro.sampling_logprobs.float()
    stats = {"train/logprob_gap": float(F.masked_mean(log_w.abs(), sampled)),  # |log π_old − log π_sampling|
             "train/is_weight_max": float(torch.exp(log_w[sampled].max()))}
    if is_mask is None:
        return None, stats
    low, high = is_mask
    inside = (log_w >= math.log(low) if low > 0 else torch.ones_like(sampled)) & (log_w <= math.log(high))
    stats["train/is_masked"] = float(F.masked_mean((~inside).float(), sampled))
    return inside | ~sampled, stats


def _distribution_loss(hook, algo, step, metrics, logits, reference_logprobs, labels):
    out = hook.token_distribution_loss(logits=logits, reference_logprobs=reference_logprobs, labels=labels,
                                       config=algo, step=step, metrics=metrics)
    if out is None:
        raise RuntimeError("requirements() asked for reference_vocab, but no plugin implements token_distribution_loss")
    return out


@torch.no_grad()
def add_statistics(sums: dict[str, list[float]], hook: Any, algo: Any, step: int, model: Any, micro: TrainBatch, *,
                   temperature: float, chunk: int) -> None:
    """Add one micro-batch's ``minibatch_statistics`` (sum, count) to ``sums`` (no gradient)."""
    out = policy_outputs(model, micro, temperature=temperature, chunk=chunk, entropy=True)
    for part in hook.minibatch_statistics(batch=micro, outputs=out, config=algo, step=step):
        for name, (total, count) in (part or {}).items():
            acc = sums.setdefault(name, [0.0, 0.0])
            acc[0] += float(total)
            acc[1] += float(count)


def finish_statistics(sums: dict[str, list[float]]) -> dict[str, float]:
    """sum / count per statistic (NaN for a count of 0): what ``batch.stats`` holds."""
    return {k: (s / c if c else float("nan")) for k, (s, c) in sums.items()}
