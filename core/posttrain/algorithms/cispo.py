"""CISPO (MiniMax-M1, arXiv 2506.13585, §3): clip the importance-sampling weight, not the token.

    J(θ) = E[ 1/Σ_i|o_i| · Σ_i Σ_t sg(r̂_{i,t}) · Â_i · log π_θ(o_{i,t}) ],
    r̂_{i,t} = clip(ρ_{i,t}, 1 − ε_low^IS, 1 + ε_high^IS)

Every token keeps a gradient sg(r̂)·Â·∇log π_θ (PPO drops the tokens whose ratio left the trust
region, which are often the rare "fork" tokens). The advantage is GRPO's group-normalised
reward; the aggregation the paper's token mean (``loss_agg: token-mean``). The paper sets no
lower bound (ε_low^IS large: ``weight_clip_low: 1.0`` gives 0) and tunes ε_high^IS. There is no
PPO mask (``clip_low: null``); setting ``clip_low`` adds one (the paper's unified form with a token mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from posttrain import hookimpl
from posttrain.algorithms import defaults
from posttrain import functional as F
from posttrain.config import GRPOConfig, help_field


@dataclass
class CISPOConfig(GRPOConfig):
    name: str = help_field("cispo", "Algorithm entry-point name.")
    clip_low: Optional[float] = help_field(None, "PPO's token mask; CISPO keeps every token (null). A value adds PPO's mask on top (the paper's unified form with a token mask).")
    weight_clip_low: float = help_field(1.0, "ε_low^IS: the IS weight is clipped below at 1 − ε_low^IS (1.0: no lower bound, as the paper).")
    weight_clip_high: float = help_field(0.28, "ε_high^IS: the IS weight is clipped above at 1 + ε_high^IS, then detached.")

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight_clip_low <= 1.0:
            raise ValueError(f"weight_clip_low must be in [0, 1] (the lower bound 1 − ε is ≥ 0), got {self.weight_clip_low}")
        if self.weight_clip_high < 0:
            raise ValueError(f"weight_clip_high must be >= 0, got {self.weight_clip_high}")


@hookimpl
def algorithm_config():
    return CISPOConfig


@hookimpl
def build_loss(batch, outputs, advantages, ratio, mask, config):
    pg = F.cispo_token_loss(outputs.logprobs, ratio, advantages, config.weight_clip_low, config.weight_clip_high)
    return defaults.loss_terms(batch, outputs, torch.where(mask, pg, torch.zeros_like(pg)), config)
