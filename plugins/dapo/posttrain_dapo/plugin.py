"""DAPO: Decoupled Clip and Dynamic sAmpling Policy Optimization (arXiv 2503.14476).

Per prompt q the G on-policy rollouts o_i get the rule reward R(o_i) = +1 if correct else −1
(Eq. 1), plus the overlong penalty (Eq. 13, L_max the response cap, L_cache the buffer):

    R_length(y) = 0                                  if |y| ≤ L_max − L_cache
                  ((L_max − L_cache) − |y|) / L_cache  if L_max − L_cache < |y| ≤ L_max
                  −1                                 if L_max < |y|

Â_i = (R_i − mean(R)) / std(R) over the group (Eq. 9). The objective (Eq. 8) is the clipped
surrogate with ε_low = 0.2, ε_high = 0.28 (clip-higher), normalised by the number of tokens of
the whole batch (token-level loss, Eq. 8's 1/Σ|o_i|), no KL, subject to dynamic sampling:
0 < |{o_i correct}| < G. Groups where every rollout agrees are dropped and the step draws
more prompts, rolls them out and verifies them, until it has ``trainer.prompts_per_step``
informative groups (the official recipe's ``max_num_gen_batches`` is the engine's
``trainer.max_sampling_rounds``).

Formula → hook:
  dynamic sampling      → ``select_groups``   (keep informative groups, ask for the rest)
  R = ±1 + R_length     → ``compute_advantage`` (shaping, then the core's group normalisation)
  clip-higher, token-mean → the core's defaults with ``clip_low=0.2, clip_high=0.28``
  overlong filtering (§3.4, off by default) → ``route_group`` keeps only finished rollouts
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from posttrain import GRPOConfig, GroupSelection, Route, help_field, hookimpl
from posttrain import functional as F


@dataclass
class DAPOConfig(GRPOConfig):
    name: str = help_field("dapo", "Algorithm entry-point name.")
    clip_low: Optional[float] = help_field(0.2, "ε_low of Eq. 8 (ratio ≥ 1 − ε_low). Paper: 0.2.")
    clip_high: Optional[float] = help_field(0.28, "ε_high of Eq. 8, clip-higher (ratio ≤ 1 + ε_high). Paper: 0.28.")
    loss_agg: str = help_field("token-mean", "Token-level policy-gradient loss (Eq. 8: 1/Σ|o_i| over the batch). Paper: token-mean.")
    dynamic_sampling: bool = help_field(
        True, "Keep only groups with 0 < correct < G and draw more prompts until the step has trainer.prompts_per_step "
        "of them (§3.2). Paper: on (the recipe's algorithm.filter_groups.enable=True, metric acc).")
    refill_prompts: Optional[int] = help_field(
        None, "Prompts (per process) drawn in each extra sampling round; None draws exactly the number still missing. "
        "The official recipe draws gen_batch_size = 3 × the train batch per round.")
    plus_minus_reward: bool = help_field(
        True, "Map a verifier reward r in [0, 1] to 2r − 1 before shaping: Eq. 1's ±1 rule reward, the scale the "
        "overlong penalty is defined against. Paper: on.")
    overlong_buffer: int = help_field(
        4096, "L_cache of Eq. 13 (tokens); 0 disables overlong reward shaping. Paper: 4096.")
    max_response_length: Optional[int] = help_field(
        None, "L_max of Eq. 13; None uses the run's response cap (rollout.max_new_tokens, batch.totals.max_len). "
        "Paper: 20480.")
    overlong_filter: bool = help_field(
        False, "Overlong filtering (§3.4): rollouts cut at the length cap get no policy gradient. Paper: studied, "
        "off in the final recipe (shaping replaces it).")
    kl_coef: float = help_field(0.0, "KL(π_θ‖π_ref) coefficient. Paper: 0 (DAPO removes the KL term).")

    def __post_init__(self) -> None:
        problems = []
        if self.overlong_buffer < 0:
            problems.append(f"overlong_buffer must be >= 0, got {self.overlong_buffer}")
        if self.max_response_length is not None and self.max_response_length <= self.overlong_buffer:
            problems.append(f"max_response_length ({self.max_response_length}) must exceed overlong_buffer ({self.overlong_buffer})")
        if self.refill_prompts is not None and self.refill_prompts < 1:
            problems.append(f"refill_prompts must be >= 1 or null, got {self.refill_prompts}")
        if problems:
            raise ValueError("; ".join(problems))


@hookimpl
def algorithm_config():
    return DAPOConfig


def informative(group) -> bool:
    """0 < correct < G over the group's on-policy rollouts (Eq. 8's constraint)."""
    n = len(group.on_policy)
    return 0 < group.num_correct() < n


@hookimpl
def select_groups(groups, target, config, metrics):
    if not config.dynamic_sampling:
        return None
    keep = [g for g in groups if not g.on_policy or informative(g)]  # offline groups are not RL groups
    metrics.log("dapo/informative_groups", float(len(keep)), reduce="last")
    if len(keep) >= target:
        return GroupSelection(keep[:target])
    missing = target - len(keep)
    return GroupSelection(keep, more=config.refill_prompts or missing)


def overlong_penalty(lengths: Tensor, max_len: float, buffer: int) -> Tensor:
    """Eq. 13: R_length per row from response lengths [N] (tokens, EOS included)."""
    expected = max_len - buffer
    pen = (expected - lengths.float()) / buffer
    return torch.where(lengths <= expected, torch.zeros_like(pen), torch.where(lengths <= max_len, pen, -torch.ones_like(pen)))


def shaped_rewards(batch, config) -> Tensor:
    """[N] DAPO's reward: ±1 rule reward (Eq. 1) + overlong penalty (Eq. 13)."""
    r = 2.0 * batch.rewards - 1.0 if config.plus_minus_reward else batch.rewards.clone()
    if config.overlong_buffer > 0:
        max_len = float(config.max_response_length or batch.totals.max_len)
        r = r + torch.where(batch.off_policy, torch.zeros_like(r), overlong_penalty(batch.response_lengths, max_len, config.overlong_buffer))
    return r


@hookimpl
def compute_advantage(batch, config, metrics):
    r = shaped_rewards(batch, config)
    rl = batch.rl_weight > 0
    if rl.any() and config.overlong_buffer > 0:
        metrics.log("dapo/overlong_penalty", float((r - (2.0 * batch.rewards - 1.0 if config.plus_minus_reward else batch.rewards))[rl].mean()))
    return F.group_advantages(r, batch.group_index, use_std=config.norm_adv_by_std, eps=config.adv_eps, rows=rl)


@hookimpl
def route_group(group, config):
    if not config.overlong_filter or not group.members:
        return None
    kept = tuple(i for i, m in enumerate(group.members) if m.finished or m.off_policy)
    return Route(rl=1.0, members=kept) if kept else Route(drop=True)
