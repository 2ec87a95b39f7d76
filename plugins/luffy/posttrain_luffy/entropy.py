"""LUFFY's learned entropy coefficient (the code's ``use_adaptive_temperature=True`` with
``use_adaptive_temperature_fixed=False``; ``mix_actor.MIXDataParallelPPOActor``).

A SAC-style temperature: α = exp(log α), log α₀ = log(entropy_coef), trained by its own AdamW
(lr ``alpha_lr``, β = (0.9, 0.999), weight decay 0.01) on

    L_α = Σ_k sg(H̄_k − H*) · min(α, α_max)        (k: the micro-batches of one mini-batch)

so ∂L_α/∂log α = α · Σ_k (H̄_k − H*): α shrinks while the entropy is above the target H* and
grows below it. Each micro-batch's loss gets the bonus −sg(α)·H̄_k. The code back-propagates
L_α per micro-batch and steps α's optimizer right after the policy's, once per mini-batch.
Here the mini-batch is the engine's optimizer step (``step`` of ``build_loss``): the
accumulated gradient is applied when the first micro-batch of a later step arrives, so every
micro-batch sees the α the code would use. Gradient, moments and the pending step are in
``state_dict``, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

BETAS = (0.9, 0.999)  # mix_actor: optim.AdamW([log_alpha], lr=alpha_lr, betas=(0.9, 0.999), weight_decay=1e-2)
WEIGHT_DECAY = 1e-2


class LearnedEntropyCoef:
    """log α and its optimizer; ``coefficient`` is called once per micro-batch."""

    def __init__(self, init: float, target: float, lr: float, max_coef: Optional[float] = None) -> None:
        self.target, self.max_coef = target, max_coef
        self.log_alpha = torch.tensor(math.log(init), dtype=torch.float32, requires_grad=True)  # the code's dtype
        self.optimizer = torch.optim.AdamW([self.log_alpha], lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY)
        self.step: Optional[int] = None  # the optimizer step whose micro-batches log_alpha.grad holds

    def coefficient(self, entropy_mean: float, step: int) -> float:
        """α for a micro-batch of optimizer step ``step`` with token-mean entropy ``entropy_mean``;
        adds sg(H̄ − H*)·α to the gradient of log α."""
        if self.step is not None and step != self.step:  # the previous mini-batch is complete
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step = step
        alpha = self.log_alpha.exp()
        if self.max_coef is not None:  # adaptive_temperature_clip: no gradient above it
            alpha = torch.clamp(alpha, max=self.max_coef)
        ((entropy_mean - self.target) * alpha).backward()
        return float(alpha.detach())

    def state_dict(self) -> dict[str, Any]:
        grad = self.log_alpha.grad
        return {"log_alpha": self.log_alpha.detach().clone(), "grad": None if grad is None else grad.clone(),
                "optimizer": self.optimizer.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.log_alpha.grad = None if state["grad"] is None else state["grad"].clone()
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
