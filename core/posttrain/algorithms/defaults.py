"""GRPO and SFT behaviour, written as an ordinary plugin.

Every implementation is ``trylast``: an algorithm plugin overrides a hook by returning a
value and falls through to these by returning ``None``. If GRPO could not be written against
the hooks, no other algorithm could either.
"""

from __future__ import annotations

import torch

from .. import functional as F
from .. import hookimpl
from ..config import GRPOConfig
from ..types import LossTerm, Needs, Route


@hookimpl(trylast=True)
def algorithm_config():
    return GRPOConfig


@hookimpl(trylast=True)
def requirements(config):
    return Needs(
        rollouts=True,
        reference=getattr(config, "kl_coef", 0.0) > 0 or getattr(config, "kl_reward_coef", 0.0) > 0,
        entropy=getattr(config, "entropy_coef", 0.0) > 0,
    )


@hookimpl(trylast=True)
def register_verifiers(register):
    from ..verify import BUILTIN_VERIFIERS

    for name, factory in BUILTIN_VERIFIERS.items():
        register(name, factory)


@hookimpl(trylast=True)
def register_rollout_engines(register):
    from ..rollout import hf_engine

    register("hf", hf_engine)
    register("vllm", _lazy("posttrain.rollout.vllm_engine", "vllm_engine", "vllm"))


@hookimpl(trylast=True)
def register_trainer_backends(register):
    from ..train import torch_backend

    register("torch", torch_backend)
    register("deepspeed", _lazy("posttrain.train.deepspeed_backend", "deepspeed_backend", "deepspeed"))


def _lazy(module: str, attr: str, extra: str):
    """A factory that imports its module on first call: importing posttrain never imports
    deepspeed or vllm, and a missing extra is reported when (and only when) it is selected."""

    def factory(*args, **kwargs):
        import importlib

        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise ImportError(f"{extra} is not installed ({e}); pip install 'posttrain[{extra}]'") from e
        return getattr(mod, attr)(*args, **kwargs)

    factory.__name__ = attr
    return factory


@hookimpl(trylast=True)
def compose_group(group):
    return group


@hookimpl(trylast=True)
def route_group(group):
    if group.members:
        return Route(rl=1.0)
    if group.demonstrations:  # offline step: learn the first demonstration
        return Route(rl=0.0, sft=1.0, demos=(0,))
    return Route(drop=True)


@hookimpl(trylast=True)
def compute_advantage(batch, config):
    return F.group_advantages(
        rewards_with_kl(batch, config), batch.group_index, use_std=config.norm_adv_by_std, eps=config.adv_eps,
        rows=batch.rl_weight > 0,
    )


def kl_reward(batch, config):
    """Token rewards −β·KL(π_old‖π_ref)_t [N, L] of a config's ``kl_reward_coef`` (verl's
    ``use_kl_in_reward``), on the sampled tokens of RL rows; None when the config has none.
    π_old is the trainer's recomputation when the step made one (several updates per rollout),
    else the rollout engine's sampling log-probs (the same policy, without a second forward pass)."""
    coef = getattr(config, "kl_reward_coef", 0.0)
    if coef <= 0:
        return None
    if batch.ref_logprobs is None:
        raise RuntimeError("kl_reward_coef > 0 but the batch has no ref_logprobs (requirements() must ask for a reference)")
    old = batch.old_logprobs if batch.old_logprobs is not None else batch.sampling_logprobs
    sampled = batch.response_mask & (batch.rl_weight > 0)[:, None] & ~batch.off_policy[:, None]
    return F.kl_reward_penalty(old, batch.ref_logprobs, sampled, coef, config.kl_reward_estimator)


def rewards_with_kl(batch, config):
    """[N] outcome rewards, minus β·Σ_t KL_t under ``kl_reward_coef`` (verl's GRPO/RLOO score
    with ``use_kl_in_reward``: the token rewards summed over the response)."""
    penalty = kl_reward(batch, config)
    return batch.rewards if penalty is None else batch.rewards + penalty.sum(-1)


@hookimpl(trylast=True)
def reference_denominator(batch):
    return batch.old_logprobs


@hookimpl(trylast=True)
def shape_ratio(batch, ratio, config):
    if config.ratio_level == "sequence":  # GSPO: one length-normalised ratio per sequence
        return F.sequence_ratio(torch.log(ratio), torch.zeros_like(ratio), batch.response_mask)
    return ratio


@hookimpl(trylast=True)
def stabilization_mask(batch, ratio, advantages, config):
    if config.clip_low is None:
        return None
    kept = F.ppo_clip_mask(ratio, advantages, config.clip_low, config.clip_high, config.clip_dual)
    # Clipping is a trust region around the sampling policy; demonstrations and forced prefix
    # tokens were never sampled from it, so whether to clip them is the off-policy algorithm's decision, not ours.
    return kept | batch.off_policy_mask


@hookimpl(trylast=True)
def build_loss(batch, outputs, advantages, ratio, mask, config):
    # Gradient of −A·ρ·mask, value of PPO's clipped objective (what verl and TRL log).
    pg = F.ppo_token_loss(ratio, advantages, mask, config.clip_low, config.clip_high, config.clip_dual)
    return loss_terms(batch, outputs, pg, config)


def loss_terms(batch, outputs, pg, config) -> list[LossTerm]:
    """GRPO's terms around a policy-gradient token loss ``pg`` [N, L] (unweighted): ``pg`` weighted
    by Route.rl and aggregated over RL rows, then SFT, entropy and KL. An algorithm that changes
    only the policy-gradient term (CISPO) builds its ``pg`` and calls this."""
    t = batch.totals
    tokens = batch.response_mask
    terms = []
    rl_rows = batch.rl_weight > 0
    if t.rl_seqs > 0:
        pg = pg * batch.rl_weight[:, None]  # [N, L]
        terms.append(LossTerm("pg", F.aggregate(pg, tokens & rl_rows[:, None], config.loss_agg,
                                                 num_tokens=t.rl_tokens, num_seqs=t.rl_seqs, max_len=t.max_len)))
    if t.sft_seqs > 0:
        sft_tokens = tokens & (batch.sft_weight > 0)[:, None]
        nll = F.sft_nll(outputs.logprobs, sft_tokens, num_tokens=t.sft_tokens, weights=batch.sft_weight)
        terms.append(LossTerm("sft", config.sft_coef * nll))
    if config.entropy_coef > 0 and outputs.entropy is not None:
        ent = F.aggregate(outputs.entropy, tokens, "token-mean", num_tokens=t.tokens, num_seqs=t.seqs)
        terms.append(LossTerm("entropy", -config.entropy_coef * ent))
    if config.kl_coef > 0 and batch.ref_logprobs is not None and t.rl_seqs > 0:
        kl = F.kl_estimate(outputs.logprobs, batch.ref_logprobs, config.kl_estimator)
        terms.append(LossTerm("kl", config.kl_coef * F.aggregate(kl, tokens & rl_rows[:, None], config.loss_agg,
                                                                  num_tokens=t.rl_tokens, num_seqs=t.rl_seqs, max_len=t.max_len)))
    return terms
