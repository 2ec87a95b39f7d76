"""RLOO (Ahmadian et al. 2024, "Back to Basics", arXiv 2402.14740): REINFORCE with a
leave-one-out baseline.

    Â_i = r_i − 1/(G−1) · Σ_{j≠i} r_j        (over the G rollouts of i's prompt)

No division by the group's std (RLOO's estimator is unbiased; GRPO's is not). A prompt with a
single rollout gets Â = 0, as verl's ``rloo``. The paper puts a sequence-level KL penalty in the
reward, r_i = score_i − β·Σ_t KL_t: that is ``kl_reward_coef`` (0 by default, as verl's). The loss
is the core's PPO-clipped policy gradient, which on one update per rollout (ρ = 1) is exactly
REINFORCE's −Â·∇log π_θ.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain import hookimpl
from posttrain.algorithms import defaults
from posttrain import functional as F
from posttrain.config import GRPOConfig, help_field


@dataclass
class RLOOConfig(GRPOConfig):
    name: str = help_field("rloo", "Algorithm entry-point name.")


@hookimpl
def algorithm_config():
    return RLOOConfig


@hookimpl
def compute_advantage(batch, config):
    return F.rloo_advantages(defaults.rewards_with_kl(batch, config), batch.group_index, rows=batch.rl_weight > 0)
