"""Held-out evaluation during training: sample, verify, report accuracy on ``data.eval``.

Benchmarks with pass@k / avg@k / maj@k and reports live in ``posttrain.eval``."""

from __future__ import annotations

from typing import Any, Callable

from . import distributed as D
from .rollout import SamplingParams
from .types import Example


def evaluate_accuracy(generator: Any, examples: list[Example], verifier: Any, params: SamplingParams, *,
                      prompt_fn: Callable[[Example], list[int]], progress: bool = False,
                      prefix: str = "eval/") -> dict[str, float]:
    """avg@n accuracy (mean correctness over n samples per prompt), pass@n, mean response length.

    Under several ranks each samples and verifies its share of ``examples`` and all get the same
    numbers (``distributed.map_sharded``)."""

    def score(part: list[Example]) -> list[tuple[list[bool], list[int], int]]:
        # per example: correct per sample, response lengths, verifier timeouts
        samples = generator.generate([prompt_fn(ex) for ex in part], params, progress=progress)
        results = iter(verifier.verify([(t.text, ex.answer) for ex, trajs in zip(part, samples) for t in trajs]))
        out = []
        for trajs in samples:
            rs = [next(results) for _ in trajs]
            out.append(([r.reward > 0.5 for r in rs], [len(t.response_ids) for t in trajs],
                        sum(r.status == "timeout" for r in rs)))
        return out

    per_example = D.map_sharded(score, examples)
    correct = [c for cs, _, _ in per_example for c in cs]
    lengths = [n for _, ns, _ in per_example for n in ns]
    return {
        f"{prefix}accuracy": sum(correct) / max(1, len(correct)),
        f"{prefix}pass@{params.n}": sum(any(cs) for cs, _, _ in per_example) / max(1, len(per_example)),
        f"{prefix}response_length": sum(lengths) / max(1, len(lengths)),
        f"{prefix}timeouts": float(sum(t for _, _, t in per_example)),
    }
