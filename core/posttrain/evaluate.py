"""Held-out evaluation during training: sample, verify, report accuracy on ``data.eval``.

Benchmarks with pass@k / avg@k / maj@k and reports live in ``posttrain.eval``."""

from __future__ import annotations

from typing import Any, Callable

from .rollout import SamplingParams
from .types import Example


def evaluate_accuracy(generator: Any, examples: list[Example], verifier: Any, params: SamplingParams, *,
                      prompt_fn: Callable[[Example], list[int]], progress: bool = False,
                      prefix: str = "eval/") -> dict[str, float]:
    """avg@n accuracy (mean correctness over n samples per prompt), pass@n, mean response length."""
    samples = generator.generate([prompt_fn(ex) for ex in examples], params, progress=progress)
    items = [(t.text, ex.answer) for ex, trajs in zip(examples, samples) for t in trajs]
    results = verifier.verify(items)
    n = params.n
    correct = [r.reward > 0.5 for r in results]
    per_prompt = [correct[i * n:(i + 1) * n] for i in range(len(examples))]
    lengths = [len(t.response_ids) for trajs in samples for t in trajs]
    return {
        f"{prefix}accuracy": sum(correct) / max(1, len(correct)),
        f"{prefix}pass@{n}": sum(any(c) for c in per_prompt) / max(1, len(per_prompt)),
        f"{prefix}response_length": sum(lengths) / max(1, len(lengths)),
        f"{prefix}timeouts": float(sum(r.status == "timeout" for r in results)),
    }
