"""A per-step metric accumulator handed to hooks as ``metrics``."""

from __future__ import annotations

import math
from collections import defaultdict

import torch


class Metrics:
    """Collects numbers during one step; ``summary()`` reduces them to one value per name.

    Hooks call ``metrics.log("hpt/offline_ratio", 0.25)``. A name logged several times in a
    step (once per micro-batch, say) is averaged, or summed with ``reduce="sum"``. A mean may
    be weighted: ``metrics.log("x/token_mean", mb_mean, weight=mb_tokens)`` gives the exact
    token mean over micro-batches of different sizes, not the mean of their means.
    """

    def __init__(self) -> None:
        self._values: dict[str, list[float]] = defaultdict(list)
        self._weights: dict[str, list[float]] = defaultdict(list)
        self._reduce: dict[str, str] = {}

    def log(self, name: str, value: float | torch.Tensor, reduce: str = "mean", weight: float | torch.Tensor = 1.0) -> None:
        if reduce not in ("mean", "sum", "max", "min", "last"):
            raise ValueError(f"metrics.log({name!r}): unknown reduce {reduce!r}")
        if isinstance(value, torch.Tensor):
            value = value.detach().float().item()
        weight = float(weight.detach().float().item() if isinstance(weight, torch.Tensor) else weight)
        if weight != 1.0 and reduce != "mean":
            raise ValueError(f"metrics.log({name!r}): weight only applies to reduce='mean', not {reduce!r}")
        if not weight >= 0.0 or math.isinf(weight):
            raise ValueError(f"metrics.log({name!r}): weight must be finite and >= 0, got {weight}")
        self._values[name].append(float(value))
        self._weights[name].append(weight)
        self._reduce[name] = reduce

    def summary(self) -> dict[str, float]:
        out = {}
        for name, vals in self._values.items():
            r = self._reduce[name]
            if r == "mean":
                pairs = [(v, w) for v, w in zip(vals, self._weights[name]) if not math.isnan(v)]
                total = sum(w for _, w in pairs)
                if total > 0:
                    out[name] = sum(v * w for v, w in pairs) / total
                else:  # all NaN, or every weight 0: the plain mean (NaN if all are NaN)
                    finite = [v for v, _ in pairs] or vals
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


# --- the step's standard metrics -------------------------------------------------------------------


def log_rewards(groups: list, m: Metrics) -> None:
    """Rewards of freshly verified groups (called once per sampling round of a step)."""
    # Weighted by counts: a step that samples in several rounds gets the exact mean over all of them.
    on = [mem.reward for g in groups for mem in g.members if not mem.off_policy and mem.reward is not None]
    if on:
        m.log("reward/mean", sum(on) / len(on), weight=len(on))
        m.log("reward/accuracy", sum(r > 0.5 for r in on) / len(on), weight=len(on))
        with_rollouts = [g for g in groups if g.on_policy]
        m.log("reward/solved_prompts", sum(g.num_correct() > 0 for g in with_rollouts) / len(with_rollouts),
              weight=len(with_rollouts))
    off = [mem.reward for g in groups for mem in g.members if mem.off_policy and mem.reward is not None]
    if off:
        m.log("reward/off_policy_mean", sum(off) / len(off), weight=len(off))


def log_rollouts(groups: list, seconds: float, m: Metrics) -> None:
    """Response length, truncation rate and throughput of freshly sampled groups."""
    trajs = [t for g in groups for t in g.members]
    tokens = sum(len(t.response_ids) for t in trajs)
    m.log("rollout/response_length", tokens / max(1, len(trajs)))
    m.log("rollout/truncated", sum(not t.finished for t in trajs) / max(1, len(trajs)))
    m.log("time/rollout_s", seconds)
    m.log("perf/rollout_tokens_per_s", tokens / max(1e-9, seconds))
