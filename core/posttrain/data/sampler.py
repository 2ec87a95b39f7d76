"""Seeded, resumable prompt batches."""

from __future__ import annotations

import numpy as np

from ..types import Example


class PromptSampler:
    """Batches of prompts in a seeded per-epoch order; ``state_dict`` resumes exactly."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, shuffle: bool = True):
        if not examples:
            raise ValueError("PromptSampler needs at least one example")
        self.examples, self.batch_size, self.seed, self.shuffle = examples, batch_size, seed, shuffle
        self.epoch, self.cursor = 0, 0
        self._order = self._order_for(0)

    def _order_for(self, epoch: int) -> np.ndarray:
        n = len(self.examples)
        # A generator per epoch (not a running one), so the order is a function of (seed, epoch) alone.
        return np.random.default_rng(self.seed + epoch).permutation(n) if self.shuffle else np.arange(n)

    def next_batch(self, size: int | None = None) -> list[Example]:
        """The next ``size`` prompts (default: the batch size), continuing into the next epoch."""
        size = self.batch_size if size is None else size
        out = []
        while len(out) < size:
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._order_for(self.epoch)
            out.append(self.examples[int(self._order[self.cursor])])
            self.cursor += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._order_for(self.epoch)
