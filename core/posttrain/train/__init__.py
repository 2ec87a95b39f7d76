"""Trainer backends: own the optimizer, the LR schedule and the gradient step."""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor


class TrainerBackend(Protocol):
    model: Any  # the module to call for forward passes (possibly wrapped)

    def backward(self, loss: Tensor) -> None:
        """Accumulate gradients of one micro-batch's loss."""

    def step(self) -> tuple[float, bool]:
        """Clip, step the optimizer and the schedule, zero the gradients.
        Returns (pre-clip gradient norm, skipped)."""

    @property
    def lr(self) -> float: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def torch_backend(model: Any, config: Any, total_steps: int) -> TrainerBackend:
    from .plain_torch import TorchBackend

    return TorchBackend(model, config, total_steps)
