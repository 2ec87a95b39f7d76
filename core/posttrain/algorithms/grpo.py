"""GRPO (Shao et al. 2024): group-normalised outcome reward, PPO-clipped policy gradient.

    Â_i = (r_i − mean_g r) / (std_g r + ε),   ℓ_t = max(−Â·ρ_t, −Â·clip(ρ_t, 1−ε_low, 1+ε_high))

Everything GRPO does is the default behaviour in ``posttrain.defaults``; this plugin only adds
the config of a KL penalty in the reward (``kl_reward_coef``, verl's ``use_kl_in_reward``:
r_i ← r_i − β·Σ_t KL_t before the group normalisation), next to ``kl_coef``, the KL term in the
loss. Dr.GRPO is ``norm_adv_by_std: false`` with ``loss_agg: seq-mean-token-sum-norm``; DAPO's
clip-higher is ``clip_high: 0.28``; GSPO is ``ratio_level: sequence``; PPO's dual clip is
``clip_dual: 3.0``.
"""

from __future__ import annotations

from posttrain import hookimpl
from posttrain.algorithms.kl_reward import KLRewardConfig


@hookimpl
def algorithm_config():
    return KLRewardConfig
