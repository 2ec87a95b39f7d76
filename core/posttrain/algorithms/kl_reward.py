"""The config of a KL penalty in the reward (verl's ``use_kl_in_reward``), which the built-in
baselines (grpo, rloo, reinforce_pp, cispo) share. The math is ``defaults.kl_reward``."""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.config import GRPOConfig, help_field
from posttrain.functional import KL_KINDS


@dataclass
class KLRewardConfig(GRPOConfig):
    kl_reward_coef: float = help_field(0.0, "β of a KL penalty in the reward (verl's use_kl_in_reward): every sampled token's reward gets −β·KL(π_old‖π_ref)_t, so a sequence's reward is score − β·Σ_t KL_t before the advantage. > 0 loads a frozen reference model. Independent of kl_coef, the KL term in the loss; both may be on.")
    kl_reward_estimator: str = help_field("k1", "k1 | k2 | k3: the KL estimator of kl_reward_coef (verl's default for the reward: kl = k1).")

    def __post_init__(self) -> None:
        if self.kl_reward_coef < 0:
            raise ValueError(f"kl_reward_coef must be >= 0 (0 disables), got {self.kl_reward_coef}")
        if self.kl_reward_estimator not in KL_KINDS:
            raise ValueError(f"kl_reward_estimator: '{self.kl_reward_estimator}' is not one of {' | '.join(KL_KINDS)}")
