"""A per-step metric accumulator handed to hooks as ``metrics``."""

from __future__ import annotations

import math
from collections import defaultdict

import torch


class Metrics:
    """Collects numbers during one step; ``summary()`` reduces them to one value per name.

    Hooks call ``metrics.log("hpt/offline_ratio", 0.25)``. A name logged several times in a
    step (once per micro-batch, say) is averaged, or summed with ``reduce="sum"``.
    """

    def __init__(self) -> None:
        self._values: dict[str, list[float]] = defaultdict(list)
        self._reduce: dict[str, str] = {}

    def log(self, name: str, value: float | torch.Tensor, reduce: str = "mean") -> None:
        if reduce not in ("mean", "sum", "max", "min", "last"):
            raise ValueError(f"metrics.log({name!r}): unknown reduce {reduce!r}")
        if isinstance(value, torch.Tensor):
            value = value.detach().float().item()
        self._values[name].append(float(value))
        self._reduce[name] = reduce

    def summary(self) -> dict[str, float]:
        out = {}
        for name, vals in self._values.items():
            r = self._reduce[name]
            finite = [v for v in vals if not math.isnan(v)] or vals
            if r == "mean":
                out[name] = sum(finite) / len(finite)
            elif r == "sum":
                out[name] = sum(vals)
            elif r == "max":
                out[name] = max(vals)
            elif r == "min":
                out[name] = min(vals)
            else:
                out[name] = vals[-1]
        return out
