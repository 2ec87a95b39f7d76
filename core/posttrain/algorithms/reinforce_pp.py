"""REINFORCE++ (Hu 2025, arXiv 2501.03262): token-level KL in the reward, discounted return,
advantage normalised over the whole batch instead of per prompt.

    r_t = 1[t = T]·score − β·KL_t,   KL_t = log π_old(y_t) − log π_ref(y_t)   (k1)
    G_t = Σ_{s≥t} γ^{s−t} r_s,       Â_t = (G_t − mean_batch G) / std_batch G

mean and (unbiased) std run over every response token of the step's RL rows (under several
processes: over this process's share of the step). The loss is the core's PPO-clipped policy
gradient. Same as verl's ``reinforce_plus_plus`` estimator with ``use_kl_in_reward``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain import hookimpl
from posttrain.algorithms import defaults
from posttrain import functional as F
from posttrain.config import GRPOConfig, help_field


@dataclass
class ReinforcePPConfig(GRPOConfig):
    name: str = help_field("reinforce_pp", "Algorithm entry-point name.")
    kl_reward_coef: float = help_field(0.01, "β of the token-level KL penalty in the reward, −β·KL(π_old‖π_ref)_t on every sampled token (REINFORCE++; OpenRLHF's init_kl_coef 0.01). > 0 loads a frozen reference model; 0 is REINFORCE with a batch-normalised return.")
    gamma: float = help_field(1.0, "Discount γ of the return G_t = Σ_{s≥t} γ^{s−t} r_s (1.0 in the paper and verl).")

    def __post_init__(self) -> None:
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")


@hookimpl
def algorithm_config():
    return ReinforcePPConfig


@hookimpl
def compute_advantage(batch, config):
    rl_tokens = batch.response_mask & (batch.rl_weight > 0)[:, None]
    last = (batch.response_mask.sum(-1) - 1).clamp(min=0)  # the outcome score sits on the final token
    rewards = torch.zeros(batch.response_mask.shape, dtype=torch.float32)
    rewards[torch.arange(len(batch)), last] = batch.rewards.float()
    penalty = defaults.kl_reward(batch, config)
    if penalty is not None:
        rewards = rewards + penalty
    return F.reinforce_pp_advantages(rewards, rl_tokens, gamma=config.gamma)
