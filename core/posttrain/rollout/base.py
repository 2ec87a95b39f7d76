"""The rollout engine protocol and its sampling parameters (the package re-exports these)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ..types import Trajectory


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 → greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 → off: no top-k restriction
    max_new_tokens: int = 1024


class RolloutEngine(Protocol):
    """What the engine needs from a generator."""

    def generate(self, prompts: list[list[int]], params: SamplingParams, *, progress: bool = False) -> list[list[Trajectory]]:
        """For each prompt (token ids, unpadded) return ``params.n`` trajectories with
        ``response_ids`` (EOS included when emitted), ``sampling_logprobs`` [T] and ``finished``."""

    def sync_weights(self, model: Any) -> None:
        """Make the next ``generate`` use the trainer's current weights."""
