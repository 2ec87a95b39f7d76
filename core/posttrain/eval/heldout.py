"""Held-out accuracy during training: sample, verify, report accuracy on ``data.eval``.

The rest of this package evaluates benchmarks (pass@k / avg@k / maj@k, reports); this module is
the small piece the training loop calls at every ``eval.every`` steps."""

from __future__ import annotations

from typing import Any, Callable

from .. import distributed as D
from ..rollout import SamplingParams
from ..types import Example


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


def evaluate_in_training(engine: Any) -> dict[str, float]:
    """Held-out accuracy (``data.eval``) and ``eval.benchmarks`` of a training stage's current
    policy, with its own RNG so that evaluating never changes what training samples next."""
    import torch

    from ..plugins import build_registry
    from ..rollout import hf_engine

    e, cfg = engine.cfg.eval, engine.cfg
    max_new = e.max_new_tokens or cfg.rollout.max_new_tokens
    params = SamplingParams(n=e.n, temperature=e.temperature, top_p=e.top_p, max_new_tokens=max_new)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.trainer.seed + 1_000_003)
        generator = engine.rollout or hf_engine(engine.backend.model, engine.tokenizer, cfg.rollout)
        out: dict[str, float] = {}
        if engine.eval_examples:  # data.eval: held-out accuracy (eval/accuracy)
            examples = engine.eval_examples[: e.max_prompts] if e.max_prompts else engine.eval_examples
            out = evaluate_accuracy(generator, examples, engine._verifier, params,
                                    prompt_fn=lambda ex: engine.make_group(ex).prompt_ids, progress=engine._bars)
        if e.benchmarks:
            from . import Prompting, evaluate_benchmarks_in_training, load_benchmarks

            if getattr(engine, "_benchmarks", None) is None:  # loaded once, at the first evaluation
                engine._benchmarks = load_benchmarks(list(e.benchmarks), {"max_new_tokens": max_new, "max_problems": e.max_prompts})
            prompting = Prompting(engine.tokenizer, cfg.data.template, cfg.data.system_prompt)
            out.update(evaluate_benchmarks_in_training(
                generator, prompting, engine._benchmarks, build_registry(engine.pm, "register_verifiers"), cfg.verifier,
                seed=cfg.trainer.seed, progress=engine._bars))
        return out
